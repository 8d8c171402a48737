"""Library entry points behind the scripts: plain values in, a dict of results out."""

from __future__ import annotations

import os
import platform
import time
from typing import Callable, NamedTuple, Optional

import tensorflow as tf

from bnraw import io, loop
from bnraw.config import DataConfig, ModelConfig, TrainConfig
from bnraw.data import Dataset, make_dataset
from bnraw.errors import UsageError
from bnraw.model import SeedNet
from bnraw.optim import make_optimizer
from bnraw.progress import EpochProgress


class Setup(NamedTuple):
  data: Dataset
  model: SeedNet
  optimizer: object


def setup(data: DataConfig, model: ModelConfig, train: TrainConfig) -> Setup:
  """Dataset, raw network (seeded initial weights) and optimizer; validates their fit."""
  dataset = make_dataset(data)
  if not 1 <= train.batch_size <= len(dataset.images):
    raise UsageError("batch_size", f"must be in [1, {len(dataset.images)}] "
                     f"(the dataset has {len(dataset.images)} images)")
  net = SeedNet(model, seed=train.seed)
  optimizer = make_optimizer(train.optimizer, net.trainable_variables, train.lr,
                             train.sgd_momentum, train.nesterov)
  return Setup(dataset, net, optimizer)


def environment() -> dict:
  """Versions and device, recorded in every output."""
  gpus = tf.config.list_physical_devices("GPU")
  return {"tensorflow": tf.__version__, "python": platform.python_version(),
          "device": "GPU: " + ", ".join(g.name for g in gpus) if gpus else
          f"CPU ({os.cpu_count()} cores)"}


def train(data: DataConfig, model: ModelConfig, train: TrainConfig, *, out_dir: str,
          trace: bool = False, config: Optional[dict] = None, progress: bool = True,
          on_step: Optional[Callable] = None) -> dict:
  """Trains the raw path, evaluates, writes ``summary.json`` (and the trace) into ``out_dir``.

  Returns the summary dict (DESIGN.md section 4).
  """
  parts = setup(data, model, train)  # bad input fails here, before anything is written
  io.prepare_out_dir(out_dir)
  mode = loop.resolve_mode(train.mode)
  recorders = []
  if trace:
    from bnraw.summaries import TensorBoardWriter
    from bnraw.trace import TraceRecorder
    names = [layer.name for layer in parts.model.bns]
    recorder = TraceRecorder(names, model.epsilon)
    board = TensorBoardWriter(out_dir, names, model.epsilon)
    recorders = [recorder, board.step]
  if on_step is not None:
    recorders.append(on_step)

  def record(step_record):
    for fn in recorders:
      fn(step_record)

  start = time.perf_counter()
  history = loop.fit(parts.model, parts.optimizer, parts.data.images, parts.data.labels,
                     batch_size=train.batch_size, epochs=train.epochs, seed=train.seed, mode=mode,
                     trace=trace, on_step=record if recorders else None,
                     on_epoch=EpochProgress(train.epochs) if progress else None)
  train_s = time.perf_counter() - start
  eval_loss, eval_accuracy = loop.evaluate(parts.model, parts.data.images, parts.data.labels,
                                           batch_size=train.batch_size, mode=mode)
  summary = {
      "config": config if config is not None else {
          **vars(data), **vars(model), **vars(train), "trace": trace, "out_dir": out_dir},
      "resolved": {"width": model.width, "mode": mode},
      "environment": environment(),
      "parameters": parts.model.count_parameters(),
      "history": {"loss": history.loss, "accuracy": history.accuracy},
      "evaluate": {"loss": eval_loss, "accuracy": eval_accuracy},
      "train_seconds": train_s,
  }
  if trace:
    recorder.save(os.path.join(out_dir, "trace.npz"))
    board.scalars(int(parts.optimizer.iterations.numpy()),
                  {"evaluate/loss": eval_loss, "evaluate/accuracy": eval_accuracy})
    board.close()
  io.write_json(os.path.join(out_dir, "summary.json"), summary)
  return summary
