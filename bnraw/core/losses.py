"""A compiled Keras 3 loss (TF backend) as raw TF ops, bit for bit, and the per-example values of
the metrics fit averages. No variables, no state.

A loss here is what ``model.compute_loss`` gets from the compiled loss in fit's train step, in
Keras's op order: ``Loss.__call__`` converts ``y_pred`` and ``y_true`` to the loss dtype (a
``tf.cast``, so float32 for float32 outputs: no op), ``LossFunctionWrapper.call`` squeezes or
expands a last axis of size 1 (``squeeze_or_expand_to_same_rank``), the loss function gives one
value per example, the "sum_over_batch_size" reduction takes ``divide_no_nan(sum(values),
size(values))`` and ``CompileLoss`` casts that to float32. One replica, no sample weight, no
Keras mask on the output (each of them changes the reduction).

Logits. Keras's ``softmax`` and ``sigmoid`` activations (``keras.activations.softmax`` /
``sigmoid``, ``keras.ops.softmax`` / ``sigmoid``) tag their output with ``_keras_logits``, the
activation's input, and the three cross-entropies take those logits (the ``_with_logits`` TF op)
instead of the probability formula: whatever ``from_logits`` says (True only makes Keras warn),
and whichever of the two activations it was (a categorical cross-entropy on a sigmoid output
runs ``softmax_cross_entropy_with_logits`` on the sigmoid's input). Pass that input as
``logits``; these functions drop it where Keras loses it (below). The rule, for the model's
output tensor ``y_pred`` (see :func:`carries_logits`):

* Tagged: the output of ``Dense``/``Conv*``/any layer with ``activation="softmax"`` or
  ``"sigmoid"`` (the string or the ``keras.activations`` function), of ``Activation("softmax")``
  / ``Activation("sigmoid")``, and of ``keras.layers.Softmax()`` called without a mask and with
  an int (or one-element) ``axis``, or of ``Lambda(keras.ops.softmax)``; through
  ``Functional``, ``Sequential``, nested and subclassed models alike, and through a later layer
  that returns its input tensor itself (``Activation("linear")``, ``Identity``, ``Dropout(0)``;
  not ``Dropout(rate > 0)``, which in training makes a new tensor). The logits are the
  activation's input in the activation layer's compute dtype: a ``dtype="float32"`` activation
  layer after float16 layers gets ``cast(x, float32)``. A softmax with ``axis=None`` (or
  over another axis than the last) is tagged too, and its logits then meet a cross-entropy
  over the last axis, not the softmax taken: refuse it.
* Untagged, found by op type (graph mode only, which fit is unless ``run_eagerly=True``): an
  output whose TF op is ``Softmax`` (``activation=tf.nn.softmax``, ``Lambda(tf.nn.softmax)``)
  gives its input to the categorical and sparse cross-entropies, not the binary one; an output
  whose op is ``Sigmoid`` (``tf.nn.sigmoid``, ``tf.math.sigmoid``) to the binary one only.
* No logits: any other output (``relu``, ``linear``, ``Softmax`` with a mask, any layer or op
  making a new tensor after the activation, ``tf.identity``); and every output Keras's loss
  must cast or reshape first: a float16/bfloat16 output (a mixed policy with a low-precision
  last layer: ``Loss.__call__`` casts it to float32 and the ``Cast`` op has neither tag nor
  Softmax type), or an output whose last axis of size 1 is squeezed (or a rank-1 output
  expanded) to match ``y_true``. Then the probability formulas (clipped to
  ``[1e-7, 1 - 1e-7]``) run on the cast probabilities.

MSE, MAE and Huber never look at logits.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import tensorflow as tf

EPSILON = 1e-7  # keras.backend.epsilon()

CROSS_ENTROPIES = ("categorical_crossentropy", "sparse_categorical_crossentropy",
                   "binary_crossentropy")
LOSSES = CROSS_ENTROPIES + ("mean_squared_error", "mean_absolute_error", "huber")


def carries_logits(loss: str, activation: Optional[str], tagged: bool) -> bool:
  """Whether Keras's ``loss`` (a name in :data:`LOSSES`) reads logits behind an output made by
  ``activation`` (``"softmax"``, ``"sigmoid"`` or anything else), ``tagged`` when a Keras
  activation made it (it has ``_keras_logits``), untagged when a bare TF op did (graph mode).
  The output must also reach the loss uncast and unreshaped (the loss functions check that)."""
  if loss not in CROSS_ENTROPIES or activation not in ("softmax", "sigmoid"):
    return False
  if tagged:
    return True
  return (activation == "sigmoid") == (loss == "binary_crossentropy")


# --- Keras's helpers, op for op ---------------------------------------------------------------

def squeeze_or_expand_to_same_rank(x1: tf.Tensor, x2: tf.Tensor,
                                   expand_rank_1: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
  """Keras's ``squeeze_or_expand_to_same_rank``: where the ranks differ by one and the longer
  one's last axis is 1, squeeze it, or expand the other when that is rank 1."""
  r1, r2 = x1.shape.rank, x2.shape.rank
  if r1 == r2:
    return x1, x2
  if r1 == r2 + 1 and x1.shape[-1] == 1:
    if r2 == 1 and expand_rank_1:
      x2 = tf.expand_dims(x2, -1)
    else:
      x1 = tf.squeeze(x1, axis=[-1])
  if r2 == r1 + 1 and x2.shape[-1] == 1:
    if r1 == 1 and expand_rank_1:
      x1 = tf.expand_dims(x1, -1)
    else:
      x2 = tf.squeeze(x2, axis=[-1])
  return x1, x2


def keras_mean(x: tf.Tensor, axis) -> tf.Tensor:
  """``keras.ops.mean``: ``reduce_mean`` in float32 for 16-bit floats, cast back."""
  compute = tf.float64 if x.dtype == tf.float64 else tf.float32
  return tf.cast(tf.reduce_mean(tf.cast(x, compute), axis=axis), x.dtype)


def _keras_argmax(x: tf.Tensor) -> tf.Tensor:
  """``keras.ops.argmax(x, -1)`` (int32): floats have ``-0.0`` replaced by ``-tiny`` first."""
  if not x.dtype.is_floating:
    return tf.argmax(x, axis=-1, output_type=tf.int32)
  x = tf.cast(x, tf.float64 if x.dtype == tf.float64 else tf.float32)
  sign_bit = tf.less(tf.bitwise.bitwise_and(tf.bitcast(tf.cast(x, tf.float32), tf.int32),
                                            tf.constant(tf.int32.min, tf.int32)), 0)
  negative_zero = tf.logical_and(tf.equal(x, 0.0), sign_bit)
  x = tf.where(negative_zero, -np.finfo(x.dtype.as_numpy_dtype).tiny, x)
  return tf.argmax(x, axis=-1, output_type=tf.int32)


def sum_over_batch_size(values: tf.Tensor) -> tf.Tensor:
  """Keras's "sum_over_batch_size" reduction: ``divide_no_nan(sum(values), size(values))``."""
  total = tf.reduce_sum(values)
  return tf.math.divide_no_nan(total, tf.cast(tf.reduce_prod(tf.shape(values)), total.dtype))


# --- per-example values (Keras's loss functions, before the reduction) -------------------------

def categorical_crossentropy_values(y_true: tf.Tensor, y_pred: tf.Tensor,
                                    logits: Optional[tf.Tensor] = None, from_logits: bool = False,
                                    label_smoothing: float = 0.0) -> tf.Tensor:
  """One-hot (or soft) ``y_true [N, K]``: ``label_smoothing`` mixes in ``1/K``; then
  ``softmax_cross_entropy_with_logits`` on ``logits`` (given) or ``y_pred`` (``from_logits``),
  else ``-sum(y_true * log(clip(p / sum(p))))``. ``[N]``."""
  y_true = tf.cast(y_true, y_pred.dtype)
  if label_smoothing:
    k = y_true.shape[-1]
    num_classes = tf.cast(k if k is not None else tf.shape(y_true)[-1], y_pred.dtype)
    y_true = y_true * (1.0 - label_smoothing) + (label_smoothing / num_classes)
  if logits is not None or from_logits:
    return tf.nn.softmax_cross_entropy_with_logits(
        labels=y_true, logits=y_pred if logits is None else logits, axis=-1)
  p = y_pred / tf.reduce_sum(y_pred, -1, keepdims=True)
  p = tf.clip_by_value(p, EPSILON, 1.0 - EPSILON)
  return -tf.reduce_sum(y_true * tf.math.log(p), -1)


def sparse_categorical_crossentropy_values(y_true: tf.Tensor, y_pred: tf.Tensor,
                                           logits: Optional[tf.Tensor] = None,
                                           from_logits: bool = False) -> tf.Tensor:
  """Integer labels ``y_true [N]`` (or ``[N, 1]``, in the loss dtype as Keras passes them, then
  int64): ``sparse_softmax_cross_entropy_with_logits`` on ``logits`` (given), ``y_pred``
  (``from_logits``) or ``log(clip(p))``. ``[N]``."""
  if y_true.shape.rank == y_pred.shape.rank and y_true.shape[-1] == 1:
    y_true = tf.squeeze(y_true, axis=[-1])
  output = y_pred if logits is None else logits
  target = tf.cast(y_true, tf.int64)
  if logits is None and not from_logits:
    output = tf.math.log(tf.clip_by_value(output, EPSILON, 1 - EPSILON))
  return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=output)


def binary_crossentropy_values(y_true: tf.Tensor, y_pred: tf.Tensor,
                               logits: Optional[tf.Tensor] = None, from_logits: bool = False,
                               label_smoothing: float = 0.0) -> tf.Tensor:
  """``y_true`` shaped as ``y_pred [N, ..., C]``, smoothed towards 0.5; the element-wise
  ``sigmoid_cross_entropy_with_logits`` on ``logits`` (given) or ``y_pred`` (``from_logits``),
  else ``-(t log p + (1 - t) log(1 - p))`` on ``clip(p)``; mean over the last axis."""
  y_true = tf.cast(y_true, y_pred.dtype)
  if label_smoothing:
    y_true = y_true * (1.0 - label_smoothing) + 0.5 * label_smoothing
  if logits is not None or from_logits:
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=y_true,
                                                  logits=y_pred if logits is None else logits)
  else:
    output = tf.clip_by_value(y_pred, EPSILON, 1.0 - EPSILON)
    bce = y_true * tf.math.log(output)
    bce += (1 - y_true) * tf.math.log(1 - output)
    bce = -bce
  return keras_mean(bce, -1)


def _aligned(y_true: tf.Tensor, y_pred: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """The regression losses' start (losses.py ``mean_squared_error`` ...): ``y_true`` in
  ``y_pred``'s dtype, then the ranks squeezed or expanded to match."""
  return squeeze_or_expand_to_same_rank(tf.cast(y_true, y_pred.dtype), y_pred)


def mean_squared_error_values(y_true: tf.Tensor, y_pred: tf.Tensor,
                              logits: Optional[tf.Tensor] = None) -> tf.Tensor:
  """``mean((y_true - y_pred)^2)`` over the last axis, ``y_true`` in ``y_pred``'s dtype."""
  del logits
  y_true, y_pred = _aligned(y_true, y_pred)
  return keras_mean(tf.square(y_true - y_pred), -1)


def mean_absolute_error_values(y_true: tf.Tensor, y_pred: tf.Tensor,
                               logits: Optional[tf.Tensor] = None) -> tf.Tensor:
  """``mean(|y_true - y_pred|)`` over the last axis, ``y_true`` in ``y_pred``'s dtype."""
  del logits
  y_true, y_pred = _aligned(y_true, y_pred)
  return keras_mean(tf.abs(y_true - y_pred), -1)


def huber_values(y_true: tf.Tensor, y_pred: tf.Tensor, logits: Optional[tf.Tensor] = None,
                 delta: float = 1.0) -> tf.Tensor:
  """Huber loss over the last axis: ``0.5 e^2`` where ``|e| <= delta``, else
  ``delta |e| - 0.5 delta^2``, for ``e = y_pred - y_true``."""
  del logits
  y_true, y_pred = _aligned(y_true, y_pred)
  delta = tf.convert_to_tensor(delta, dtype=y_pred.dtype)
  error = tf.subtract(y_pred, y_true)
  abs_error = tf.abs(error)
  half = tf.convert_to_tensor(0.5, dtype=abs_error.dtype)
  return keras_mean(tf.where(abs_error <= delta, half * tf.square(error),
                             delta * abs_error - half * tf.square(delta)), -1)


# --- the compiled losses -----------------------------------------------------------------------

def compiled_loss(values_fn: Callable, y_true, y_pred: tf.Tensor,
                  logits: Optional[tf.Tensor] = None, dtype: tf.DType = tf.float32,
                  **kwargs) -> tf.Tensor:
  """The scalar fit differentiates for the loss function ``values_fn`` (one of the
  ``*_values`` above, with its ``kwargs``) compiled with reduction "sum_over_batch_size" and
  loss dtype ``dtype``. ``logits``: the input of ``y_pred``'s activation where Keras finds logits
  (module docstring); dropped here when ``y_pred`` must first be cast to ``dtype`` or reshaped
  to ``y_true``'s rank, as those ops drop Keras's."""
  converted = tf.cast(y_pred, dtype)  # Loss.__call__; no op when the dtype is already right
  y_true = tf.cast(tf.convert_to_tensor(y_true), dtype)
  y_true, y_pred_matched = squeeze_or_expand_to_same_rank(y_true, converted)
  if y_pred_matched is not y_pred:
    logits = None
  values = values_fn(y_true, y_pred_matched, logits, **kwargs)
  return tf.cast(sum_over_batch_size(tf.cast(values, dtype)), tf.float32)


def categorical_crossentropy(y_true, y_pred: tf.Tensor, logits: Optional[tf.Tensor] = None, *,
                             from_logits: bool = False, label_smoothing: float = 0.0,
                             dtype: tf.DType = tf.float32) -> tf.Tensor:
  """``CategoricalCrossentropy(from_logits, label_smoothing)`` as compiled: one-hot ``y_true
  [N, K]``, ``y_pred [N, K]``; see :func:`compiled_loss`."""
  return compiled_loss(categorical_crossentropy_values, y_true, y_pred, logits, dtype,
                       from_logits=from_logits, label_smoothing=label_smoothing)


def sparse_categorical_crossentropy(y_true, y_pred: tf.Tensor,
                                    logits: Optional[tf.Tensor] = None, *,
                                    from_logits: bool = False,
                                    dtype: tf.DType = tf.float32) -> tf.Tensor:
  """``SparseCategoricalCrossentropy(from_logits)`` as compiled: integer ``y_true [N]`` or
  ``[N, 1]``, ``y_pred [N, K]``; see :func:`compiled_loss`."""
  return compiled_loss(sparse_categorical_crossentropy_values, y_true, y_pred, logits, dtype,
                       from_logits=from_logits)


def binary_crossentropy(y_true, y_pred: tf.Tensor, logits: Optional[tf.Tensor] = None, *,
                        from_logits: bool = False, label_smoothing: float = 0.0,
                        dtype: tf.DType = tf.float32) -> tf.Tensor:
  """``BinaryCrossentropy(from_logits, label_smoothing)`` as compiled: ``y_true [N]`` or
  ``[N, C]``, ``y_pred [N, C]``; see :func:`compiled_loss`."""
  return compiled_loss(binary_crossentropy_values, y_true, y_pred, logits, dtype,
                       from_logits=from_logits, label_smoothing=label_smoothing)


def mean_squared_error(y_true, y_pred: tf.Tensor, logits: Optional[tf.Tensor] = None, *,
                       dtype: tf.DType = tf.float32) -> tf.Tensor:
  """``MeanSquaredError()`` as compiled (``logits`` ignored); see :func:`compiled_loss`."""
  return compiled_loss(mean_squared_error_values, y_true, y_pred, logits, dtype)


def mean_absolute_error(y_true, y_pred: tf.Tensor, logits: Optional[tf.Tensor] = None, *,
                        dtype: tf.DType = tf.float32) -> tf.Tensor:
  """``MeanAbsoluteError()`` as compiled (``logits`` ignored); see :func:`compiled_loss`."""
  return compiled_loss(mean_absolute_error_values, y_true, y_pred, logits, dtype)


def huber(y_true, y_pred: tf.Tensor, logits: Optional[tf.Tensor] = None, *, delta: float = 1.0,
          dtype: tf.DType = tf.float32) -> tf.Tensor:
  """``Huber(delta)`` as compiled (``logits`` ignored); see :func:`compiled_loss`."""
  return compiled_loss(huber_values, y_true, y_pred, logits, dtype, delta=delta)


# --- metrics: the per-example values a MeanMetricWrapper adds up --------------------------------

def accuracy_values(y_true, y_pred: tf.Tensor) -> tf.Tensor:
  """``keras.metrics.Accuracy``: ``y_true == y_pred`` in ``y_pred``'s dtype, as float32."""
  y_true = tf.cast(tf.convert_to_tensor(y_true), y_pred.dtype)
  y_true, y_pred = squeeze_or_expand_to_same_rank(y_true, y_pred)
  return tf.cast(tf.equal(y_true, y_pred), tf.float32)


def binary_accuracy_values(y_true, y_pred: tf.Tensor, threshold: float = 0.5) -> tf.Tensor:
  """``BinaryAccuracy(threshold)``: ``y_pred > threshold`` (compared in float32, or float64),
  cast to ``y_true``'s dtype, equal to ``y_true``, as float32."""
  y_true = tf.convert_to_tensor(y_true)
  threshold = tf.convert_to_tensor(threshold)
  y_true, y_pred = squeeze_or_expand_to_same_rank(y_true, y_pred)
  compare = tf.float64 if tf.float64 in (y_pred.dtype, threshold.dtype) else tf.float32
  predicted = tf.greater(tf.cast(y_pred, compare), tf.cast(threshold, compare))
  return tf.cast(tf.equal(y_true, tf.cast(predicted, y_true.dtype)), tf.float32)


def categorical_accuracy_values(y_true, y_pred: tf.Tensor) -> tf.Tensor:
  """``CategoricalAccuracy``: ``argmax(y_true) == argmax(y_pred)`` (compared in ``y_pred``'s
  dtype, as Keras does), as float32."""
  y_true = tf.cast(_keras_argmax(tf.convert_to_tensor(y_true)), y_pred.dtype)
  original_shape = tf.shape(y_true)
  reshape = y_true.shape.rank == y_pred.shape.rank
  if reshape:
    y_true = tf.squeeze(y_true, axis=[-1])
  predicted = tf.cast(_keras_argmax(y_pred), y_true.dtype)
  matches = tf.cast(tf.equal(y_true, predicted), tf.float32)
  return tf.reshape(matches, original_shape) if reshape else matches


def sparse_categorical_accuracy_values(y_true, y_pred: tf.Tensor) -> tf.Tensor:
  """``SparseCategoricalAccuracy``: the label (cast to ``y_pred``'s dtype) equals
  ``argmax(y_pred)``, as float32; ``[N]`` for labels ``[N]`` or ``[N, 1]``."""
  y_true = tf.cast(tf.convert_to_tensor(y_true), y_pred.dtype)
  original_shape = tf.shape(y_true)
  reshape = y_true.shape.rank == y_pred.shape.rank and y_true.shape[-1] == 1
  if reshape:
    y_true = tf.squeeze(y_true, axis=[-1])
  predicted = tf.cast(_keras_argmax(y_pred), y_true.dtype)
  matches = tf.cast(tf.equal(y_true, predicted), tf.float32)
  if reshape:
    matches = tf.reshape(matches, original_shape)
  if matches.shape.rank > 1 and matches.shape[-1] == 1:
    matches = tf.squeeze(matches, axis=[-1])
  return matches


def metric_values(values: tf.Tensor, dtype: tf.DType = tf.float32) -> tf.Tensor:
  """What ``MeanMetricWrapper.update_state`` makes of a metric function's ``values`` without
  sample weights: cast to the metric's ``dtype``, averaged over every axis but the first (``[N]``).
  fit then does ``total += sum(values)``, ``count += N``."""
  values = tf.cast(values, dtype)
  if values.shape.rank > 1:
    values = keras_mean(values, list(range(1, values.shape.rank)))
  return values
