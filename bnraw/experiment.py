"""Library entry points behind the scripts: plain values in, a dict of results out."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
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


def config_dict(data, model, train, **extra) -> dict:
  """The run's configuration for outputs, when no flag values were given."""
  return {**vars(data), **vars(model), **vars(train), **extra}


@contextlib.contextmanager
def stop_on_signals():
  """SIGINT/SIGTERM set a flag instead of killing the run; yields ``() -> signal or None``."""
  caught = []

  def handler(signum, frame):
    if caught:  # a second signal: stop now
      raise KeyboardInterrupt
    caught.append(signum)

  previous = {}
  try:
    for sig in (signal.SIGINT, signal.SIGTERM):
      previous[sig] = signal.signal(sig, handler)
  except ValueError:  # not the main thread: no handlers, never stops early
    pass
  try:
    yield lambda: caught[0] if caught else None
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


def train(data: DataConfig, model: ModelConfig, train: TrainConfig, *, out_dir: str,
          trace: bool = False, config: Optional[dict] = None, progress: bool = True,
          on_step: Optional[Callable] = None, break_at: Optional[tuple[str, int]] = None,
          break_action: Optional[Callable] = None, checkpoint_every: int = 0,
          resume: bool = False) -> dict:
  """Trains the raw path, evaluates, writes ``summary.json`` (and the trace) into ``out_dir``.

  ``break_at=(layer, step)`` runs eagerly and stops in that layer's moving-average update at
  that step (``break_action`` replaces the debugger; see bnraw.debug). A checkpoint is written
  every ``checkpoint_every`` epochs (0: only at the end), on SIGINT/SIGTERM (after the current
  step) and at the end; ``resume`` continues the run in ``out_dir``. The summary's ``status`` is
  "complete", "interrupted" or "non_finite". Returns the summary dict (DESIGN.md section 4).
  """
  from bnraw.checkpoint import Checkpointer
  parts = setup(data, model, train)  # bad input fails here, before anything is written
  config = config if config is not None else config_dict(data, model, train, trace=trace)
  hook = None
  if break_at is not None:
    from bnraw.debug import BreakAt
    names = [layer.name for layer in parts.model.bns]
    if break_at[0] not in names:
      raise UsageError("break_at", f"no BN layer {break_at[0]!r}; layers: {', '.join(names)}")
    hook = BreakAt(*break_at, parts.optimizer.iterations, break_action)
  checkpointer = Checkpointer(out_dir, parts.model, parts.optimizer, config)
  resume_state = checkpointer.restore() if resume else None
  io.prepare_out_dir(out_dir)
  mode = "eager" if hook is not None else loop.resolve_mode(train.mode)
  names = [layer.name for layer in parts.model.bns]
  recorders = []
  if trace:
    from bnraw.summaries import TensorBoardWriter
    from bnraw.trace import Trace, TraceRecorder
    recorder = TraceRecorder(names, model.epsilon)
    if resume_state is not None and os.path.exists(os.path.join(out_dir, "trace.npz")):
      recorder.extend_from(Trace.load(out_dir), int(parts.optimizer.iterations.numpy()))
    board = TensorBoardWriter(out_dir, names, model.epsilon)
    recorders = [recorder, board.step]
  if on_step is not None:
    recorders.append(on_step)
  printer = EpochProgress(train.epochs) if progress else None

  def save_trace():
    if trace:
      recorder.save(os.path.join(out_dir, "trace.npz"))

  def on_epoch(epoch, history):
    if printer:
      printer(epoch, history)
    if checkpoint_every and (epoch + 1) % checkpoint_every == 0 and epoch + 1 < train.epochs:
      save_trace()
      checkpointer.save(history.state, "running")

  start = time.perf_counter()
  with stop_on_signals() as stopped:
    history = loop.fit(parts.model, parts.optimizer, parts.data.images, parts.data.labels,
                       batch_size=train.batch_size, epochs=train.epochs, seed=train.seed,
                       mode=mode, trace=trace,
                       on_step=(lambda r: [f(r) for f in recorders]) if recorders else None,
                       on_epoch=on_epoch, hook=hook, resume=resume_state,
                       should_stop=lambda: stopped() is not None)
  train_s = time.perf_counter() - start
  summary = {
      "config": config,
      "status": history.status,
      "complete": history.status == "complete",
      "resolved": {"width": model.width, "mode": mode},
      "environment": environment(),
      "parameters": parts.model.count_parameters(),
      "history": {"loss": history.loss, "accuracy": history.accuracy},
      "evaluate": {"loss": None, "accuracy": None},
      "steps_done": int(parts.optimizer.iterations.numpy()),
      "train_seconds": train_s,
  }
  if history.status == "complete":
    eval_loss, eval_accuracy = loop.evaluate(parts.model, parts.data.images, parts.data.labels,
                                             batch_size=train.batch_size, mode=mode)
    summary["evaluate"] = {"loss": eval_loss, "accuracy": eval_accuracy}
    if trace:
      board.scalars(summary["steps_done"], {"evaluate/loss": eval_loss,
                                            "evaluate/accuracy": eval_accuracy})
  if history.status == "non_finite":
    summary["non_finite"] = {"step": history.error.step, "where": history.error.where}
    summary["steps_done"] = history.error.step  # the failing step's update is not kept
  else:  # never checkpoint non-finite weights: the last good checkpoint stays the latest
    checkpointer.save(history.state, history.status)
  if history.status == "interrupted":
    summary["signal"] = stopped()
  save_trace()
  if trace:
    board.close()
  io.write_json(os.path.join(out_dir, "summary.json"), summary)
  return summary
