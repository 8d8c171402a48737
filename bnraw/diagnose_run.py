"""The diagnose flows behind ``bnraw-diagnose``: train (raw or real Keras fit), decompose,
optionally fix; and the same for a user's own trained Keras model. Plain values in, the
diagnosis.json dict out."""

from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from bnraw import diagnose as dg
from bnraw import io, keras_ref, loop
from bnraw.config import NUM_IMAGES, DataConfig, ModelConfig, TrainConfig
from bnraw.errors import UsageError
from bnraw.experiment import Setup, config_dict, environment, setup
from bnraw.progress import EpochProgress


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
                 one_hot: np.ndarray, on_epoch: Callable,
                 need_last_batch: Callable[[int], bool]):
  """Real Keras ``fit`` from the raw initial weights, replaying the raw batch order. Before the
  last step of each epoch where ``need_last_batch(epoch)``, the batch statistics Keras is about to
  use are computed by the raw forward pass on a copy of Keras's weights (bit-identical to Keras's
  own forward, see compare)."""
  import keras
  kmodel = keras_ref.build_model(model)
  keras_ref.compile_model(kmodel, train, jit_compile=(mode == "xla"))
  keras_ref.set_keras_state(kmodel, keras_ref.raw_state(parts.model, parts.optimizer))
  images = parts.data.images
  state = {"last_batch": None}
  history = loop.History()

  class LastBatch(keras.callbacks.Callback):

    def __init__(self, epoch, order):
      super().__init__()
      self.order, self.epoch = order, epoch
      self.last = len(loop.batches(order, train.batch_size)) - 1

    def on_train_batch_begin(self, batch, logs=None):
      if batch == self.last and need_last_batch(self.epoch):
        keras_ref.set_raw_state(parts.model, parts.optimizer, keras_ref.keras_state(kmodel))
        index = self.order[batch * train.batch_size:]
        out = parts.model.forward(tf.constant(images[index]), [None] * len(parts.model.bns))
        state["last_batch"] = [(s.mean.numpy(), s.variance.numpy()) for s in out.statistics]

  def after_epoch(epoch, order, keras_history):
    history.loss.append(keras_history.history["loss"][-1])
    history.accuracy.append(keras_history.history["accuracy"][-1])
    history.permutations.append(order)
    on_epoch(epoch, history, kmodel, state["last_batch"])

  keras_ref.fit_replaying(kmodel, images, one_hot, loop.epoch_orders(train.seed, len(images)),
                          batch_size=train.batch_size, epochs=train.epochs,
                          callbacks_for=lambda epoch, order: [LastBatch(epoch, order)],
                          after_epoch=after_epoch)
  return kmodel, history, state["last_batch"]


def run(data: DataConfig, model: ModelConfig, train: TrainConfig, *, out_dir: str,
        impl: str = "raw", trace: bool = False, fix: Optional[str] = None, every: int = 0,
        config: Optional[dict] = None, progress: bool = True) -> dict:
  """Trains the seed setup (raw, or real Keras ``fit``), then splits ``evaluate - fit``.

  ``every`` > 0 also computes the decomposition every that many epochs ("over time").
  Writes ``diagnosis.json`` (and ``fixed/`` with ``fix="precise_bn"``); returns its dict.
  """
  if impl not in ("raw", "keras"):
    raise UsageError("impl", f"must be raw or keras, got {impl!r}")
  parts = setup(data, model, train)
  io.prepare_out_dir(out_dir)
  mode = loop.resolve_mode(train.mode)
  one_hot = np.eye(NUM_IMAGES, dtype=np.float32)[parts.data.labels]
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
    if history.status == "non_finite":
      raise history.error
    result = raw_diagnosis(history)
    if trace:
      recorder.save(os.path.join(out_dir, "trace.npz"))
  else:
    def keras_diagnosis(kmodel, history, last_batch):
      return dg.diagnose_keras(kmodel, parts.data.images, one_hot, batch_size=train.batch_size,
                               fit_loss=history.loss[-1], fit_accuracy=history.accuracy[-1],
                               last_order=history.permutations[-1],
                               last_batch_statistics=last_batch)

    def on_epoch(epoch, history, kmodel, last_batch):
      if printer:
        printer(epoch, history)
      if wants(epoch):
        record_over_time(epoch, keras_diagnosis(kmodel, history, last_batch))

    kmodel, history, last_batch = _keras_train(
        parts, model, train, mode, one_hot, on_epoch,
        need_last_batch=lambda e: e + 1 == train.epochs or wants(e))
    result = keras_diagnosis(kmodel, history, last_batch)

  precise = result.pop("precise_statistics")
  out = {"config": config if config is not None else config_dict(
             data, model, train, impl=impl, out_dir=out_dir),
         "impl": impl, "resolved": {"width": model.width, "mode": mode},
         "environment": environment(), **result, "over_time": over_time,
         "history": {"loss": history.loss, "accuracy": history.accuracy}}
  if fix == "precise_bn":
    if impl == "raw":
      out["fixed"] = _fix_raw(parts, precise, out_dir, train.batch_size, mode)
    else:
      out["fixed"] = _fix_keras(kmodel, precise, parts.data.images, one_hot, train.batch_size,
                                out_dir)
  if board is not None:
    board.close()
  io.write_json(os.path.join(out_dir, "diagnosis.json"), out)
  return out


def _fix_keras(kmodel, precise, x, y, batch_size: int, out_dir: str) -> dict:
  """PreciseBN statistics into the Keras model's BN layers; saves ``fixed.keras``; evaluates."""
  from bnraw.precise_bn import keras_bn_layers
  for layer, stats in zip(keras_bn_layers(kmodel), precise):
    layer.moving_mean.assign(np.asarray(stats.mean, np.float32))
    layer.moving_variance.assign(np.asarray(stats.variance, np.float32))
  loss, accuracy = dg.keras_loss(kmodel, x, y, batch_size, training=False)
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


def run_keras_model(model_path: str, data_path: str, *, batch_size: int, out_dir: str,
                    fix: Optional[str] = None, config: Optional[dict] = None) -> dict:
  """The decomposition for a user's own trained Keras model: ``evaluate``, ``train_mode_final``,
  ``precise_bn`` and the per-layer split (the rest needs the training history)."""
  kmodel, x, y = load_keras_inputs(model_path, data_path)
  io.prepare_out_dir(out_dir)
  batch_size = min(batch_size, len(x))
  # train_mode_final on shuffled batches, as fit would draw them (sorted data would put similar
  # examples together and give batch statistics no training step ever saw)
  shuffled = np.random.default_rng(0).permutation(len(x))
  result = dg.diagnose_keras(kmodel, x, y, batch_size=batch_size, last_order=shuffled)
  precise = result.pop("precise_statistics")
  out = {"config": config or {"keras_model": model_path, "data": data_path,
                              "batch_size": batch_size, "out_dir": out_dir},
         "impl": "keras_model", "environment": environment(), **result}
  if fix == "precise_bn":
    out["fixed"] = _fix_keras(kmodel, precise, x, y, batch_size, out_dir)
  io.write_json(os.path.join(out_dir, "diagnosis.json"), out)
  return out
