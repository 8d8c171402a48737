"""TensorBoard output of a traced run, written eagerly outside the compiled step.

Per step and BN layer: scalars ``{layer}/mean_gap``, ``variance_gap``, ``min_batch_variance``,
``max_amplification``; histograms of the batch and moving (after update) means and variances;
``train/loss`` and ``train/accuracy`` per step, ``evaluate/loss`` and ``evaluate/accuracy`` at the
end; the diagnose tool adds ``diagnosis/<loss>`` every ``--every`` epochs. ``tensorboard --logdir
OUT_DIR`` shows them.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from bnraw.core.loop import StepRecord
from bnraw.tracing.store import summarize


class TensorBoardWriter:
  """Writes one run's summaries under ``{out_dir}/tensorboard``; a context manager that closes
  the file when the run ends, however it ends."""

  def __init__(self, out_dir: str, layer_names: list[str], epsilon: float):
    self.writer = tf.summary.create_file_writer(os.path.join(out_dir, "tensorboard"))
    self.layer_names = layer_names
    self.epsilon = epsilon

  def step(self, record: StepRecord) -> None:
    with self.writer.as_default(step=record.step):
      tf.summary.scalar("train/loss", record.loss)
      tf.summary.scalar("train/accuracy", record.accuracy)
      if record.trace is None:
        return
      for i, layer in enumerate(self.layer_names):
        values = {key: np.asarray(record.trace[key][i]) for key in record.trace}
        for key, value in summarize(values, self.epsilon).items():
          tf.summary.scalar(f"{layer}/{key}", float(value))
        for key in ("batch_mean", "batch_variance", "moving_mean_after", "moving_variance_after"):
          tf.summary.histogram(f"{layer}/{key}", values[key])

  def scalars(self, step: int, values: dict[str, float]) -> None:
    with self.writer.as_default(step=step):
      for name, value in values.items():
        tf.summary.scalar(name, value)

  def __enter__(self) -> "TensorBoardWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()
