"""The diagnose tool: train (raw or real Keras fit), decompose, optionally fix; and the same for
a user's own trained Keras model. Plain typed values in, the diagnosis.json dict out (written
into ``out_dir``); :mod:`bnraw.diagnosis.explain` turns it into text."""

from __future__ import annotations

import contextlib
import dataclasses
import fractions
import os
import sys
from typing import Callable, NamedTuple, Optional

import numpy as np
import tensorflow as tf

from bnraw import machine, outputs
from bnraw.config import HISTOGRAM_EVERY, ModelConfig, TrainConfig
from bnraw.core import autotune, batching, loop, optim, step
from bnraw.core.layers import BATCH
from bnraw.diagnosis import board as diagnosis_board
from bnraw.diagnosis import decompose as dg
from bnraw.diagnosis.precise_bn import precise_bn_data
from bnraw.models.keras_bridge import keras_bn_layers, metric_of, set_keras_moving_statistics
from bnraw.errors import UsageError
from bnraw.models import keras_bridge, seed, user
from bnraw.models.user import KERAS_FIT_BATCH_SIZE
from bnraw.models.workload import Workload
from bnraw.progress import EpochProgress


def _fix_raw(workload: Workload, precise, out_dir: str, mode: str) -> dict:
  """Writes PreciseBN statistics into the moving statistics, saves a checkpoint, evaluates."""
  for layer, stats in zip(workload.batch_norms, precise):
    layer.set_moving_statistics(stats)
  loss, accuracy = loop.evaluate(workload.model, workload.images, workload.labels,
                                 batch_size=workload.train.batch_size, mode=mode)
  checkpoint = tf.train.Checkpoint(**{v.name.split(":")[0].replace("/", "."): v
                                      for v in workload.model.variables})
  path = checkpoint.write(os.path.join(out_dir, "fixed", "ckpt"))
  return {"method": "precise_bn", "evaluate": {"loss": loss, "accuracy": accuracy},
          "saved": path}


def _keras_train(workload: Workload, mode: str, on_epoch: Callable,
                 need_last_batch: Callable[[int], bool]):
  """Real Keras ``fit`` from the raw initial weights, replaying the raw batch order. Before the
  last step of each epoch where ``need_last_batch(epoch)``, the batch statistics Keras is about to
  use are computed by the raw forward pass on a copy of Keras's weights (bit-identical to Keras's
  own forward, see compare)."""
  import keras
  train = workload.train
  kmodel = workload.keras_model(jit_compile=(mode == "xla"))
  images = workload.images
  state = {"last_batch": None}
  history = loop.History()

  class LastBatch(keras.callbacks.Callback):

    def __init__(self, epoch, order):
      super().__init__()
      self.order, self.epoch = order, epoch
      self.last = len(batching.batches(order, train.batch_size)) - 1

    def on_train_batch_begin(self, batch, logs=None):
      if batch == self.last and need_last_batch(self.epoch):
        workload.set_raw_state(workload.keras_state(kmodel))
        index = self.order[batch * train.batch_size:]
        out = workload.model(tf.constant(images[index]), training=False, statistics=BATCH)
        state["last_batch"] = [(s.mean.numpy(), s.variance.numpy()) for s in out.statistics]

  def after_epoch(epoch, order, keras_history):
    history.loss.append(keras_history.history["loss"][-1])
    history.accuracy.append(keras_history.history["accuracy"][-1])
    history.permutations.append(order)
    on_epoch(epoch, history, kmodel, state["last_batch"])

  keras_bridge.fit_replaying(kmodel, images, workload.keras_labels,
                          batching.epoch_orders(train.seed, len(images)),
                          batch_size=train.batch_size, epochs=train.epochs,
                          callbacks_for=lambda epoch, order: [LastBatch(epoch, order)],
                          after_epoch=after_epoch)
  return kmodel, history, state["last_batch"]


def run(workload: Workload, *, out_dir: str, impl: str = "raw", trace: bool = False,
        fix: Optional[str] = None, every: int = 0, progress: bool = True,
        overwrite: bool = False, histogram_every: int = HISTOGRAM_EVERY,
        tensorboard: bool = True, precise_bn_batches: Optional[int] = None) -> dict:
  """Trains the workload (its raw side, or for the seed ``impl="keras"``: real Keras ``fit``),
  then splits ``evaluate - fit`` into named causes.

  ``every`` > 0 also computes the decomposition every that many epochs ("over time").
  Writes ``diagnosis.json`` (and ``fixed/`` with ``fix="precise_bn"``: a user's model
  ``fixed.keras``), and with ``tensorboard`` the diagnosis as TensorBoard charts, text and
  images (:mod:`bnraw.diagnosis.board`); returns the dict. On replicas: the decomposition of
  :mod:`bnraw.diagnosis.replicas`. ``precise_bn_batches``: PreciseBN's statistics from the
  data's first that many batches (None: all of it).
  """
  train = workload.train
  check_precise_bn_batches(precise_bn_batches)
  if impl not in ("raw", "keras"):
    raise UsageError("impl", f"must be raw or keras, got {impl!r}")
  if impl == "keras" and train.steps_per_execution > 1:
    raise UsageError("steps_per_execution", "> 1 needs impl raw: Keras's diagnosis reads the "
                     "model before each epoch's last step, which a multi-step execution hides")
  if trace and impl != "raw":
    raise UsageError("trace", "records the raw step's statistics: it needs impl raw")
  if fix not in (None, "precise_bn"):
    raise UsageError("fix", f"must be precise_bn, got {fix!r}")
  if histogram_every < 1:
    raise UsageError("histogram_every", f"must be >= 1, got {histogram_every}")
  if workload.strategy is not None:  # the replicated run and its extra part
    from bnraw.diagnosis import replicas
    if impl != "raw" or trace or every:
      raise UsageError("replicas", "diagnoses a raw run at its end for now (no --impl=keras, "
                       "--trace or --every)")
    return replicas.run(workload, out_dir=out_dir, fix=fix, overwrite=overwrite,
                        progress=progress, precise_bn_batches=precise_bn_batches)
  if workload.source == "keras_model":
    if impl != "raw" or trace or every:
      raise UsageError("keras_model", "diagnoses the twin's raw run at its end (no impl keras, "
                       "trace or every)")
    return _run_twin(workload, out_dir=out_dir, fix=fix, overwrite=overwrite,
                     tensorboard=tensorboard, progress=progress,
                     precise_bn_batches=precise_bn_batches)
  return _run_seed(workload, out_dir=out_dir, impl=impl, trace=trace, fix=fix, every=every,
                   progress=progress, overwrite=overwrite, histogram_every=histogram_every,
                   tensorboard=tensorboard, precise_bn_batches=precise_bn_batches)


def check_precise_bn_batches(batches: Optional[int]) -> None:
  if batches is not None and batches < 1:
    raise UsageError("precise_bn_batches", f"must be >= 1, got {batches}")


def _run_seed(workload: Workload, *, out_dir, impl, trace, fix, every, progress, overwrite,
              histogram_every, tensorboard, precise_bn_batches) -> dict:
  """:func:`run` for the seed on one device."""
  data, model, train = workload.data_config, workload.model_config, workload.train
  outputs.prepare_out_dir(out_dir, overwrite=overwrite)
  compiled, tuning = None, None
  if impl == "raw":  # auto: measured on this machine (Keras's side keeps its static guess)
    choice = machine.choose_mode(workload.model, workload.optimizer, workload.images,
                                 workload.labels, mode=train.mode, batch_size=train.batch_size,
                                 trace=True, workload=workload.tuning_key)
    mode, tuning = choice.mode, choice.record
    compiled = compile_raw(workload.model, workload.optimizer, workload.images, mode,
                           train.batch_size, train_step=choice.step_fn)
    if progress and tuning:
      print(autotune.describe(tuning), file=sys.stderr)
  else:
    mode = step.resolve_mode(train.mode)
  one_hot = workload.keras_labels
  printer = (EpochProgress(train.epochs, label=impl, steps_per_epoch=batching.steps_per_epoch(
      len(workload.images), train.batch_size)) if progress else None)
  names = workload.bn_names
  title = (f"case {data.case}, width {fractions.Fraction(model.width).limit_denominator(4096)}, "
           f"momentum {model.momentum:g}, batch {train.batch_size}, {train.epochs} epochs, "
           f"{impl} ({mode})")
  over_time: list[dict] = []
  wants = lambda epoch: every and (epoch + 1) % every == 0 and epoch + 1 < train.epochs
  with contextlib.ExitStack() as stack:
    board = None
    if tensorboard or trace:
      from bnraw.tracing.tensorboard import TensorBoardWriter
      board = stack.enter_context(TensorBoardWriter(out_dir, names, model.epsilon,
                                                    histogram_every))

    def record_over_time(epoch, result):
      over_time.append({"epoch": epoch + 1, "losses": result["losses"],
                        "attribution": result["attribution"]})
      if board is not None and tensorboard:
        board.scalars(epoch + 1, diagnosis_board.scalars(result))

    if impl == "raw":
      recorders = []
      if trace:
        from bnraw.tracing.store import TRACE_FILE, TraceRecorder
        recorder = TraceRecorder(names, model.epsilon)
        recorders += [recorder, board.step]

      def on_epoch(epoch, history, diagnose_now):
        if printer:
          printer(epoch, history)
        if wants(epoch):
          record_over_time(epoch, diagnose_now())

      result, history = diagnose_raw_training(workload.model, workload.optimizer,
                                              workload.images, workload.labels, train, mode,
                                              recorders=recorders, on_epoch=on_epoch,
                                              compiled=compiled,
                                              precise_bn_batches=precise_bn_batches)
      if trace:
        recorder.save(os.path.join(out_dir, TRACE_FILE))
    else:
      def keras_diagnosis(kmodel, history, last_batch):
        result = dg.diagnose_keras(kmodel, workload.images, one_hot,
                                   batch_size=train.batch_size, fit_loss=history.loss[-1],
                                   precise_bn_batches=precise_bn_batches,
                                   fit_accuracy=history.accuracy[-1],
                                   last_order=history.permutations[-1],
                                   last_batch_statistics=last_batch)
        result.pop("metric")  # the seed's accuracy, as the raw impl reports it
        return result

      def on_epoch(epoch, history, kmodel, last_batch):
        if printer:
          printer(epoch, history)
        if wants(epoch):
          record_over_time(epoch, keras_diagnosis(kmodel, history, last_batch))

      kmodel, history, last_batch = _keras_train(
          workload, mode, on_epoch,
          need_last_batch=lambda e: e + 1 == train.epochs or wants(e))
      result = keras_diagnosis(kmodel, history, last_batch)
    if impl == "keras" and isinstance(workload.optimizer, optim.LossScale):  # no history
      steps = train.epochs * batching.steps_per_epoch(len(workload.images), train.batch_size)
      result["loss_scaling"] = {
          "steps": steps, "skipped_steps": steps - int(kmodel.optimizer.iterations.numpy()),
          "evaluate_without_skipped_updates": None, "skipped_updates_cost": None}
    if model.dtype_policy != "float32":
      weights = (workload.model.variables if impl == "raw"
                 else keras_bridge.model_weights(kmodel))
      result["precision"] = _precision(model, train, weights, result["precise_statistics"],
                                       workload.images, precise_bn_batches)
    if board is not None and tensorboard:
      layers = workload.batch_norms if impl == "raw" else keras_bn_layers(kmodel)
      diagnosis_board.write(board, result, epoch=train.epochs, title=title,
                            amplification=diagnosis_board.amplification(layers))

  precise = result.pop("precise_statistics")
  out = {"config": workload.recorded(impl=impl, trace=trace, fix=fix, every=every),
         "impl": impl, "title": title, "resolved": {"width": model.width, "mode": mode},
         "autotune": tuning,
         "environment": outputs.environment(), **result, "over_time": over_time,
         "precise_bn_data": precise_bn_data(len(workload.images), train.batch_size,
                                            precise_bn_batches),
         "history": {"loss": history.loss, "accuracy": history.accuracy}}
  if fix == "precise_bn":
    if impl == "raw":
      out["fixed"] = _fix_raw(workload, precise, out_dir, mode)
    else:
      out["fixed"] = _fix_keras(kmodel, precise, workload.images, one_hot, train.batch_size,
                                out_dir)
  outputs.write_json(os.path.join(out_dir, "diagnosis.json"), out)
  return out


def _precision(model: ModelConfig, train: TrainConfig, weights, precise, images,
               precise_bn_batches: Optional[int] = None) -> dict:
  """How far the policy's rounding moves the statistics: this run's PreciseBN statistics
  against a float32 twin's with the same ``weights`` (:mod:`bnraw.diagnosis.precision`)."""
  from bnraw.diagnosis.precise_bn import raw_population_statistics
  from bnraw.diagnosis.precision import statistics_vs_float32
  twin = seed.seed_network(dataclasses.replace(model, dtype_policy="float32"), seed=train.seed)
  for target, value in zip(twin.variables, weights):
    target.assign(value.numpy())
  float32 = raw_population_statistics(twin, images, train.batch_size,
                                      most=precise_bn_batches)
  return {"dtype_policy": model.dtype_policy,
          "statistics_vs_float32": statistics_vs_float32(
              [layer.name for layer in twin.batch_norms], precise, float32)}


class Compiled(NamedTuple):
  """The compiled functions a raw diagnosis runs: reusable across runs that re-initialise the
  same model and optimizer (a sweep), so each shape is traced once."""

  train_step: Callable
  forward_loss: Callable
  population_forward: Callable


def compile_raw(model, optimizer, images: np.ndarray, mode: str, batch_size: int,
                train_step: Optional[Callable] = None) -> Compiled:
  """``train_step``: the traced train step already compiled (by autotune), else made here."""
  from bnraw.diagnosis.precise_bn import population_forward_fn
  train_step = train_step or step.make_train_step(
      model, optimizer, mode=mode, trace=True,
      relax_batch=step.relaxed_batch(len(images), batch_size))
  return Compiled(train_step, dg.forward_loss_fn(model), population_forward_fn(model))


def diagnose_raw_training(model, optimizer, images: np.ndarray, labels: np.ndarray,
                          train: TrainConfig, mode: str, *, recorders=(),
                          on_epoch: Optional[Callable] = None,
                          compiled: Optional[Compiled] = None,
                          precise_bn_batches: Optional[int] = None):
  """Raw training with what the decomposition needs watched, then the decomposition at the
  end; returns ``(result, history)``. ``on_epoch(epoch, history, diagnose_now)`` may call
  ``diagnose_now()`` for the decomposition at that epoch. A non-finite step raises."""
  watcher = dg.StatisticsWatcher(model, example=images[:1])
  compiled = compiled or compile_raw(model, optimizer, images, mode, train.batch_size)

  def diagnose_now(history):
    return dg.diagnose_raw(model, images, labels,
                           batch_size=train.batch_size, fit_loss=history.loss[-1],
                           fit_accuracy=history.accuracy[-1],
                           last_order=history.permutations[-1], watcher=watcher,
                           forward_loss=compiled.forward_loss,
                           population_forward=compiled.population_forward,
                           precise_bn_batches=precise_bn_batches)

  history = loop.fit(
      model, optimizer, images, labels,
      batch_size=train.batch_size, epochs=train.epochs, seed=train.seed, mode=mode, trace=True,
      on_step=lambda r: [f(r) for f in (watcher, *recorders)],
      on_epoch=(lambda e, h: on_epoch(e, h, lambda: diagnose_now(h))) if on_epoch else None,
      step_fn=compiled.train_step, steps_per_execution=train.steps_per_execution)
  if history.status == "non_finite":
    raise history.error
  return diagnose_now(history), history


def _fix_keras(kmodel, precise, x, y, batch_size: int, out_dir: str) -> dict:
  """PreciseBN statistics into the Keras model's BN layers; saves ``fixed.keras``; evaluates."""
  for layer, stats in zip(keras_bn_layers(kmodel), precise):
    set_keras_moving_statistics(layer, stats)
  loss, accuracy = dg.keras_loss(kmodel, x, y, batch_size, training=False)
  return {"method": "precise_bn", "evaluate": {"loss": loss, "accuracy": accuracy},
          "saved": user.save_model(kmodel, os.path.join(out_dir, "fixed.keras"))}


DROPOUT_SEED = 0  # the noise layers' seed for the dropout part: the same masks on every run


def _dropout_block(layers: list, with_noise: float, result: dict) -> dict:
  """The ``dropout`` paragraph: the training branch with the noise layers on, and how far it is
  from ``train_mode_final`` (which runs without them)."""
  return {"layers": layers, "train_mode_with_dropout": with_noise,
          "effect": with_noise - result["losses"]["train_mode_final"]}


def _raw_dropout_part(model, images, labels, batch_size: int, order) -> float:
  """The training branch at the final weights *with* the model's dropout on (BN in its training
  branch without updates, masks from every noise layer's seed generator set to
  ``[DROPOUT_SEED, 0]``, so the same on every run; its state is put back)."""
  saved = [v.numpy() for v in model.state_variables]
  for v in model.state_variables:
    v.assign(tf.constant([DROPOUT_SEED, 0], v.dtype))

  @tf.function(autograph=False)
  def with_dropout(x, y):
    logits = model(x, training=True, statistics=BATCH).logits
    return model.loss(logits, y), model.correct(logits, y)

  try:
    return batching.mean_over_batches(
        lambda xb, yb: with_dropout(tf.constant(xb), tf.constant(yb)),
        dg.batch_chunks(len(images), batch_size, order), (images, labels),
        what="training branch with dropout")[0]
  finally:
    for v, value in zip(model.state_variables, saved):
      v.assign(value)


def _run_twin(workload: Workload, *, out_dir: str, fix: Optional[str], overwrite: bool,
              tensorboard: bool, progress: bool,
              precise_bn_batches: Optional[int] = None) -> dict:
  """The full decomposition for a user's model, with history: its raw twin continues training
  ``train.epochs`` epochs from the saved state (fit-faithful: the model's optimizer, loss and
  metric), then the five-way split as for the seed. Frozen BN layers keep their statistics in
  every part and in the fix; dropout is priced apart (``dropout``: the BN parts run without
  it). ``fix="precise_bn"`` writes ``fixed.keras``."""
  train, twin = workload.train, workload.twin
  model_path, data_path = workload.paths
  if train.epochs < 1:
    raise UsageError("epochs", f"must be >= 1 to train the twin, got {train.epochs}")
  outputs.prepare_out_dir(out_dir, overwrite=overwrite)
  raw, images, labels = workload.model, workload.images, workload.labels
  choice = machine.choose_mode(raw, workload.optimizer, images, labels, mode=train.mode,
                               batch_size=train.batch_size, trace=True,
                               workload=workload.tuning_key)
  mode = choice.mode
  if progress and choice.record:
    print(autotune.describe(choice.record), file=sys.stderr)
  compiled = compile_raw(raw, workload.optimizer, images, mode, train.batch_size,
                         train_step=choice.step_fn)
  printer = (EpochProgress(train.epochs, label="raw twin", steps_per_epoch=batching.steps_per_epoch(
      len(images), train.batch_size)) if progress else None)
  result, history = diagnose_raw_training(
      raw, workload.optimizer, images, labels, train, mode, compiled=compiled,
      precise_bn_batches=precise_bn_batches,
      on_epoch=(lambda epoch, h, now: printer(epoch, h)) if printer else None)
  y_pred = twin.kmodel(images[:2], training=False)
  result["metric"] = (metric_of(twin.kmodel, labels[:2], y_pred)
                      if twin.metric_name else None)
  if not twin.metric_name:  # no metric column (the loop counted zeros)
    result["accuracy"] = {key: None for key in result["accuracy"]}
  result["frozen"] = [layer.name for layer in raw.batch_norms if not layer.trainable]
  if raw.state_variables:  # dropout: what it adds to the training branch, apart from BN
    with_noise = _raw_dropout_part(raw, images, labels, train.batch_size,
                                   history.permutations[-1])
    result["dropout"] = _dropout_block(
        [layer.name for layer in raw.layers if getattr(layer, "state_variables", ())],
        with_noise, result)
  title = (f"{model_path} on {data_path}, raw twin trained {train.epochs} more epochs, batch "
           f"{train.batch_size} ({mode})")
  if tensorboard:
    from bnraw.tracing.tensorboard import TensorBoardWriter
    names = [layer.name for layer in raw.batch_norms]
    with TensorBoardWriter(out_dir, names, [l.epsilon for l in raw.batch_norms]) as board:
      diagnosis_board.write(board, result, epoch=train.epochs, title=title,
                            amplification=diagnosis_board.amplification(raw.batch_norms))
  precise = result.pop("precise_statistics")
  out = {"config": workload.recorded(fix=fix),
         "impl": "raw_twin", "title": title, "resolved": {"mode": mode},
         "autotune": choice.record, "environment": outputs.environment(), **result,
         "precise_bn_data": precise_bn_data(len(images), train.batch_size, precise_bn_batches),
         "history": {"loss": history.loss,
                     "accuracy": history.accuracy if twin.metric_name else None}}
  if fix == "precise_bn":
    for layer, stats in zip(raw.batch_norms, precise):
      if layer.trainable:  # frozen layers: fit used their statistics, the head was fit to them
        layer.set_moving_statistics(stats)
    loss, metric = loop.evaluate(raw, images, labels, batch_size=train.batch_size, mode=mode)
    out["fixed"] = {"method": "precise_bn",
                    "evaluate": {"loss": loss, "accuracy": metric if twin.metric_name else None},
                    "saved": workload.save_keras(os.path.join(out_dir, "fixed.keras"))}
  outputs.write_json(os.path.join(out_dir, "diagnosis.json"), out)
  return out


def run_saved(model_path: str, data_path: str, *, batch_size: Optional[int],
              out_dir: str, fix: Optional[str] = None, overwrite: bool = False,
              tensorboard: bool = True, image_size: Optional[tuple] = None,
              precise_bn_batches: Optional[int] = None) -> dict:
  """The decomposition for a user's own trained Keras model: ``evaluate``, ``train_mode_final``,
  ``precise_bn`` and the per-layer split (the rest needs the training history); with
  ``tensorboard`` also as TensorBoard charts, text and images. ``batch_size`` None: Keras
  ``fit``'s default, 32 (capped at the number of examples). ``image_size``: the size a folder
  of images is read at, for a model that takes any; ``precise_bn_batches``: PreciseBN's
  statistics from the data's first that many batches (None: all of it)."""
  if fix not in (None, "precise_bn"):
    raise UsageError("fix", f"must be precise_bn, got {fix!r}")
  check_precise_bn_batches(precise_bn_batches)
  given = batch_size is not None
  batch_size = batch_size if given else KERAS_FIT_BATCH_SIZE
  if batch_size < 1:
    raise UsageError("batch_size", f"must be >= 1, got {batch_size}")
  kmodel = user.load_keras_model(model_path)
  x, y = user.load_data(data_path, kmodel, image_size)
  outputs.prepare_out_dir(out_dir, overwrite=overwrite)
  batch_size = min(batch_size, len(x))
  # train_mode_final on shuffled batches, as fit would draw them (sorted data would put similar
  # examples together and give batch statistics no training step ever saw); data read as a
  # dataset: the batches fit draws from it (a saved dataset's own order)
  shuffled = next(batching.data_orders(0, x, batch_size))
  from bnraw.models.keras_bridge import noise_layers, quiet_clone, seeded_clone
  noise = noise_layers(kmodel)
  # with dropout the training branch is random and not BN's: the parts use a copy without it
  result = dg.diagnose_keras(quiet_clone(kmodel) if noise else kmodel, x, y,
                             batch_size=batch_size, last_order=shuffled,
                             precise_bn_batches=precise_bn_batches)
  if noise:  # what dropout adds to the training branch, apart from BN
    with_noise = dg.keras_loss(seeded_clone(kmodel, DROPOUT_SEED), x, y, batch_size,
                               training=True, order=shuffled)[0]
    result["dropout"] = _dropout_block(noise, with_noise, result)
  # frozen layers ran their inference branch in fit: PreciseBN and the fix keep their statistics
  result["frozen"] = [layer.name for layer in keras_bn_layers(kmodel) if not layer.trainable]
  policy = next((layer.dtype_policy.name for layer in kmodel.layers
                 if layer.compute_dtype != "float32"), "float32")
  if policy != "float32":  # the saved policy: what its rounding does to the statistics
    from bnraw.diagnosis.precise_bn import keras_population_statistics
    from bnraw.diagnosis.precision import keras_twin, statistics_vs_float32
    twin = keras_twin(kmodel)
    if twin is not None:  # (None: a nested model: no float32 twin to compare with)
      float32 = keras_population_statistics(twin, x, batch_size, precise_bn_batches)
      result["precision"] = {
          "dtype_policy": policy, "statistics_vs_float32": statistics_vs_float32(
              [layer.name for layer in keras_bn_layers(kmodel)], result["precise_statistics"],
              float32)}
  title = (f"{model_path} on {data_path}, batch {batch_size}"
           + ("" if given else " (Keras fit's default; --batch_size sets it)"))
  if tensorboard:
    from bnraw.tracing.tensorboard import TensorBoardWriter
    layers = keras_bn_layers(kmodel)
    with TensorBoardWriter(out_dir, [layer.name for layer in layers], 0.0) as board:
      diagnosis_board.write(board, result, epoch=0, title=title,
                            amplification=diagnosis_board.amplification(layers))
  precise = result.pop("precise_statistics")
  out = {"config": {"keras_model": model_path, "data": data_path, "batch_size": batch_size,
                    "fix": fix},
         "impl": "keras_model", "title": title, "environment": outputs.environment(), **result,
         "precise_bn_data": precise_bn_data(len(x), batch_size, precise_bn_batches)}
  if fix == "precise_bn":
    out["fixed"] = _fix_keras(kmodel, precise, x, y, batch_size, out_dir)
  outputs.write_json(os.path.join(out_dir, "diagnosis.json"), out)
  return out
