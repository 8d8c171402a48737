"""The raw twins (``bnraw.core.losses``) of a user's compiled Keras 3 loss and first metric.

Loss: ``categorical_crossentropy`` (``from_logits``, ``label_smoothing``),
``sparse_categorical_crossentropy`` (``from_logits``), ``binary_crossentropy`` (``from_logits``,
``label_smoothing``), ``mean_squared_error``, ``mean_absolute_error`` and ``huber`` (``delta``),
given as a name (aliases and ``"crossentropy"`` too), a function or a ``Loss`` object, with
reduction "sum_over_batch_size" on the last axis. Anything else (another loss, a custom
``Loss``, ``ignore_class``, another reduction or axis, ``loss_weights``, several outputs, an
overridden ``compute_loss``) is a :class:`UsageError`: the twin could not follow Keras bit for
bit. The twin is the compiled loss only: regularisers and ``add_loss`` terms are the caller's,
and fit's sample or class weights are not modelled.

Metric: the first compiled metric as Keras resolves it (``"accuracy"`` by the shapes), as
per-example values; ``None`` (no metric column) for one not listed in :data:`METRICS`.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from bnraw.core import losses
from bnraw.errors import UsageError

SUPPORTED = ("supported: categorical_crossentropy, sparse_categorical_crossentropy, "
             "binary_crossentropy, mean_squared_error, mean_absolute_error, huber, with "
             "reduction='sum_over_batch_size'")
METRICS = ("Accuracy", "BinaryAccuracy", "CategoricalAccuracy", "SparseCategoricalAccuracy",
           "MeanSquaredError", "MeanAbsoluteError")

_LOSS_OPTIONS = {  # core loss -> the keyword arguments Keras's loss function may carry
    "categorical_crossentropy": ("from_logits", "label_smoothing", "axis"),
    "sparse_categorical_crossentropy": ("from_logits", "ignore_class", "axis"),
    "binary_crossentropy": ("from_logits", "label_smoothing", "axis"),
    "mean_squared_error": (),
    "mean_absolute_error": (),
    "huber": ("delta",),
}


class RawLoss:
  """``(y_true, y_pred, logits=None) -> scalar``: the compiled loss of a Keras model as fit's
  train step computes it (:func:`bnraw.core.losses.compiled_loss`).

  ``name`` is the core loss (one of ``bnraw.core.losses.LOSSES``), or None for Keras's
  ``"crossentropy"``, which picks binary, sparse or categorical from the shapes at each call
  (:meth:`loss_name`). ``options`` are the loss function's keyword arguments, ``dtype`` the
  loss dtype."""

  def __init__(self, name: Optional[str], options: dict, dtype: tf.DType):
    self.name, self.options, self.dtype = name, options, dtype

  def loss_name(self, y_true, y_pred) -> str:
    """The core loss that runs for these ``y_true``, ``y_pred`` (only their static shapes
    matter)."""
    if self.name is not None:
      return self.name
    from keras.src.trainers.compile_utils import is_binary_or_sparse_categorical
    binary, sparse = is_binary_or_sparse_categorical(y_true, y_pred)
    if binary:
      return "binary_crossentropy"
    return "sparse_categorical_crossentropy" if sparse else "categorical_crossentropy"

  def uses_logits(self, y_true, y_pred, activation: Optional[str], tagged: bool) -> bool:
    """:func:`bnraw.core.losses.carries_logits` for the loss these shapes select."""
    return losses.carries_logits(self.loss_name(y_true, y_pred), activation, tagged)

  def __call__(self, y_true, y_pred, logits=None) -> tf.Tensor:
    fn = getattr(losses, self.loss_name(y_true, y_pred))
    return fn(y_true, y_pred, logits, dtype=self.dtype, **self.options)


def _refuse(what: str, why: str) -> UsageError:
  return UsageError("keras_model", f"loss {what}: {why} ({SUPPORTED})")


def _describe(loss) -> str:
  if isinstance(loss, str):
    return loss
  return getattr(loss, "name", None) or getattr(loss, "__name__", None) or type(loss).__name__


def _single(loss, weights):
  """The one loss of a single-output compile (a bare loss, or a list or dict of one)."""
  if weights is not None:
    raise _refuse(_describe(loss), f"loss_weights={weights!r} is not supported")
  if isinstance(loss, (list, tuple)) and len(loss) == 1:
    return loss[0]
  if isinstance(loss, dict) and len(loss) == 1:
    return next(iter(loss.values()))
  if isinstance(loss, (list, tuple, dict)):
    raise _refuse(repr(loss), "one loss per output: bnraw twins single-output models")
  return loss


def raw_loss(keras_model) -> RawLoss:
  """The raw twin of ``keras_model``'s compiled loss; a :class:`UsageError` where there is
  none that follows Keras bit for bit (module docstring)."""
  import keras
  from keras.src.losses.losses import (BinaryCrossentropy, CategoricalCrossentropy, Huber,
                                       LossFunctionWrapper, MeanAbsoluteError,
                                       MeanSquaredError, SparseCategoricalCrossentropy)
  from keras.src.losses import losses as keras_losses
  from keras.src.trainers.compile_utils import get_loss
  compiled = getattr(keras_model, "_compile_loss", None)
  if compiled is None:
    raise UsageError("keras_model", f"the model has no compiled loss (compile it with one; "
                     f"{SUPPORTED})")
  if type(keras_model).compute_loss is not keras.Model.compute_loss:
    raise UsageError("keras_model", f"{type(keras_model).__name__} overrides compute_loss, "
                     "which the twin cannot follow")
  outputs = getattr(keras_model, "outputs", None)
  if outputs is not None and len(outputs) != 1:
    raise _refuse(_describe(compiled._user_loss),
                  f"the model has {len(outputs)} outputs; bnraw twins single-output models")
  identifier = _single(compiled._user_loss, compiled._user_loss_weights)
  what = _describe(identifier)
  if str(identifier).lower() in ("crossentropy", "ce"):
    return RawLoss(None, {}, tf.float32)
  try:
    loss = get_loss(identifier, None, None)
  except Exception as e:  # an unknown name or an object Keras cannot read
    raise _refuse(what, f"not understood ({str(e).splitlines()[0] if str(e) else e!r})") from None
  if type(loss) not in (LossFunctionWrapper, CategoricalCrossentropy,
                        SparseCategoricalCrossentropy, BinaryCrossentropy, MeanSquaredError,
                        MeanAbsoluteError, Huber):
    raise _refuse(what, f"{type(loss).__name__} is not supported")
  functions = {keras_losses.categorical_crossentropy: "categorical_crossentropy",
               keras_losses.sparse_categorical_crossentropy: "sparse_categorical_crossentropy",
               keras_losses.binary_crossentropy: "binary_crossentropy",
               keras_losses.mean_squared_error: "mean_squared_error",
               keras_losses.mean_absolute_error: "mean_absolute_error",
               keras_losses.huber: "huber"}
  name = functions.get(loss.fn)
  if name is None:
    raise _refuse(what, "not supported")
  options = dict(loss._fn_kwargs)
  unknown = sorted(set(options) - set(_LOSS_OPTIONS[name]))
  if unknown:
    raise _refuse(what, f"options {unknown} are not supported")
  if options.pop("axis", -1) != -1:
    raise _refuse(what, "only axis=-1 is supported")
  if options.pop("ignore_class", None) is not None:
    raise _refuse(what, "ignore_class is not supported")
  if loss.reduction != "sum_over_batch_size":
    raise _refuse(what, f"reduction={loss.reduction!r} is not supported")
  if "from_logits" in options:
    options["from_logits"] = bool(options["from_logits"])
  for key in ("label_smoothing", "delta"):
    if key in options:
      options[key] = float(options[key])
  return RawLoss(name, options, tf.as_dtype(loss.dtype))


def _output_spec(keras_model):
  """(shape, dtype) of the model's single output, or None where the model does not say."""
  try:
    outputs = keras_model.outputs
    if outputs and len(outputs) == 1:
      return tuple(outputs[0].shape), outputs[0].dtype
  except (AttributeError, ValueError):
    pass
  return None


def raw_metric(keras_model, y: Optional[np.ndarray] = None
               ) -> Optional[tuple[str, Callable[[tf.Tensor, tf.Tensor], tf.Tensor]]]:
  """``(name, fn)`` for ``keras_model``'s first compiled metric, ``name`` the key fit logs it
  under and ``fn(y_true, y_pred) -> [N]`` its per-example values: fit's metric adds
  ``sum(fn(y_true, y_pred))`` to its total and ``N`` to its count each batch (no sample
  weights). None without a metric, or for one not in :data:`METRICS` (or a
  ``MeanMetricWrapper`` of their functions).

  ``y``: the labels (a few rows suffice), for ``"accuracy"``, which Keras resolves from the
  shapes of ``y`` and the output. Without them, the labels are taken as integer ``[N]`` under a
  sparse categorical cross-entropy and as shaped like the output otherwise."""
  import keras
  from keras.src.losses import losses as keras_losses
  from keras.src.metrics import accuracy_metrics
  from bnraw.models.keras_bridge import first_metric
  spec = _output_spec(keras_model)
  if spec is None:
    return None
  shape, dtype = spec
  y_pred = tf.zeros((2,) + tuple(1 if d is None else d for d in shape[1:]), dtype)
  if y is not None:
    candidates = [tf.constant(np.asarray(y)[:2])]
  else:  # the likely layout first; the other one for a metric that needs it
    sparse = False
    try:
      sparse = raw_loss(keras_model).name == "sparse_categorical_crossentropy"
    except UsageError:
      pass
    candidates = [tf.zeros((2,), tf.int32), tf.zeros_like(y_pred)]
    if not sparse:
      candidates.reverse()
  metric = None
  for y_true in candidates:
    metric = first_metric(keras_model, y_true, y_pred)
    if metric is not None:
      break
  if metric is None or type(metric) not in (
      keras.metrics.Accuracy, keras.metrics.BinaryAccuracy, keras.metrics.CategoricalAccuracy,
      keras.metrics.SparseCategoricalAccuracy, keras.metrics.MeanSquaredError,
      keras.metrics.MeanAbsoluteError, keras.metrics.MeanMetricWrapper):
    return None
  functions = {
      accuracy_metrics.accuracy: losses.accuracy_values,
      accuracy_metrics.binary_accuracy: losses.binary_accuracy_values,
      accuracy_metrics.categorical_accuracy: losses.categorical_accuracy_values,
      accuracy_metrics.sparse_categorical_accuracy: losses.sparse_categorical_accuracy_values,
      keras_losses.mean_squared_error: losses.mean_squared_error_values,
      keras_losses.mean_absolute_error: losses.mean_absolute_error_values,
  }
  values_fn = functions.get(getattr(metric, "_fn", None))
  options = dict(getattr(metric, "_fn_kwargs", {}))
  if values_fn is None or set(options) - ({"threshold"} if values_fn is
                                          losses.binary_accuracy_values else set()):
    return None
  metric_dtype = tf.as_dtype(metric.dtype)

  def fn(y_true, y_pred):
    return losses.metric_values(values_fn(y_true, y_pred, **options), metric_dtype)

  return metric.name, fn
