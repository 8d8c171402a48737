"""Library entry points behind the scripts: plain values in, a dict of results out."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import time
from typing import Callable, NamedTuple, Optional

import numpy as np
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


def _config_dict(data, model, train, **extra) -> dict:
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
  config = config if config is not None else _config_dict(data, model, train, trace=trace)
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


def _fix_raw(parts: Setup, precise, out_dir: str, batch_size: int, mode: str) -> dict:
  """Writes PreciseBN statistics into the moving statistics, saves a checkpoint, evaluates."""
  for layer, stats in zip(parts.model.bns, precise):
    layer.moving_mean.assign(stats.mean)
    layer.moving_variance.assign(stats.variance)
  loss, accuracy = loop.evaluate(parts.model, parts.data.images, parts.data.labels,
                                 batch_size=batch_size, mode=mode)
  checkpoint = tf.train.Checkpoint(**{v.name.split(":")[0].replace("/", "."): v
                                      for v in parts.model.variables})
  path = checkpoint.write(os.path.join(out_dir, "fixed", "ckpt"))
  return {"method": "precise_bn", "evaluate": {"loss": loss, "accuracy": accuracy},
          "saved": path}


def _keras_train(parts: Setup, model: ModelConfig, train: TrainConfig, mode: str,
                 on_epoch: Callable, need_last_batch: Callable[[int], bool]):
  """Real Keras ``fit`` from the raw initial weights, replaying the raw batch order. Before the
  last step of each epoch where ``need_last_batch(epoch)``, the batch statistics Keras is about to
  use are computed by the raw forward pass on a copy of Keras's weights (bit-identical to Keras's
  own forward, see compare)."""
  from bnraw import keras_ref
  kmodel = keras_ref.build_model(model)
  keras_ref.compile_model(kmodel, train, jit_compile=(mode == "xla"))
  keras_ref.set_keras_state(kmodel, keras_ref.raw_state(parts.model, parts.optimizer))
  images, labels = parts.data.images, parts.data.labels
  one_hot = np.eye(256, dtype=np.float32)[labels]
  state = {"last_batch": None}
  history = loop.History()
  import keras

  class LastBatch(keras.callbacks.Callback):

    def __init__(self, order, epoch):
      super().__init__()
      self.order, self.epoch = order, epoch
      self.last = len(loop.batches(order, train.batch_size)) - 1

    def on_train_batch_begin(self, batch, logs=None):
      if batch == self.last and need_last_batch(self.epoch):
        keras_ref.set_raw_state(parts.model, parts.optimizer, keras_ref.keras_state(kmodel))
        index = self.order[batch * train.batch_size:]
        out = parts.model.forward(tf.constant(images[index]), [None] * len(parts.model.bns))
        state["last_batch"] = [(s.mean.numpy(), s.variance.numpy()) for s in out.statistics]

  orders = loop.epoch_orders(train.seed, len(images))
  for epoch in range(train.epochs):
    order = next(orders)
    h = kmodel.fit(images[order], one_hot[order], batch_size=train.batch_size, epochs=epoch + 1,
                   initial_epoch=epoch, shuffle=False, verbose=0,
                   callbacks=[LastBatch(order, epoch)])
    history.loss.append(h.history["loss"][-1])
    history.accuracy.append(h.history["accuracy"][-1])
    history.permutations.append(order)
    on_epoch(epoch, history, kmodel, state["last_batch"])
  return kmodel, one_hot, history, state


def diagnose(data: DataConfig, model: ModelConfig, train: TrainConfig, *, out_dir: str,
             impl: str = "raw", trace: bool = False, fix: Optional[str] = None, every: int = 0,
             config: Optional[dict] = None, progress: bool = True) -> dict:
  """Trains the seed setup (raw, or real Keras ``fit``), then splits ``evaluate - fit``.

  ``every`` > 0 also computes the decomposition every that many epochs ("over time").
  Writes ``diagnosis.json`` (and ``fixed/`` with ``fix="precise_bn"``); returns its dict.
  """
  from bnraw import diagnose as dg
  parts = setup(data, model, train)
  io.prepare_out_dir(out_dir)
  mode = loop.resolve_mode(train.mode)
  printer = EpochProgress(train.epochs, label=impl) if progress else None
  over_time: list[dict] = []
  board = None
  if trace:
    from bnraw.summaries import TensorBoardWriter
    board = TensorBoardWriter(out_dir, [layer.name for layer in parts.model.bns], model.epsilon)
  wants = lambda epoch: every and (epoch + 1) % every == 0 and epoch + 1 < train.epochs

  def record_over_time(epoch, result):
    row = {"epoch": epoch + 1, "losses": result["losses"], "attribution": result["attribution"]}
    over_time.append(row)
    if board is not None:
      board.scalars(epoch + 1, {f"diagnosis/{k}": v for k, v in result["losses"].items()
                                if v is not None})

  if impl == "raw":
    watcher = dg.StatisticsWatcher(parts.model)
    recorders = [watcher]
    if trace:
      from bnraw.trace import TraceRecorder
      recorder = TraceRecorder([layer.name for layer in parts.model.bns], model.epsilon)
      recorders += [recorder, board.step]

    def raw_diagnosis(history):
      return dg.diagnose_raw(parts.model, parts.data.images, parts.data.labels,
                             batch_size=train.batch_size, fit_loss=history.loss[-1],
                             fit_accuracy=history.accuracy[-1],
                             last_order=history.permutations[-1], watcher=watcher)

    def on_epoch(epoch, history):
      if printer:
        printer(epoch, history)
      if wants(epoch):
        record_over_time(epoch, raw_diagnosis(history))

    history = loop.fit(parts.model, parts.optimizer, parts.data.images, parts.data.labels,
                       batch_size=train.batch_size, epochs=train.epochs, seed=train.seed,
                       mode=mode, trace=True, on_step=lambda r: [f(r) for f in recorders],
                       on_epoch=on_epoch)
    result = raw_diagnosis(history)
    if trace:
      recorder.save(os.path.join(out_dir, "trace.npz"))
  elif impl == "keras":
    def keras_diagnosis(kmodel, one_hot, history, last_batch):
      return dg.diagnose_keras(kmodel, parts.data.images, one_hot, batch_size=train.batch_size,
                               fit_loss=history.loss[-1], fit_accuracy=history.accuracy[-1],
                               last_order=history.permutations[-1],
                               last_batch_statistics=last_batch)

    def on_epoch(epoch, history, kmodel, last_batch):
      if printer:
        printer(epoch, history)
      if wants(epoch):
        record_over_time(epoch, keras_diagnosis(kmodel, one_hot_all, history, last_batch))

    one_hot_all = np.eye(256, dtype=np.float32)[parts.data.labels]
    kmodel, one_hot, history, state = _keras_train(
        parts, model, train, mode, on_epoch,
        need_last_batch=lambda e: e + 1 == train.epochs or wants(e))
    result = keras_diagnosis(kmodel, one_hot, history, state["last_batch"])
  else:
    raise UsageError("impl", f"must be raw or keras, got {impl!r}")

  precise = result.pop("precise_statistics")
  out = {"config": config if config is not None else {
            **vars(data), **vars(model), **vars(train), "impl": impl, "out_dir": out_dir},
         "impl": impl, "resolved": {"width": model.width, "mode": mode},
         "environment": environment(), **result, "over_time": over_time,
         "history": {"loss": history.loss, "accuracy": history.accuracy}}
  if fix == "precise_bn":
    if impl == "raw":
      out["fixed"] = _fix_raw(parts, precise, out_dir, train.batch_size, mode)
    else:
      out["fixed"] = _fix_keras(kmodel, precise, parts.data.images, one_hot_all,
                                train.batch_size, out_dir)
  if board is not None:
    board.close()
  io.write_json(os.path.join(out_dir, "diagnosis.json"), out)
  return out


def _fix_keras(kmodel, precise, x, y, batch_size: int, out_dir: str) -> dict:
  """PreciseBN statistics into the Keras model's BN layers; saves ``fixed.keras``; evaluates."""
  from bnraw.diagnose import keras_loss
  from bnraw.precise_bn import keras_bn_layers
  for layer, stats in zip(keras_bn_layers(kmodel), precise):
    layer.moving_mean.assign(np.asarray(stats.mean, np.float32))
    layer.moving_variance.assign(np.asarray(stats.variance, np.float32))
  loss, accuracy = keras_loss(kmodel, x, y, batch_size, training=False)
  path = os.path.join(out_dir, "fixed.keras")
  tmp = os.path.join(out_dir, ".tmp-fixed.keras")
  kmodel.save(tmp)
  os.replace(tmp, path)
  return {"method": "precise_bn", "evaluate": {"loss": loss, "accuracy": accuracy},
          "saved": path}


def load_keras_inputs(model_path: str, data_path: str):
  """A user's trained ``.keras`` model and its ``.npz`` data (arrays ``x``, ``y``), checked."""
  import keras
  from bnraw.precise_bn import keras_bn_layers
  if not os.path.isfile(model_path):
    raise UsageError("keras_model", f"no such file: {model_path}")
  try:
    kmodel = keras.models.load_model(model_path)
  except Exception as e:  # Keras raises many types for a bad file
    raise UsageError("keras_model", f"cannot load {model_path}: {str(e).splitlines()[0]}") from None
  if not keras_bn_layers(kmodel):
    raise UsageError("keras_model", f"{model_path} has no BatchNormalization layer")
  if getattr(kmodel, "loss", None) is None:
    raise UsageError("keras_model", f"{model_path} was saved without a compiled loss "
                     "(compile it before model.save)")
  if not os.path.isfile(data_path):
    raise UsageError("data", f"no such file: {data_path}")
  try:
    with np.load(data_path) as arrays:
      x, y = arrays["x"], arrays["y"]
  except KeyError:
    raise UsageError("data", f"{data_path} needs arrays named x and y") from None
  except Exception as e:
    raise UsageError("data", f"cannot read {data_path}: {str(e).splitlines()[0]}") from None
  expected = tuple(kmodel.inputs[0].shape[1:])
  if len(x) != len(y) or len(x) == 0:
    raise UsageError("data", f"x has {len(x)} examples and y {len(y)}; need the same, > 0")
  if len(expected) != x.ndim - 1 or any(e is not None and e != a for e, a in
                                        zip(expected, x.shape[1:])):
    raise UsageError("data", f"x examples have shape {x.shape[1:]}, the model takes "
                     f"{expected}")
  return kmodel, x.astype(np.float32), y


def diagnose_keras_model(model_path: str, data_path: str, *, batch_size: int, out_dir: str,
                         fix: Optional[str] = None, config: Optional[dict] = None) -> dict:
  """The decomposition for a user's own trained Keras model: ``evaluate``, ``train_mode_final``,
  ``precise_bn`` and the per-layer split (the rest needs the training history)."""
  from bnraw import diagnose as dg
  kmodel, x, y = load_keras_inputs(model_path, data_path)
  io.prepare_out_dir(out_dir)
  batch_size = min(batch_size, len(x))
  result = dg.diagnose_keras(kmodel, x, y, batch_size=batch_size)
  precise = result.pop("precise_statistics")
  out = {"config": config or {"keras_model": model_path, "data": data_path,
                              "batch_size": batch_size, "out_dir": out_dir},
         "impl": "keras_model", "environment": environment(), **result}
  if fix == "precise_bn":
    out["fixed"] = _fix_keras(kmodel, precise, x, y, batch_size, out_dir)
  io.write_json(os.path.join(out_dir, "diagnosis.json"), out)
  return out
