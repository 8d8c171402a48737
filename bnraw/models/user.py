"""A user's own trained Keras model and its data, checked before any work: every problem is one
:class:`UsageError` naming the file (or layer) and what is wrong, never a traceback."""

from __future__ import annotations

import os
import warnings
import zipfile

from typing import Optional

import numpy as np

from bnraw.errors import UsageError

KERAS_FIT_BATCH_SIZE = 32  # model.fit's batch_size when none is given


def load_keras_model(path: str, *, nested_bn: bool = False):
  """The compiled ``.keras`` (or ``.h5``) model at ``path``, with at least one top-level BN
  layer (``nested_bn``: at any depth, for the raw twin), one input, and no layer the CPU cannot
  run."""
  import keras
  if os.path.isdir(path):
    raise UsageError("keras_model", f"{path} is a directory; give the model's .keras file")
  if not os.path.isfile(path):
    raise UsageError("keras_model", f"no such file: {path}")
  if not path.endswith((".keras", ".h5")):
    raise UsageError("keras_model", f"{path} is not a .keras (or .h5) file")
  if path.endswith(".keras") and not zipfile.is_zipfile(path):
    raise UsageError("keras_model", f"{path} is not a valid .keras file (not a zip archive: "
                     "corrupt or truncated?)")
  try:
    with warnings.catch_warnings():  # "Skipping variable loading for optimizer": not needed here
      warnings.simplefilter("ignore")
      model = keras.models.load_model(path)
  except Exception as e:  # Keras raises many types for a bad file
    raise UsageError("keras_model", f"cannot load {path}: {str(e).splitlines()[0]}") from None
  try:
    has_bn = (any(type(layer).__name__ == "BatchNormalization" for layer in all_layers(model))
              if nested_bn else bool(keras_bn_layers(model)))
  except ValueError as e:
    raise UsageError("keras_model", f"{path}: {e}") from None
  if not has_bn:
    raise UsageError("keras_model", f"{path} has no BatchNormalization layer")
  if getattr(model, "loss", None) is None:
    raise UsageError("keras_model", f"{path} was saved without a compiled loss "
                     "(compile it before model.save)")
  if len(model.outputs) != 1:
    raise UsageError("keras_model", f"{path} has {len(model.outputs)} outputs; bnraw diagnoses "
                     "single-output models (one array y in the data file)")
  if len(model.inputs) != 1:
    names = ", ".join(t.name for t in model.inputs)
    raise UsageError("keras_model", f"{path} takes {len(model.inputs)} inputs ({names}); "
                     "bnraw diagnoses single-input models (one array x in the data file)")
  import tensorflow as tf
  if not tf.config.list_physical_devices("GPU"):
    for layer in all_layers(model):
      if getattr(layer, "data_format", None) == "channels_first":
        raise UsageError("keras_model", f"layer {layer.name!r} ({type(layer).__name__}) uses "
                         "data_format='channels_first', which TensorFlow cannot run on a CPU; "
                         "rebuild it channels_last or run on a GPU")
  return model


def save_model(model, path: str) -> str:
  """``model.save(path)``, complete or absent (a temporary file, then a rename); returns it."""
  tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{os.path.basename(path)}")
  model.save(tmp)
  os.replace(tmp, path)
  return path


def all_layers(model):
  """Every layer of ``model``, nested models' layers included."""
  for layer in model.layers:
    yield layer
    if hasattr(layer, "layers"):
      yield from all_layers(layer)


def load_data(path: str, model) -> tuple[np.ndarray, np.ndarray]:
  """Arrays ``x`` (float32) and ``y`` from the ``.npz`` at ``path``, checked against ``model``:
  same length, x fits the input, y numeric, finite, and accepted by the model's loss."""
  if not os.path.isfile(path):
    raise UsageError("data", f"no such file: {path}")
  try:
    with np.load(path, allow_pickle=False) as arrays:
      x, y = arrays["x"], arrays["y"]
  except KeyError:
    raise UsageError("data", f"{path} needs arrays named x and y") from None
  except Exception as e:
    raise UsageError("data", f"cannot read {path}: {str(e).splitlines()[0]}") from None
  if len(x) != len(y) or len(x) == 0:
    raise UsageError("data", f"x has {len(x)} examples and y {len(y)}; need the same, > 0")
  for name, array in (("x", x), ("y", y)):
    if array.dtype.kind not in "biuf":
      raise UsageError("data", f"{name} holds {array.dtype} values; bnraw needs numbers "
                       "(encode labels as integers)")
    bad = int(np.size(array) - np.isfinite(array).sum())
    if bad:
      raise UsageError("data", f"{name} holds {bad} non-finite values (NaN or Inf)")
  expected = tuple(model.inputs[0].shape[1:])
  if len(expected) != x.ndim - 1 or any(e is not None and e != a for e, a in
                                        zip(expected, x.shape[1:])):
    raise UsageError("data", f"x examples have shape {x.shape[1:]}, the model takes "
                     f"{expected}")
  x = x.astype(np.float32)
  if y.dtype.kind == "f":  # Keras's data adapter casts float arrays to floatx; ints stay
    y = y.astype(np.float32)
  y_pred = model(x[:2], training=False)  # the model's own loss on two examples
  try:
    loss = model.compute_loss(x=x[:2], y=y[:2], y_pred=y_pred, training=False)
  except Exception as e:
    raise UsageError("data", f"y (shape {y.shape}) does not fit the model's output (shape "
                     f"{tuple(y_pred.shape)[1:]}) under its loss: "
                     f"{str(e).splitlines()[0]}") from None
  if not np.isfinite(np.asarray(loss)).all():
    raise UsageError("data", f"y (shape {y.shape}) gives a non-finite loss with the model's "
                     "output: labels out of range for the loss?")
  return x, y


# -- reading a user's Keras model: its BN layers, metrics and noise; quiet and seeded clones --


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
