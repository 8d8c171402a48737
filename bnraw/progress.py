"""A one-line-per-epoch progress display (rewritten in place on a terminal)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class EpochProgress:
  """``on_epoch(epoch, history)`` callback printing ``epoch 12/500  loss ...  acc ...``.

  On a terminal the line is rewritten in place every epoch; otherwise about 20 lines per run.
  """

  def __init__(self, epochs: int, stream: TextIO = sys.stderr, label: str = ""):
    self.epochs = epochs
    self.stream = stream
    self.label = f"{label} " if label else ""
    self.start = time.perf_counter()
    self.interactive = stream.isatty()
    self.every = max(1, epochs // 20)

  def __call__(self, epoch: int, history) -> None:
    done = epoch + 1
    elapsed = time.perf_counter() - self.start
    line = (f"{self.label}epoch {done}/{self.epochs}  loss {history.loss[-1]:.4f}  "
            f"accuracy {history.accuracy[-1]:.4f}  {elapsed:.1f}s")
    if self.interactive:
      self.stream.write("\r" + line + ("\n" if done == self.epochs else ""))
    elif done % self.every == 0 or done in (1, self.epochs):
      self.stream.write(line + "\n")
    self.stream.flush()
