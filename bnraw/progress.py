"""A Keras-style progress line per epoch: rewritten in place on a terminal, one line per epoch
in a log."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class EpochProgress:
  """``on_epoch(epoch, history)`` callback printing
  ``epoch 12/500  4 steps  loss 1.0726  accuracy 0.5430  3.1s  ETA 2m31s``."""

  def __init__(self, epochs: int, stream: TextIO = sys.stderr, label: str = "",
               steps_per_epoch: Optional[int] = None):
    self.epochs = epochs
    self.stream = stream
    self.label = f"{label} " if label else ""
    self.steps = (f"  {steps_per_epoch} step{'s' if steps_per_epoch != 1 else ''}"
                  if steps_per_epoch else "")
    self.start = time.perf_counter()
    self.first_epoch: Optional[int] = None  # a resumed run starts past 0: its ETA counts from it
    self.interactive = stream.isatty()

  def __call__(self, epoch: int, history) -> None:
    if self.first_epoch is None:
      self.first_epoch = epoch
    done = epoch + 1
    elapsed = time.perf_counter() - self.start
    left = elapsed / (done - self.first_epoch) * (self.epochs - done)
    line = (f"{self.label}epoch {done}/{self.epochs}{self.steps}  loss {history.loss[-1]:.4f}  "
            f"accuracy {history.accuracy[-1]:.4f}  {_duration(elapsed)}"
            + (f"  ETA {_duration(left)}" if done < self.epochs else ""))
    if self.interactive:  # pad over a longer previous line
      self.stream.write("\r" + line.ljust(79) + ("\n" if done == self.epochs else ""))
    else:
      self.stream.write(line + "\n")
    self.stream.flush()


class PassProgress:
  """``observer(what, done, total)`` (:func:`bnraw.core.batching.observing`) printing a line
  for a pass over the data once it has run ``after`` seconds, then every ``every`` seconds and
  when it ends::

      precise_bn: layer 3/12 (bn_3)  4,096/20,000 examples  812 examples/s  ETA 20s

  A pass shorter than ``after`` prints nothing. On a terminal the line is rewritten in place."""

  def __init__(self, stream: TextIO = sys.stderr, after: float = 3.0, every: float = 5.0,
               clock=time.perf_counter):
    self.stream, self.after, self.every, self.clock = stream, after, every, clock
    self.interactive = stream.isatty()
    self.start = self.last = None
    self.shown = False

  def __call__(self, what: str, done: int, total: int) -> None:
    now = self.clock()
    if done == 0:
      self.start, self.last, self.shown = now, None, False
      return
    elapsed = now - self.start
    end = done >= total
    due = (elapsed >= self.after and
           (self.last is None or now - self.last >= (0.5 if self.interactive else self.every)))
    if not (due or (end and self.shown)):
      return
    rate = done / elapsed if elapsed > 0 else 0.0
    line = (f"{what}  {done:,}/{total:,} examples  {rate:,.0f} examples/s  "
            + (_duration(elapsed) if end else f"ETA {_duration((total - done) / rate)}"
               if rate else ""))
    if self.interactive:
      self.stream.write("\r" + line.ljust(79) + ("\n" if end else ""))
    else:
      self.stream.write(line + "\n")
    self.stream.flush()
    self.last, self.shown = now, True
