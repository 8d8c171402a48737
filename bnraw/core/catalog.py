"""Raw twins of the standard Keras 3 layers (BatchNormalization aside: :mod:`bnraw.core.layers`),
channels_last throughout, bit-identical to Keras 3.15 (TF backend) forward and backward.

Every function here emits the TensorFlow operations Keras emits for the same layer, in the same
order (keras/src/layers/*, backend/tensorflow/nn.py and numpy.py), because gradients round by op:

* biases: Keras's TF ``add`` turns a bias-shaped operand into ``tf.nn.bias_add`` (its gradient,
  BiasAddGrad, rounds differently from a broadcast add's); :func:`ops.add` is that ``add``.
* grouped convolutions: Keras runs them in a nested ``tf.function(jit_compile=True)`` (TF's CPU
  kernel lacks them), so do we.
* depthwise/separable convolutions with both strides and dilation > 1: Keras's decomposition
  (explicit SAME padding, stride-1 dilated conv, subsampling).
* global average pooling: the mean is taken in float32 for float16/bfloat16 inputs.
* Dropout family: Keras's seed generator (:class:`Dropout`).

Every layer has:

* ``name``: the Keras layer's name.
* ``variables``: the weights, as ``tf.Variable`` named with the Keras variables' paths, in
  Keras's ``layer.weights`` order; ``trainable_variables``: those the optimizer updates.
* ``regularizable``: ``{"kernel": var, "bias": var}`` (or ``"depthwise_kernel"``,
  ``"pointwise_kernel"``), the variables a Keras regulariser can sit on, keyed by the variable's
  Keras name; ``kernels``: its values but the bias.
* ``state_variables``: state outside the weights (the Dropout family's seed-generator state).
* ``compute_dtype``: floating inputs are cast to it on entry, as Keras's ``Layer.__call__``
  does, and float32 variables are cast to it on read (:func:`_autocast`): a mixed policy.
* ``__call__(inputs, *, training)``: ``inputs`` a tensor, or a list of tensors for the merge
  layers; ``training`` keyword-only with no default, as in :mod:`bnraw.core.layers`.

Layers with a Keras ``activation`` argument (:class:`Dense`, :class:`Conv1D`, :class:`Conv2D`,
:class:`DepthwiseConv1D`/``2D``, :class:`SeparableConv1D`/``2D``, :class:`Activation`) also have
``activation`` (the Keras activation's name, see :data:`ACTIVATIONS`) and
``preactivation(inputs, *, training)``, the tensor the activation is applied to; ``__call__`` is
``activate(activation, preactivation(...))``.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from bnraw.core import ops

Inputs = Union[tf.Tensor, Sequence[tf.Tensor]]
Value = Union[np.ndarray, tf.Tensor, Sequence[float]]


def _autocast(variable: tf.Variable, x: tf.Tensor) -> tf.Tensor:
  """The float32 variable in ``x``'s dtype, as Keras's autocast scope reads it under a mixed
  policy (float32: the variable itself, no op)."""
  return variable if x.dtype == variable.dtype else tf.cast(variable, x.dtype)


# --------------------------------------------------------------------------------------------
# Keras's backend functions, channels_last.


def keras_shape(x: tf.Tensor) -> list:
  """Keras's ``ops.shape``: the static dimensions where known, ``tf.shape`` entries elsewhere."""
  dynamic = tf.shape(x)
  return [d if d is not None else dynamic[i] for i, d in enumerate(x.shape.as_list())]


def keras_mean(x: tf.Tensor, axis, keepdims: bool) -> tf.Tensor:
  """Keras's ``ops.mean``: ``reduce_mean`` in float32 (float64 for float64) and back, so
  float16/bfloat16 inputs do not overflow."""
  wide = tf.float64 if x.dtype == tf.float64 else tf.float32
  return tf.cast(tf.reduce_mean(tf.cast(x, wide), axis=axis, keepdims=keepdims), x.dtype)


def _data_format(rank: int) -> str:
  return {3: "NWC", 4: "NHWC", 5: "NDHWC"}[rank]


def convolution(x: tf.Tensor, kernel: tf.Tensor, strides: Sequence[int], padding: str,
                dilation_rate: Sequence[int]) -> tf.Tensor:
  """Keras's ``ops.conv``: ``tf.nn.convolution``; a grouped convolution (kernel input channels
  fewer than ``x``'s) inside a fresh ``tf.function(jit_compile=True)``, as Keras runs it."""
  def conv():
    return tf.nn.convolution(x, kernel, list(strides), padding.upper(),
                             data_format=_data_format(x.shape.rank),
                             dilations=tuple(dilation_rate))
  if x.shape[-1] != kernel.shape[-2]:
    return tf.function(conv, jit_compile=True)()
  return conv()


def _pad_same(x: tf.Tensor, kernel_size, strides, dilation_rate) -> tf.Tensor:
  """Keras's ``_pad_same_spatial_channels_last``: TF's SAME padding, made explicit."""
  spatial_shape = tf.shape(x, out_type=tf.int32)[1:-1]
  paddings = [tf.constant([0, 0], dtype=tf.int32)]
  for i, k in enumerate(kernel_size):
    n, s, d = spatial_shape[i], strides[i], dilation_rate[i]
    effective = (k - 1) * d + 1
    out_size = (n + s - 1) // s
    total = tf.maximum((out_size - 1) * s + effective - n, 0)
    before = total // 2
    paddings.append(tf.stack([before, total - before]))
  paddings.append(tf.constant([0, 0], dtype=tf.int32))
  return tf.pad(x, tf.stack(paddings))


def _strided_dilated_depthwise(x, depthwise, pointwise, strides, padding, dilation_rate):
  """Keras's ``_depthwise_conv_stride_dilation_decomposition``: TF cannot stride and dilate at
  once, so a stride-1 dilated conv on explicitly padded input, then subsampling."""
  one_d = x.shape.rank == 3
  if one_d:
    x, depthwise = tf.expand_dims(x, axis=1), tf.expand_dims(depthwise, axis=0)
    if pointwise is not None:
      pointwise = tf.expand_dims(pointwise, axis=0)
    strides, dilation_rate = (1, strides[0]), (1, dilation_rate[0])
  kernel_size = tuple(int(i) for i in depthwise.shape[:2])
  if padding == "SAME":
    x = _pad_same(x, kernel_size, strides, dilation_rate)
  y = tf.nn.depthwise_conv2d(x, depthwise, strides=(1, 1, 1, 1), padding="VALID",
                             data_format="NHWC", dilations=dilation_rate)
  y = y[:, ::strides[0], ::strides[1], :]
  if pointwise is not None:
    y = tf.nn.conv2d(y, pointwise, strides=(1, 1, 1, 1), padding="VALID", data_format="NHWC")
  return tf.squeeze(y, [1]) if one_d else y


def depthwise_convolution(x: tf.Tensor, depthwise: tf.Tensor, strides: Sequence[int],
                          padding: str, dilation_rate: Sequence[int],
                          pointwise: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Keras's ``ops.depthwise_conv`` (``pointwise=None``) or ``ops.separable_conv``, 1D (run as
  2D on an inserted axis) or 2D: ``tf.nn.depthwise_conv2d`` / ``tf.nn.separable_conv2d``."""
  strides, dilation_rate, padding = tuple(strides), tuple(dilation_rate), padding.upper()
  if any(s > 1 for s in strides) and any(d > 1 for d in dilation_rate):
    return _strided_dilated_depthwise(x, depthwise, pointwise, strides, padding, dilation_rate)
  one_d = x.shape.rank == 3
  if one_d:
    strides = (1,) + strides * 2 + (1,)
    x, depthwise = tf.expand_dims(x, 1), tf.expand_dims(depthwise, axis=0)
    if pointwise is not None:
      pointwise = tf.expand_dims(pointwise, axis=0)
    dilation_rate = (1,) + dilation_rate
  else:
    strides = (1,) + strides + (1,)
  if pointwise is None:
    y = tf.nn.depthwise_conv2d(x, depthwise, strides, padding, data_format="NHWC",
                               dilations=dilation_rate)
  else:
    y = tf.nn.separable_conv2d(x, depthwise, pointwise, strides, padding, data_format="NHWC",
                               dilations=dilation_rate)
  return tf.squeeze(y, [1]) if one_d else y


def relu(x: tf.Tensor, negative_slope: float = 0.0, max_value: Optional[float] = None,
         threshold: float = 0.0) -> tf.Tensor:
  """Keras's ``activations.relu`` (``ReLU.static_call``), op for op: ``leaky_relu`` when only
  the slope is set; else ``relu``/``relu6``/``where(x > threshold)``, a clip at ``max_value``,
  minus ``negative_slope * relu(-x + threshold)``."""
  if negative_slope != 0.0:
    if max_value is None and threshold == 0:
      return tf.nn.leaky_relu(x, alpha=negative_slope)
    negative_part = tf.nn.relu(-x + threshold) if threshold != 0 else tf.nn.relu(-x)
  clip_max = max_value is not None
  if threshold != 0:
    threshold = tf.cast(threshold, x.dtype)
    x = tf.where(tf.greater(x, threshold), x, tf.constant(0, x.dtype))
  elif max_value == 6:
    x = tf.nn.relu6(x)
    clip_max = False
  else:
    x = tf.nn.relu(x)
  if clip_max:
    x = tf.clip_by_value(x, tf.cast(0.0, x.dtype), tf.cast(max_value, x.dtype))
  if negative_slope != 0.0:
    x -= negative_slope * negative_part
  return x


def softmax(x: tf.Tensor, axis=-1) -> tf.Tensor:
  """Keras's ``activations.softmax``: ``tf.nn.softmax`` over ``axis`` (every axis for None)."""
  if axis is None:
    return tf.reshape(tf.nn.softmax(tf.reshape(x, [-1]), axis=-1), tf.shape(x))
  return tf.nn.softmax(x, axis=axis)


def _hard_sigmoid(x: tf.Tensor) -> tf.Tensor:
  return tf.nn.relu6(x + tf.constant(3.0, x.dtype)) / tf.constant(6.0, x.dtype)


# Keras's built-in activations by name (``keras.activations.get(name)``), as its TF backend
# computes them with their default arguments.
ACTIVATIONS: Mapping[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "linear": lambda x: x,
    "relu": relu,
    "relu6": tf.nn.relu6,
    "leaky_relu": lambda x: tf.nn.leaky_relu(x, alpha=0.2),
    "elu": tf.nn.elu,
    "selu": tf.nn.selu,
    "gelu": lambda x: tf.nn.gelu(x, approximate=False),
    "silu": tf.nn.silu,
    "swish": tf.nn.silu,
    "hard_silu": lambda x: x * _hard_sigmoid(x),
    "hard_swish": lambda x: x * _hard_sigmoid(x),
    "mish": lambda x: x * tf.nn.tanh(tf.math.softplus(x)),
    "sigmoid": tf.nn.sigmoid,
    "hard_sigmoid": _hard_sigmoid,
    "log_sigmoid": tf.math.log_sigmoid,
    "softmax": softmax,
    "log_softmax": lambda x: tf.nn.log_softmax(x, axis=-1),
    "tanh": tf.math.tanh,
    "tanh_shrink": lambda x: x - tf.math.tanh(x),
    "hard_tanh": lambda x: tf.clip_by_value(x, clip_value_min=-1.0, clip_value_max=1.0),
    "softplus": tf.math.softplus,
    "softsign": tf.nn.softsign,
    "exponential": tf.exp,
}


def activate(name: str, x: tf.Tensor) -> tf.Tensor:
  """The Keras activation ``name`` (a key of :data:`ACTIVATIONS`) applied to ``x``."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name](x)


# --------------------------------------------------------------------------------------------
# Layers.


class _Layer:
  """Name, compute dtype, input cast, and the (empty) variable lists."""

  def __init__(self, name: str, *, compute_dtype: tf.DType = tf.float32):
    self.name = name
    self.compute_dtype = tf.as_dtype(compute_dtype)
    self.variables: tuple = ()
    self.trainable_variables: tuple = ()
    self.state_variables: tuple = ()
    self.regularizable: dict[str, tf.Variable] = {}

  @property
  def kernels(self) -> list[tf.Variable]:
    """The regularizable variables but the bias."""
    return [v for k, v in self.regularizable.items() if k != "bias"]

  def _weights(self, values: Mapping[str, Optional[Value]], paths: Optional[Sequence[str]],
               trainable: bool) -> dict[str, tf.Variable]:
    """The variables for ``values`` (key -> initial value, None for absent), in order, named
    ``paths`` (default ``{name}/{key}``); fills ``variables``, ``trainable_variables`` and
    ``regularizable``."""
    present = [(k, v) for k, v in values.items() if v is not None]
    paths = list(paths) if paths is not None else [f"{self.name}/{k}" for k, _ in present]
    if len(paths) != len(present):
      raise ValueError(f"{self.name}: {len(paths)} paths for {len(present)} variables")
    made = {k: tf.Variable(tf.convert_to_tensor(v), name=path, trainable=trainable)
            for (k, v), path in zip(present, paths)}
    self.variables = tuple(made.values())
    self.trainable_variables = self.variables if trainable else ()
    self.regularizable = dict(made)
    return made

  def _cast(self, inputs: Inputs) -> Inputs:
    """Floating inputs in the compute dtype (Keras's ``Layer.__call__`` autocast)."""
    if isinstance(inputs, (list, tuple)):
      return [self._cast(x) for x in inputs]
    x = tf.convert_to_tensor(inputs)
    if x.dtype.is_floating and x.dtype != self.compute_dtype:
      x = tf.cast(x, self.compute_dtype)
    return x

  def __call__(self, inputs: Inputs, *, training: bool) -> tf.Tensor:
    return self._call(self._cast(inputs), training=training)

  def _call(self, x, *, training: bool) -> tf.Tensor:
    raise NotImplementedError


class _Activated(_Layer):
  """A layer ending in a Keras activation: ``activation`` (its name) and ``preactivation``."""

  def __init__(self, name: str, activation: str, *, compute_dtype: tf.DType = tf.float32):
    super().__init__(name, compute_dtype=compute_dtype)
    if activation not in ACTIVATIONS:
      raise ValueError(f"{name}: unsupported activation {activation!r}")
    self.activation = activation

  def preactivation(self, inputs: Inputs, *, training: bool) -> tf.Tensor:
    """The output before the activation (logits, for a final softmax or sigmoid)."""
    return self._linear(self._cast(inputs), training=training)

  def __call__(self, inputs: Inputs, *, training: bool) -> tf.Tensor:
    return activate(self.activation, self.preactivation(inputs, training=training))

  def _linear(self, x: tf.Tensor, *, training: bool) -> tf.Tensor:
    raise NotImplementedError


class Dense(_Activated):
  """Keras's ``Dense``: ``matmul`` (``tensordot`` on the last axis for rank > 2 input), then
  :func:`ops.add` of the bias, then the activation. ``kernel: [Cin, Cout]``, ``bias: [Cout]``
  or None."""

  def __init__(self, name: str, kernel: Value, bias: Optional[Value] = None, *,
               activation: str = "linear", trainable: bool = True,
               compute_dtype: tf.DType = tf.float32, paths: Optional[Sequence[str]] = None):
    super().__init__(name, activation, compute_dtype=compute_dtype)
    made = self._weights({"kernel": kernel, "bias": bias}, paths, trainable)
    self.kernel, self.bias = made["kernel"], made.get("bias")

  def _linear(self, x: tf.Tensor, *, training: bool) -> tf.Tensor:
    del training
    kernel = _autocast(self.kernel, x)
    if x.shape.rank == 2:
      y = tf.matmul(x, kernel)
    else:
      y = tf.tensordot(x, kernel, axes=[[-1], [0]])
    if self.bias is not None:
      y = ops.add(y, _autocast(self.bias, x))
    return y


class _Strided(_Activated):
  """What the convolutions share: strides, padding, dilation, and the bias added as Keras's
  ``BaseConv.call`` adds it: reshaped to ``(1, ..., 1, C)``, then :func:`ops.add`."""

  def _setup(self, strides, padding, dilation_rate):
    self.strides, self.dilation_rate = tuple(strides), tuple(dilation_rate)
    self.padding = padding

  def _add_bias(self, y: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    if self.bias is None:
      return y
    bias = tf.reshape(_autocast(self.bias, x), (1,) * (y.shape.rank - 1) + (-1,))
    return ops.add(y, bias)


class _Conv(_Strided):
  """Keras's ``Conv1D``/``Conv2D`` (``BaseConv.call``): :func:`convolution`, the bias reshaped
  to ``(1, ..., 1, C)`` and added (:func:`ops.add`), the activation. ``kernel:
  [*kernel_size, Cin / groups, Cout]``.

  ``as_matmul`` (the seed's ``--fast_conv``): where a VALID, stride-1 kernel covers the whole
  input, one matmul (:func:`ops.conv2d_as_matmul`): faster on CPU, no longer bit-identical."""

  def __init__(self, name: str, kernel: Value, bias: Optional[Value] = None, *,
               strides: Sequence[int] = (1, 1), padding: str = "valid",
               dilation_rate: Sequence[int] = (1, 1), activation: str = "linear",
               trainable: bool = True, compute_dtype: tf.DType = tf.float32,
               paths: Optional[Sequence[str]] = None, as_matmul: bool = False):
    super().__init__(name, activation, compute_dtype=compute_dtype)
    made = self._weights({"kernel": kernel, "bias": bias}, paths, trainable)
    self.kernel, self.bias = made["kernel"], made.get("bias")
    self._setup(strides, padding, dilation_rate)
    self.as_matmul = as_matmul

  def _covers_input(self, x: tf.Tensor) -> bool:
    return (self.as_matmul and x.shape.rank == 4 and self.padding == "valid"
            and set(self.strides) == {1} and set(self.dilation_rate) == {1}
            and tuple(x.shape[1:3]) == tuple(self.kernel.shape[:2]))

  def _linear(self, x: tf.Tensor, *, training: bool) -> tf.Tensor:
    del training
    if self._covers_input(x):
      y = ops.conv2d_as_matmul(x, _autocast(self.kernel, x))
      if self.bias is not None:
        y = ops.add(y, _autocast(self.bias, x))
      return tf.reshape(y, (-1, 1, 1, y.shape[-1]))
    padding = self.padding
    if padding == "causal":  # Conv1D: pad on the left, then a valid convolution
      left = self.dilation_rate[0] * (self.kernel.shape[0] - 1)
      x = tf.pad(x, tf.convert_to_tensor([[0, 0], [left, 0], [0, 0]], tf.int32), "CONSTANT")
      padding = "valid"
    y = convolution(x, _autocast(self.kernel, x), self.strides, padding, self.dilation_rate)
    return self._add_bias(y, x)


class Conv1D(_Conv):
  """``[N, W, Cin] -> [N, W', Cout]``; ``padding`` "valid", "same" or "causal"."""

  def __init__(self, name: str, kernel: Value, bias: Optional[Value] = None, *,
               strides: Sequence[int] = (1,), dilation_rate: Sequence[int] = (1,), **kwargs):
    super().__init__(name, kernel, bias, strides=strides, dilation_rate=dilation_rate,
                     **kwargs)


class Conv2D(_Conv):
  """``[N, H, W, Cin] -> [N, H', W', Cout]``; ``padding`` "valid" or "same"."""


class DepthwiseConv(_Conv):
  """Keras's ``DepthwiseConv1D``/``DepthwiseConv2D``: :func:`depthwise_convolution`, bias,
  activation. ``kernel: [*kernel_size, Cin, depth_multiplier]`` (Keras's variable "kernel"),
  ``bias: [Cin * depth_multiplier]``; the constructor is the convolution's."""

  def _linear(self, x: tf.Tensor, *, training: bool) -> tf.Tensor:
    del training
    y = depthwise_convolution(x, _autocast(self.kernel, x), self.strides, self.padding,
                              self.dilation_rate)
    return self._add_bias(y, x)


class SeparableConv(_Strided):
  """Keras's ``SeparableConv1D``/``SeparableConv2D``: :func:`depthwise_convolution` with the
  pointwise kernel, bias, activation. ``depthwise_kernel: [*kernel_size, Cin, multiplier]``,
  ``pointwise_kernel: [1, ..., Cin * multiplier, Cout]``, ``bias: [Cout]``."""

  def __init__(self, name: str, depthwise_kernel: Value, pointwise_kernel: Value,
               bias: Optional[Value] = None, *, strides: Sequence[int] = (1, 1),
               padding: str = "valid", dilation_rate: Sequence[int] = (1, 1),
               activation: str = "linear", trainable: bool = True,
               compute_dtype: tf.DType = tf.float32, paths: Optional[Sequence[str]] = None):
    super().__init__(name, activation, compute_dtype=compute_dtype)
    made = self._weights({"depthwise_kernel": depthwise_kernel,
                          "pointwise_kernel": pointwise_kernel, "bias": bias}, paths, trainable)
    self.depthwise_kernel, self.pointwise_kernel = (made["depthwise_kernel"],
                                                    made["pointwise_kernel"])
    self.bias = made.get("bias")
    self._setup(strides, padding, dilation_rate)

  def _linear(self, x: tf.Tensor, *, training: bool) -> tf.Tensor:
    del training
    y = depthwise_convolution(x, _autocast(self.depthwise_kernel, x), self.strides,
                              self.padding, self.dilation_rate,
                              pointwise=_autocast(self.pointwise_kernel, x))
    return self._add_bias(y, x)


DepthwiseConv1D = DepthwiseConv2D = DepthwiseConv
SeparableConv1D = SeparableConv2D = SeparableConv


class Activation(_Activated):
  """Keras's ``Activation``: the named activation of the input."""

  def __init__(self, name: str, activation: str, *, compute_dtype: tf.DType = tf.float32):
    super().__init__(name, activation, compute_dtype=compute_dtype)

  def _linear(self, x: tf.Tensor, *, training: bool) -> tf.Tensor:
    del training
    return x


class _Elementwise(_Layer):
  """A stateless layer ``fn(x)``."""

  def __init__(self, name: str, fn: Callable[[tf.Tensor], tf.Tensor], *,
               compute_dtype: tf.DType = tf.float32):
    super().__init__(name, compute_dtype=compute_dtype)
    self._fn = fn

  def _call(self, x: tf.Tensor, *, training: bool) -> tf.Tensor:
    del training
    return self._fn(x)


class ReLU(_Elementwise):
  """Keras's ``ReLU`` layer: :func:`relu` with its ``max_value``, ``negative_slope`` and
  ``threshold``."""

  def __init__(self, name: str, *, max_value: Optional[float] = None,
               negative_slope: float = 0.0, threshold: float = 0.0,
               compute_dtype: tf.DType = tf.float32):
    self.max_value, self.negative_slope, self.threshold = max_value, negative_slope, threshold
    super().__init__(name, lambda x: relu(x, negative_slope, max_value, threshold),
                     compute_dtype=compute_dtype)


class LeakyReLU(_Elementwise):
  """Keras's ``LeakyReLU``: ``tf.nn.leaky_relu(x, alpha=negative_slope)``."""

  def __init__(self, name: str, *, negative_slope: float = 0.3,
               compute_dtype: tf.DType = tf.float32):
    self.negative_slope = negative_slope
    super().__init__(name, lambda x: tf.nn.leaky_relu(x, alpha=negative_slope),
                     compute_dtype=compute_dtype)


class ELU(_Elementwise):
  """Keras's ``ELU``: ``tf.nn.elu``, times ``alpha`` where ``x <= 0`` unless ``alpha == 1``."""

  def __init__(self, name: str, *, alpha: float = 1.0, compute_dtype: tf.DType = tf.float32):
    self.alpha = alpha
    super().__init__(name, self._elu, compute_dtype=compute_dtype)

  def _elu(self, x: tf.Tensor) -> tf.Tensor:
    y = tf.nn.elu(x)
    return y if self.alpha == 1 else tf.where(x > 0, y, self.alpha * y)


class Softmax(_Elementwise):
  """Keras's ``Softmax`` layer (no mask): :func:`softmax` over ``axis``; over several axes,
  ``exp(x - logsumexp(x, axes))``. Over the last axis it is ``activate("softmax", x)``, and
  ``activation`` says so ("softmax"; None for other axes), with ``preactivation`` the input."""

  def __init__(self, name: str, *, axis=-1, compute_dtype: tf.DType = tf.float32):
    self.axis = axis
    self.activation = "softmax" if axis in (-1, (-1,), [-1]) else None
    super().__init__(name, self._softmax, compute_dtype=compute_dtype)

  def preactivation(self, inputs: Inputs, *, training: bool) -> tf.Tensor:
    """The (cast) input: the logits Keras's cross-entropy recovers behind a softmax."""
    del training
    return self._cast(inputs)

  def _softmax(self, x: tf.Tensor) -> tf.Tensor:
    if isinstance(self.axis, (tuple, list)):
      if len(self.axis) > 1:
        return tf.exp(x - tf.math.reduce_logsumexp(x, axis=self.axis, keepdims=True))
      return softmax(x, axis=self.axis[0])
    return softmax(x, axis=self.axis)


class Pooling(_Elementwise):
  """Keras's ``MaxPooling1D/2D`` (``mode="max"``) and ``AveragePooling1D/2D`` ("average"):
  ``tf.nn.max_pool`` / ``tf.nn.avg_pool``, NWC or NHWC by the input's rank."""

  def __init__(self, name: str, mode: str, pool_size: Sequence[int],
               strides: Optional[Sequence[int]] = None, padding: str = "valid", *,
               compute_dtype: tf.DType = tf.float32):
    if mode not in ("max", "average"):
      raise ValueError(f"{name}: pooling mode must be 'max' or 'average', got {mode!r}")
    self.mode, self.pool_size, self.padding = mode, tuple(pool_size), padding
    self.strides = self.pool_size if strides is None else tuple(strides)
    super().__init__(name, self._pool, compute_dtype=compute_dtype)

  def _pool(self, x: tf.Tensor) -> tf.Tensor:
    pool = tf.nn.max_pool if self.mode == "max" else tf.nn.avg_pool
    return pool(x, self.pool_size, self.strides, self.padding.upper(),
                _data_format(x.shape.rank))


class GlobalPooling(_Elementwise):
  """Keras's ``GlobalAveragePooling1D/2D`` (:func:`keras_mean`) and ``GlobalMaxPooling1D/2D``
  (``reduce_max``) over the spatial axes, ``keepdims`` as set (no mask)."""

  def __init__(self, name: str, mode: str, *, keepdims: bool = False,
               compute_dtype: tf.DType = tf.float32):
    if mode not in ("max", "average"):
      raise ValueError(f"{name}: pooling mode must be 'max' or 'average', got {mode!r}")
    self.mode, self.keepdims = mode, keepdims
    super().__init__(name, self._pool, compute_dtype=compute_dtype)

  def _pool(self, x: tf.Tensor) -> tf.Tensor:
    axis = 1 if x.shape.rank == 3 else list(range(1, x.shape.rank - 1))
    if self.mode == "average":
      return keras_mean(x, axis, self.keepdims)
    return tf.reduce_max(x, axis=axis, keepdims=self.keepdims)


class Flatten(_Elementwise):
  """Keras's ``Flatten`` (channels_last): ``reshape(x, (N, prod(other dims)))``."""

  def __init__(self, name: str, *, compute_dtype: tf.DType = tf.float32):
    super().__init__(name, self._flatten, compute_dtype=compute_dtype)

  @staticmethod
  def _flatten(x: tf.Tensor) -> tf.Tensor:
    shape = keras_shape(x)
    rest = shape[1:]
    if not rest:
      flat = 1
    elif any(not isinstance(d, int) for d in rest):
      flat = -1
    else:
      flat = math.prod(rest)
    return tf.reshape(x, (shape[0], flat))


class Reshape(_Elementwise):
  """Keras's ``Reshape``: ``reshape(x, (N, *target_shape))``."""

  def __init__(self, name: str, target_shape: Sequence[int], *,
               compute_dtype: tf.DType = tf.float32):
    self.target_shape = tuple(target_shape)
    super().__init__(name, self._reshape, compute_dtype=compute_dtype)

  def _reshape(self, x: tf.Tensor) -> tf.Tensor:
    target = list(self.target_shape)
    rest = x.shape.as_list()[1:]
    if -1 in target and None not in rest:  # Keras resolves the -1 statically where it can
      known = math.prod(d for d in target if d != -1)
      target[target.index(-1)] = math.prod(rest) // known
    return tf.reshape(x, (keras_shape(x)[0],) + tuple(target))


class Permute(_Elementwise):
  """Keras's ``Permute``: ``transpose(x, (0, *dims))`` (``dims`` 1-based)."""

  def __init__(self, name: str, dims: Sequence[int], *, compute_dtype: tf.DType = tf.float32):
    self.dims = tuple(dims)
    super().__init__(name, lambda x: tf.transpose(x, perm=(0,) + self.dims),
                     compute_dtype=compute_dtype)


class ZeroPadding2D(_Elementwise):
  """Keras's ``ZeroPadding2D``: ``tf.pad`` by ``((top, bottom), (left, right))``."""

  def __init__(self, name: str, padding: Sequence[Sequence[int]], *,
               compute_dtype: tf.DType = tf.float32):
    self.padding = tuple(tuple(p) for p in padding)
    widths = ((0, 0), *self.padding, (0, 0))
    super().__init__(name, lambda x: tf.pad(x, tf.convert_to_tensor(widths, tf.int32),
                                            "CONSTANT"), compute_dtype=compute_dtype)


class Cropping2D(_Elementwise):
  """Keras's ``Cropping2D``: the slice ``[:, top:-bottom, left:-right, :]`` (open ends where a
  crop is 0, as Keras writes it)."""

  def __init__(self, name: str, cropping: Sequence[Sequence[int]], *,
               compute_dtype: tf.DType = tf.float32):
    self.cropping = tuple(tuple(c) for c in cropping)
    super().__init__(name, self._crop, compute_dtype=compute_dtype)

  def _crop(self, x: tf.Tensor) -> tf.Tensor:
    (top, bottom), (left, right) = self.cropping
    rows = slice(top, -bottom if bottom else None)
    cols = slice(left, -right if right else None)
    return x[:, rows, cols, :]


class Rescaling(_Elementwise):
  """Keras's ``Rescaling``: ``x * cast(scale) + cast(offset)`` in the compute dtype."""

  def __init__(self, name: str, scale, offset=0.0, *, compute_dtype: tf.DType = tf.float32):
    self.scale, self.offset = scale, offset
    super().__init__(name, self._rescale, compute_dtype=compute_dtype)

  def _rescale(self, x: tf.Tensor) -> tf.Tensor:
    dtype = self.compute_dtype
    scale, offset = tf.cast(self.scale, dtype), tf.cast(self.offset, dtype)
    return tf.cast(x, dtype) * scale + offset


class Identity(_Elementwise):
  """Keras's ``Identity``: the (cast) input."""

  def __init__(self, name: str, *, compute_dtype: tf.DType = tf.float32):
    super().__init__(name, lambda x: x, compute_dtype=compute_dtype)


class Dropout(_Layer):
  """Keras's ``Dropout`` (and, through ``noise_shape``, its spatial variants), with Keras's
  random masks.

  Keras's layer owns a ``SeedGenerator`` whose state is an int64 variable ``[seed, counter]``
  (initially ``[seed, 0]``). Each training call with ``0 < rate < 1``:

  1. ``seed = state * 1`` (the value before the call), then ``state <- state + [0, 1]``;
  2. ``seed = int32(floormod(seed, 2**31 - 2))`` (backend/tensorflow/random.py ``_cast_seed``);
  3. ``tf.nn.experimental.stateless_dropout(x, rate, noise_shape, seed)``.

  ``rate == 1`` returns zeros and ``rate == 0`` the input, neither drawing (with rate 0 Keras
  has no generator, and there is no state variable); inference changes nothing.

  Args:
    seed_state: the generator's state ``[seed, counter]`` (Keras's ``seed_generator.state``).
    noise_shape: ``None`` entries take the input's dimension.
    state_path: the state variable's name (Keras's state variable path).
  """

  def __init__(self, name: str, rate: float, *, seed_state: Sequence[int] = (0, 0),
               noise_shape: Optional[Sequence[Optional[int]]] = None,
               state_path: Optional[str] = None, compute_dtype: tf.DType = tf.float32):
    super().__init__(name, compute_dtype=compute_dtype)
    self.rate, self.noise_shape = rate, None if noise_shape is None else tuple(noise_shape)
    self.state = None
    if rate > 0:
      self.state = tf.Variable(tf.constant(seed_state, tf.int64), trainable=False,
                               name=state_path or f"{name}/seed_generator_state")
      self.state_variables = (self.state,)

  def _noise_shape(self, x: tf.Tensor):
    """Keras's ``_get_concrete_noise_shape``."""
    if self.noise_shape is None:
      return tf.shape(x)
    dynamic = tf.shape(x)
    return [dynamic[i] if d is None else d for i, d in enumerate(self.noise_shape)]

  def _next_seed(self) -> tf.Tensor:
    seed = self.state * 1
    self.state.assign(tf.add(self.state, tf.constant([0, 1], tf.int64)))
    return tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)

  def _call(self, x: tf.Tensor, *, training: bool) -> tf.Tensor:
    if not (training and self.rate > 0):
      return x
    if self.rate == 1.0:
      return tf.zeros_like(x)
    seed = self._next_seed()
    return tf.nn.experimental.stateless_dropout(x, rate=self.rate,
                                                noise_shape=self._noise_shape(x), seed=seed)


class SpatialDropout(Dropout):
  """Keras's ``SpatialDropout1D``/``2D`` (channels_last): :class:`Dropout` with the noise shape
  ``(N, 1, ..., 1, C)``, one draw per example and channel."""

  def __init__(self, name: str, rate: float, *, seed_state: Sequence[int] = (0, 0),
               state_path: Optional[str] = None, compute_dtype: tf.DType = tf.float32):
    super().__init__(name, rate, seed_state=seed_state, state_path=state_path,
                     compute_dtype=compute_dtype)

  def _noise_shape(self, x: tf.Tensor):
    shape = keras_shape(x)
    return [shape[0]] + [1] * (len(shape) - 2) + [shape[-1]]


class Merge(_Layer):
  """Keras's merge layers on a list of tensors: ``mode`` "add", "subtract" (two inputs),
  "multiply", "average", "maximum", "minimum" (no masks), each a left fold in input order;
  inputs of lower rank first get axes inserted at 1, as Keras's ``Merge.call`` does."""

  _MODES = ("add", "subtract", "multiply", "average", "maximum", "minimum")

  def __init__(self, name: str, mode: str, *, compute_dtype: tf.DType = tf.float32):
    if mode not in self._MODES:
      raise ValueError(f"{name}: merge mode must be one of {self._MODES}, got {mode!r}")
    super().__init__(name, compute_dtype=compute_dtype)
    self.mode = mode

  def _call(self, xs, *, training: bool) -> tf.Tensor:
    del training
    xs = list(xs)
    ranks = [x.shape.rank for x in xs]
    if len(set(ranks)) > 1:
      top = max(ranks)
      expanded = []
      for x in xs:
        for _ in range(top - x.shape.rank):
          x = tf.expand_dims(x, 1)
        expanded.append(x)
      xs = expanded
    if self.mode == "subtract":
      if len(xs) != 2:
        raise ValueError(f"{self.name}: Subtract takes exactly 2 inputs, got {len(xs)}")
      return tf.subtract(xs[0], xs[1])
    fold = {"add": ops.add, "average": ops.add, "multiply": tf.multiply,
            "maximum": tf.maximum, "minimum": tf.minimum}[self.mode]
    y = xs[0]
    for x in xs[1:]:
      y = fold(y, x)
    return y / len(xs) if self.mode == "average" else y


class Concatenate(_Layer):
  """Keras's ``Concatenate``: ``tf.concat`` along ``axis`` (no masks)."""

  def __init__(self, name: str, *, axis: int = -1, compute_dtype: tf.DType = tf.float32):
    super().__init__(name, compute_dtype=compute_dtype)
    self.axis = axis

  def _call(self, xs, *, training: bool) -> tf.Tensor:
    del training
    xs = list(xs)
    dtypes = {x.dtype for x in xs}
    if len(dtypes) > 1:
      raise ValueError(f"{self.name}: inputs of several dtypes {sorted(map(str, dtypes))}")
    return tf.concat(xs, axis=self.axis)
