"""TensorBoard output of a traced run, written eagerly outside the compiled step.

Per step and BN layer: scalars ``{layer}/mean_gap``, ``variance_gap``, ``min_batch_variance``,
``max_amplification``; histograms of the batch and moving (after update) means and variances
every ``histogram_every`` steps;
on replicas each of these per replica's copy, under ``{layer}/replica_{r}/...``;
``train/loss`` and ``train/accuracy`` per step (with loss scaling also ``train/loss_scale`` and
``train/skipped``), ``evaluate/loss`` and ``evaluate/accuracy`` at the
end. The diagnose tool writes its own tags through the same writer (bnraw.diagnosis.board: losses,
parts, the report, the per-layer chart, amplification histograms; epochs on their x-axis).
``tensorboard --logdir OUT_DIR/tensorboard`` shows them.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.histogram import summary_v2 as histogram_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from bnraw.config import HISTOGRAM_EVERY
from bnraw.core.loop import StepRecord
from bnraw.tracing.store import layer_epsilon, summarize

class TensorBoardWriter:
  """Writes one run's summaries under ``{out_dir}/tensorboard`` (or ``log_dir``) from a
  background thread, so the training loop only hands over numpy values; a context manager that
  drains the queue and closes the file when the run ends, however it ends.

  Scalars are written every step; histograms every ``histogram_every`` steps (and at step 0).
  TensorBoard output is a view, never worth a run's main outputs: if writing fails, the writer
  says so once on stderr, drops the rest, and the run goes on.
  """

  def __init__(self, out_dir: str, layer_names: list[str], epsilon: float,
               histogram_every: int = HISTOGRAM_EVERY, log_dir: Optional[str] = None):
    if histogram_every < 1:
      raise ValueError(f"histogram_every must be >= 1, got {histogram_every}")
    log_dir = log_dir or os.path.join(out_dir, "tensorboard")
    self.writer = tf.summary.create_file_writer(log_dir)  # histograms, text, images
    # The per-step scalars and histograms go as one plain protobuf event per step, built with
    # numpy, no TensorFlow op per value: ~34 eager tf.summary.scalar ops a step (and ~32
    # histograms every K steps) made a traced run 1.25x slower on 2 cores.
    self.scalar_file = EventFileWriter(log_dir, max_queue_size=1000, filename_suffix=".steps")
    self.layer_names = layer_names
    self.epsilon = epsilon
    self.histogram_every = histogram_every
    self.queue: queue.Queue = queue.Queue(maxsize=256)  # bounded: a slow disk slows training
    self.failure: Optional[BaseException] = None
    self.closed = False
    self.thread = threading.Thread(target=self._drain, name="bnraw-tensorboard", daemon=True)
    self.thread.start()

  def step(self, record: StepRecord) -> None:
    """Hands one step's record to the writer thread."""
    self._put(self._write_step, record)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._put(self._write_scalars, step, dict(values))

  def run(self, step: int, write: Callable[[], None]) -> None:
    """Runs ``write()`` (tf.summary calls) on the writer thread, at ``step``."""
    self._put(self._write_with, step, write)

  def _put(self, *job) -> None:
    if self.closed:
      raise RuntimeError("the TensorBoard writer is closed")
    if self.failure is None:
      self.queue.put(job)

  def _drain(self) -> None:
    while True:
      job = self.queue.get()
      if job is None:
        return
      if self.failure is None:
        try:
          job[0](*job[1:])
        except Exception as e:  # reported once; the queue keeps draining, so no one blocks
          self.failure = e
          print(f"bnraw: TensorBoard output stopped: {type(e).__name__}: {e}", file=sys.stderr)

  def _write_step(self, record: StepRecord) -> None:
    scalars = {"train/loss": record.loss, "train/accuracy": record.accuracy}
    if record.loss_scale is not None:
      scalars.update({"train/loss_scale": record.loss_scale,
                      "train/skipped": float(record.skipped)})
    layers = []
    if record.trace is not None:
      for i, layer in enumerate(self.layer_names):
        values = {key: np.asarray(record.trace[key][i]) for key in record.trace}
        epsilon = layer_epsilon(self.epsilon, i)
        if values["batch_mean"].ndim == 1:
          parts = [(layer, values)]
        else:  # on replicas ([N, C]): one set of curves per replica's copy
          parts = [(f"{layer}/replica_{r}", {key: value[r] for key, value in values.items()})
                   for r in range(len(values["batch_mean"]))]
        for name, part in parts:
          scalars.update({f"{name}/{key}": float(value)
                          for key, value in summarize(part, epsilon).items()})
        layers += parts
    histograms = []
    if layers and record.step % self.histogram_every == 0:
      for layer, values in layers:
        for key in ("batch_mean", "batch_variance", "moving_mean_after",
                    "moving_variance_after"):
          histograms += histogram_summary.histogram_pb(f"{layer}/{key}", values[key]).value
    self._write_scalars(record.step, scalars, histograms)

  def _write_with(self, step: int, write: Callable[[], None]) -> None:
    with self.writer.as_default(step=step):
      write()

  def _write_scalars(self, step: int, values: dict[str, float], more=()) -> None:
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)
                                         for tag, value in values.items()] + list(more))
    self.scalar_file.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                               summary=summary))

  def __enter__(self) -> "TensorBoardWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Writes everything queued, then closes the file (idempotent)."""
    if self.closed:
      return
    self.closed = True
    self.queue.put(None)
    self.thread.join()
    self.scalar_file.close()
    self.writer.flush()
    self.writer.close()
