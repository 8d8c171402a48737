"""The Keras side, in one module: the seed's network as real Keras layers, state transfer
between a Keras model and its raw twin, recompiling, and reading or writing any Keras model (its
BN layers' moving statistics, its compiled metrics, its noise layers, quiet and seeded clones).

The seed's Keras model is ``model_toy`` as the seed wrote it: a Sequential of
``Conv2D -> Activation('relu') -> BatchNormalization`` blocks, ``Flatten``, ``Dense``,
``Activation('relu')``, ``BatchNormalization``, ``Dense``, ``Activation('softmax')``, compiled with
categorical cross-entropy and accuracy. ``model.weights`` has the same order as the raw model's
``variables``, and the optimizer slots the same order as its ``trainable_variables``, so every
transfer is by position (shapes are checked). The raw side's BN layers are written like any other
variable here: state transfer copies whole variables, it does not run either model.

``reference="tf_keras"`` builds the same model with the optional ``tf_keras`` package (Keras 2).

A mixed dtype policy is given to every layer as the seed's user would: the global policy set
while the model is built (and put back after); ``compile`` then wraps the optimizer in a
``LossScaleOptimizer`` under mixed_float16, whose scale and counter travel with the state.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Sequence

import numpy as np

from bnraw.config import CONV_BLOCKS, IMAGE_SIZE, NUM_IMAGES, ModelConfig, TrainConfig
from bnraw.core.batching import streamed
from bnraw.errors import UsageError

REFERENCES = ("keras3", "tf_keras")
PACKAGE = {"keras3": "keras", "tf_keras": "tf_keras"}


def keras_module(reference: str = "keras3"):
  """The ``keras`` (Keras 3) or ``tf_keras`` (Keras 2) package."""
  if reference == "keras3":
    return importlib.import_module("keras")
  if reference == "tf_keras":
    return importlib.import_module("tf_keras")
  raise ValueError(f"unknown reference {reference!r}; expected one of {REFERENCES}")


def check_comparable(model: ModelConfig, train: TrainConfig, reference: str) -> None:
  """Refuses settings that cannot be compared step by step with ``reference`` (imports no
  TensorFlow: the command line checks it before any work, the library again)."""
  if model.l2 and train.steps_per_execution > 1:
    raise UsageError("l2", "with --steps_per_execution > 1 cannot be compared step by step: "
                     "fit's loss holds the L2 term of the weights before each step, which no "
                     "callback sees inside an execution")
  if reference == "tf_keras" and model.l2:
    raise UsageError("l2", "compares against Keras 3 only (tf_keras sums the regularisation "
                     "into its loss in another order)")
  if reference == "tf_keras" and (train.replicas > 1 or model.sync_bn):
    raise UsageError("reference", "replicas and synchronized BN compare against Keras 3 only")
  if reference == "tf_keras" and model.dtype_policy != "float32":
    raise UsageError("dtype_policy", "mixed precision compares against Keras 3 only (tf_keras "
                     "has another loss scale optimizer)")


def build_model(config: ModelConfig, reference: str = "keras3"):
  """The seed's Sequential ``model_toy`` at ``config.width``, under ``config.dtype_policy``."""
  keras = keras_module(reference)
  before = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(config.dtype_policy)
  try:
    return _build_model(keras, config)
  finally:
    keras.mixed_precision.set_global_policy(before)


def _build_model(keras, config: ModelConfig):
  layers = keras.layers
  regularizer = keras.regularizers.l2(config.l2) if config.l2 else None
  bn = dict(momentum=config.momentum, epsilon=config.epsilon)
  if config.sync_bn:
    bn["synchronized"] = True
  stack: list[Any] = [keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))]
  for i, ((k, _), c) in enumerate(zip(CONV_BLOCKS, config.conv_channels()), start=1):
    stack += [layers.Conv2D(c, k, padding="valid", kernel_regularizer=regularizer,
                            name=f"conv_{i}"),
              layers.Activation("relu"), layers.BatchNormalization(name=f"bn_{i}", **bn)]
  stack += [layers.Flatten(),
            layers.Dense(config.dense_units(), kernel_regularizer=regularizer, name="dense_8"),
            layers.Activation("relu"), layers.BatchNormalization(name="bn_8", **bn),
            layers.Dense(NUM_IMAGES, kernel_regularizer=regularizer, name="dense_9"),
            layers.Activation("softmax")]
  from bnraw.models.seed import MODEL_NAME
  return keras.Sequential(stack, name=MODEL_NAME)


def make_optimizer(train: TrainConfig, reference: str = "keras3"):
  keras = keras_module(reference)
  if train.optimizer == "adam":
    return keras.optimizers.Adam(learning_rate=train.lr)
  return keras.optimizers.SGD(learning_rate=train.lr, momentum=train.sgd_momentum,
                              nesterov=train.nesterov)


def compile_model(model, train: TrainConfig, *, jit_compile: bool, reference: str = "keras3",
                  metrics: Sequence = ()) -> None:
  """``model.compile`` as the seed did, with the optimizer built so its slots exist now (under
  mixed_float16 compile wraps it in a LossScaleOptimizer; ``train.loss_scale`` sets its start)."""
  keras = keras_module(reference)
  optimizer = make_optimizer(train, reference)
  if train.loss_scale is not None:
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=train.loss_scale)
  model.compile(optimizer=optimizer, loss="categorical_crossentropy",
                metrics=["accuracy", *metrics], jit_compile=jit_compile,
                steps_per_execution=train.steps_per_execution)
  model.optimizer.build(model.trainable_variables)


def optimizer_slots(optimizer) -> list[list]:
  """A Keras optimizer's slot lists, in the same layout as ``bnraw.core.optim``'s ``slots``
  (Keras 3's and tf_keras's optimizers name them alike; order = trainable variables; a loss
  scale optimizer's are its inner optimizer's): Adam/AdamW ``[momentums, velocities]`` (+
  ``velocity_hats`` with amsgrad), SGD ``[momentums]`` (none without momentum), RMSprop
  ``[velocities]`` + ``momentums`` (momentum > 0) + ``average_gradients`` (centered)."""
  optimizer = getattr(optimizer, "inner_optimizer", optimizer)
  if hasattr(optimizer, "_average_gradients"):  # RMSprop (also has _momentums, _velocities)
    groups = (optimizer._velocities, optimizer._momentums, optimizer._average_gradients)
    return [list(group) for group in groups if group]
  if hasattr(optimizer, "_momentums") and hasattr(optimizer, "_velocities"):  # Adam, AdamW
    slots = [list(optimizer._momentums), list(optimizer._velocities)]
    if getattr(optimizer, "amsgrad", False):
      slots.append(list(optimizer._velocity_hats))
    return slots
  if hasattr(optimizer, "momentums"):  # SGD
    return [list(optimizer.momentums)] if optimizer.momentums else []
  raise TypeError(f"no slot layout known for {type(optimizer).__name__}")


def weight_key(variable) -> str:
  """``conv_3/kernel`` from Keras 3's ``model_toy/conv_3/kernel`` or tf_keras's
  ``conv_3/kernel:0``."""
  name = getattr(variable, "path", None) or variable.name
  return "/".join(name.split(":")[0].split("/")[-2:])


def model_weights(model) -> list:
  """The Keras model's weights in the raw seed network's ``variables`` order (tf_keras lists
  trainable weights first, Keras 3 layer by layer; both are matched by name)."""
  by_key = {weight_key(v): v for v in model.weights}
  keys = []
  for i in range(1, 9):
    if i <= 7:
      keys += [f"conv_{i}/kernel", f"conv_{i}/bias"]
    else:
      keys += ["dense_8/kernel", "dense_8/bias"]
    keys += [f"bn_{i}/{w}" for w in ("gamma", "beta", "moving_mean", "moving_variance")]
  keys += ["dense_9/kernel", "dense_9/bias"]
  return [by_key[key] for key in keys]


def check_shapes(targets: Sequence, values: Sequence[np.ndarray], what: str) -> None:
  if len(targets) != len(values):
    raise ValueError(f"{what}: {len(targets)} targets for {len(values)} values")
  for target, value in zip(targets, values):
    if tuple(target.shape) != tuple(np.shape(value)):
      raise ValueError(f"{what}: shape {tuple(target.shape)} != {np.shape(value)}")


def assign_all(targets: Sequence, values: Sequence[np.ndarray], what: str) -> None:
  check_shapes(targets, values, what)
  for target, value in zip(targets, values):
    target.assign(value)


def loss_scale_variables(optimizer) -> list:
  """``[dynamic_scale, step_counter]`` of a (raw or Keras) loss scale optimizer, else []."""
  if hasattr(optimizer, "dynamic_scale"):
    return [optimizer.dynamic_scale, optimizer.step_counter]
  return []


def _slots_of(optimizer) -> list[list]:
  return optimizer.slots if hasattr(optimizer, "slots") else optimizer_slots(optimizer)


def get_state(variables: Sequence, optimizer, *, per_replica: bool = False) -> dict:
  """Numpy copies of weights (Keras order), optimizer slots, iteration count and, with loss
  scaling, ``loss_scale``: [scale, counter]. ``per_replica``: every replica's copy of each
  (mirrored) weight in turn, replica order (bnraw.core.replicas.copies)."""
  from bnraw.core.replicas import copies
  slots = _slots_of(optimizer)
  weights = ([c for v in variables for c in copies(v)] if per_replica
             else [np.array(v.numpy()) for v in variables])
  state = {"weights": weights,
           "slots": [[np.array(s.numpy()) for s in group] for group in slots],
           "iterations": int(np.asarray(optimizer.iterations.numpy()))}
  if loss_scale_variables(optimizer):
    state["loss_scale"] = [np.array(v.numpy()) for v in loss_scale_variables(optimizer)]
  return state


def assign_loss_scale(optimizer, state: dict) -> None:
  targets = loss_scale_variables(optimizer)
  if bool(targets) != ("loss_scale" in state):
    raise ValueError("loss scale: one side scales the loss and the other does not")
  for target, value in zip(targets, state.get("loss_scale", ())):
    target.assign(np.asarray(value).astype(target.dtype.name if hasattr(target.dtype, "name")
                                           else target.dtype))


def set_state(variables: Sequence, optimizer, state: dict, *,
              per_replica: bool = False) -> None:
  """Loads a :func:`get_state` state (from either side) into ``variables`` and ``optimizer``
  (raw or Keras); ``per_replica``: the weights hold every replica's copy in turn."""
  if per_replica:
    from bnraw.core.replicas import assign_copies
    n = len(state["weights"]) // max(len(variables), 1)
    groups = [state["weights"][i * n:(i + 1) * n] for i in range(len(variables))]
    check_shapes(variables, [values[0] for values in groups], "weights")
    for variable, values in zip(variables, groups):
      assign_copies(variable, values)
  else:
    assign_all(variables, state["weights"], "weights")
  for group, values in zip(_slots_of(optimizer), state["slots"]):
    assign_all(group, values, "optimizer slots")
  optimizer.iterations.assign(state["iterations"])
  assign_loss_scale(optimizer, state)


def keras_state(model) -> dict:
  return get_state(model_weights(model), model.optimizer)


def raw_state(raw, optimizer) -> dict:
  return get_state(raw.variables, optimizer)


def set_raw_state(raw, optimizer, state: dict) -> None:
  """Loads a state (from either side) into the raw model and its optimizer."""
  set_state(raw.variables, optimizer, state)


def set_keras_state(model, state: dict) -> None:
  """Loads a state (from either side) into the Keras model and its optimizer."""
  set_state(model_weights(model), model.optimizer, state)


def batch_loss_metric(keras, loss_fn=None):
  """A Keras metric holding the last batch's compiled loss, computed with that loss's own ops
  (the regularisation is added outside: a metric runs after the update, see Lockstep).
  ``loss_fn()``: the loss to call (default: the seed's categorical cross-entropy)."""
  import tensorflow as tf

  class BatchLoss(keras.metrics.Metric):

    def __init__(self):
      super().__init__(name="batch_loss")
      self.value = self.add_weight(name="value", shape=(), initializer="zeros")
      self.loss_fn = loss_fn or (lambda: keras.losses.CategoricalCrossentropy())

    def update_state(self, y_true, y_pred, sample_weight=None):
      self.value.assign(self.loss_fn()(y_true, y_pred))

    def result(self):
      return tf.identity(self.value)

    def reset_state(self):
      self.value.assign(0.0)

  return BatchLoss()


def recompile(kmodel, *, jit_compile: bool, steps_per_execution: int,
              metrics: Sequence = ()) -> None:
  """Compiles a user's model again as it was compiled (the same optimizer object, its state
  kept; the same loss and metrics), with the run's jit and steps-per-execution settings, plus
  ``metrics`` (e.g. :func:`batch_loss_metric`, which bnraw.parity's lockstep reads)."""
  config = kmodel._compile_config.config
  compiled = config.get("metrics") or []
  if isinstance(compiled, dict):
    raise UsageError("keras_model", "metrics compiled as a dict are not supported")
  kmodel.compile(optimizer=kmodel.optimizer, loss=config["loss"],
                 loss_weights=config.get("loss_weights"), metrics=[*compiled, *metrics],
                 weighted_metrics=config.get("weighted_metrics"), jit_compile=jit_compile,
                 steps_per_execution=steps_per_execution)


def fit_replaying(model, images: np.ndarray, one_hot: np.ndarray, orders, *, batch_size: int,
                  epochs: int, callbacks_for=None, after_epoch=None) -> None:
  """Real ``model.fit``, one call per epoch, on the examples in the given per-epoch ``orders``
  (``shuffle=False``): Keras sees exactly the batches the raw loop drew, without relying on two
  random generators agreeing. ``callbacks_for(epoch, order)`` supplies that epoch's callbacks;
  ``after_epoch(epoch, order, keras_history)`` runs after it."""
  for epoch in range(epochs):
    order = next(orders)
    history = model.fit(**keras_data(images, one_hot, order, batch_size), epochs=epoch + 1,
                        initial_epoch=epoch, shuffle=False, verbose=0,
                        callbacks=callbacks_for(epoch, order) if callbacks_for else None)
    if after_epoch is not None:
      after_epoch(epoch, order, history)


def keras_data(images, labels, order, batch_size: int) -> dict:
  """What Keras's ``fit`` or ``evaluate`` takes for the examples in ``order``, in batches of
  ``batch_size``: the arrays ``x[order]``, ``y[order]``; or, for images read batch by batch
  (``bnraw.models.data.ImageFolder``), the tf.data dataset of the same batches."""
  if streamed(images):
    return {"x": images.dataset(labels, order, batch_size)}
  return {"x": images[order], "y": labels[order], "batch_size": batch_size}


# -- any Keras model: its BN layers, metrics and noise; quiet and seeded clones ---------------


def keras_bn_layers(model) -> list:
  """Every BatchNormalization layer at the top level of ``model``, in order. A BN layer inside a
  nested model is refused: PreciseBN probes each layer's input from the model's own inputs."""
  found = []
  for layer in model.layers:
    if hasattr(layer, "layers") and keras_bn_layers(layer):
      raise ValueError(f"BatchNormalization inside the nested model {layer.name!r} is not "
                       "supported yet; only top-level BN layers are")
    if type(layer).__name__ in ("BatchNormalization", "SyncBatchNormalization"):
      found.append(layer)
  return found


def set_keras_moving_statistics(layer, statistics) -> None:
  """The Keras-side twin of ``BatchNorm.set_moving_statistics``: replaces a Keras BN layer's
  moving mean and variance (a Keras model's own state; raw models never come here)."""
  for variable, value in zip((layer.moving_mean, layer.moving_variance), statistics):
    variable.assign(np.asarray(value, np.float32))


def compiled_metrics(model) -> list:
  """The metrics a single-output ``model`` was compiled with, flattened as Keras flattens them
  (a list, nested lists, or a dict by output name), as the live objects or identifiers; [] if
  none or unreadable (then the report shows no metric)."""
  import keras
  try:
    live = getattr(model, "_compile_config", None)  # Keras 3 keeps compile's own arguments
    metrics = (live.config if live is not None else model.get_compile_config()).get("metrics")
    return [m for m in keras.tree.flatten(metrics) if m is not None] if metrics else []
  except Exception:  # an unserialisable custom metric: the report goes without one
    return []


def first_metric(model, y, y_pred):
  """A fresh instance of the model's first compiled metric as Keras resolves it
  (``"accuracy"`` becomes binary, sparse-categorical or categorical accuracy from the shapes of
  ``y`` and ``y_pred``); None without one, or when it does not give one number."""
  import keras
  from keras.src.trainers.compile_utils import get_metric
  metrics = compiled_metrics(model)
  if not metrics:
    return None
  first = metrics[0]
  try:
    if isinstance(first, keras.metrics.Metric):  # a live one: a copy with its own state
      first = type(first).from_config(first.get_config())
    metric = get_metric(first, y, y_pred)
    metric.update_state(y, y_pred)
    scalar = np.size(metric.result()) == 1
    metric.reset_state()
  except Exception:  # e.g. a custom metric that cannot be copied
    return None
  return metric if scalar else None


def metric_of(model, y, y_pred) -> Optional[dict]:
  """``{"name", "class"}`` of the report's second column (:func:`first_metric`), e.g.
  ``{"name": "accuracy", "class": "BinaryAccuracy"}``; ``name`` is the key fit logs it under."""
  metric = first_metric(model, y, y_pred)
  return None if metric is None else {"name": metric.name, "class": type(metric).__name__}


NOISE = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "AlphaDropout",
         "GaussianDropout", "GaussianNoise")


def _without_noise(layer):
  """clone_model's layer copy, with training-only noise replaced by an identity."""
  import keras
  if type(layer).__name__ in NOISE:
    return keras.layers.Identity(name=layer.name)
  return layer.__class__.from_config(layer.get_config())


def noise_layers(model) -> list[str]:
  """Names of ``model``'s top-level training-only noise layers (Dropout and kin)."""
  return [layer.name for layer in model.layers if type(layer).__name__ in NOISE]


def _seeded_noise(seed: int):
  def clone(layer):
    config = layer.get_config()
    if type(layer).__name__ in NOISE and "seed" in config:
      config["seed"] = seed
    return layer.__class__.from_config(config)
  return clone


def quiet_clone(model):
  """A copy of ``model`` with its noise layers as identities, compiled with its loss and its
  metrics, holding its weights (moving statistics included), so its training branch is BN's
  alone and deterministic. Python's ``random`` state is put back (Keras seeds new layers from
  it), so cloning changes nothing in the user's run."""
  return _clone(model, _without_noise)


def seeded_clone(model, seed: int = 0):
  """A copy of ``model`` as :func:`quiet_clone`'s, but with its noise layers kept and seeded
  with ``seed``: the same masks every time (a saved model's own noise state is not in the
  file, so its masks differ from one load to the next)."""
  return _clone(model, _seeded_noise(seed))


def _clone(model, clone_function):
  import keras
  import random
  state = random.getstate()
  try:
    clone = keras.models.clone_model(model, clone_function=clone_function)
  finally:
    random.setstate(state)
  clone.compile(loss=model.loss, metrics=compiled_metrics(model) or None)
  clone.set_weights(model.get_weights())
  return clone
