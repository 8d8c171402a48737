"""Built Keras 3 layers -> their raw twins (:mod:`bnraw.core.catalog`), values copied.

:func:`raw_layer` reads a layer's configuration and weights (values, Keras paths, trainability,
dtype policy) and builds the raw layer that computes what it computes, op for op, for the
classes it has a hand-written twin for (exactly those classes: a subclass may override
``call``). Anything that raw layer would not reproduce is refused with a :class:`UsageError`
naming the layer and the setting: ``channels_first``, a custom or parameterised activation, a
constraint or activity regulariser (applied outside the layer's call), LoRA, quantisation,
per-variable trainability that differs from the layer's, or ``autocast=False``. Any other class
becomes an :class:`OpaqueLayer`, the layer's own call on the raw variables, if that call is a
pure function of its inputs and weights.

BatchNormalization, InputLayer and models (Sequential, Functional, Model) are the caller's:
:func:`raw_layer` returns None for them (bnraw.models.twin converts BN and inlines models).

A Keras operation applied to symbolic tensors in a functional graph (``x + 3.0``, ``x * (1 /
6)``, ``keras.ops.mean(x, axis=1)``: MobileNetV3's hard sigmoid is one) becomes an
:class:`OpNode` (:func:`raw_operation`): it has no weights and no state, so it is run as Keras's
functional call runs it, its arguments filled in with the raw tensors and passed to the
operation's own TF-backend ``call`` (the same TensorFlow ops fit runs). Only the stateless
families qualify (:data:`OP_MODULES`); any other operation is refused with one line naming it.

Dtype policies: a layer computes in ``layer.compute_dtype`` (its floating inputs cast on entry,
its float32 variables cast on read), as Keras 3 does under ``mixed_float16``/``mixed_bfloat16``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf

from bnraw.core import catalog
from bnraw.errors import UsageError

SUPPORTED = "docs/your-model.md, 'Supported layers and settings'"
# Converted by the caller, not here: raw_layer returns None for them.
CALLER_CLASSES = ("BatchNormalization", "InputLayer")


def _refuse(layer, why: str):
  raise UsageError("keras_model", f"layer {layer.name!r} ({type(layer).__name__}) is not "
                   f"supported by bnraw's raw twin: {why}; supported layers are listed in "
                   f"{SUPPORTED}")


def _activation(layer, fn) -> str:
  """The name of ``fn``, a Keras built-in activation with default arguments."""
  import keras
  if fn is None:
    return "linear"
  name = getattr(fn, "__name__", None)
  if name in catalog.ACTIVATIONS and keras.activations.get(name) is fn:
    return name
  _refuse(layer, f"activation {name or fn!r} (supported: Keras's built-in activations "
          f"{', '.join(sorted(catalog.ACTIVATIONS))}, by name)")


def _weights(layer, expected: tuple[str, ...]) -> tuple[dict, list[str], bool]:
  """The layer's weights as ``{keras name: value}``, their paths and the layer's trainability,
  checked: built, names as ``expected`` (in order, absent ones skipped), no constraint, no LoRA,
  every variable as trainable as the layer."""
  if not layer.built:
    _refuse(layer, "it is not built (call the model on an input first)")
  if getattr(layer, "lora_enabled", False):
    _refuse(layer, "LoRA is enabled")
  names = [v.name for v in layer.weights]
  if [n for n in expected if n in names] != names:
    _refuse(layer, f"weights {names} (expected {list(expected)})")
  for v in layer.weights:
    if getattr(v, "constraint", None) is not None:
      _refuse(layer, f"a constraint on {v.path} (Keras applies it after each optimizer step)")
    if bool(v.trainable) != bool(layer.trainable):
      _refuse(layer, f"{v.path} is {'' if v.trainable else 'not '}trainable, the layer "
              f"{'' if layer.trainable else 'not'}")
  values = {v.name: v.numpy() for v in layer.weights}
  return values, [v.path for v in layer.weights], bool(layer.trainable)


def _check_common(layer) -> tf.DType:
  """Settings every layer must have; returns its compute dtype."""
  policy = layer.dtype_policy
  if getattr(policy, "quantization_mode", None):
    _refuse(layer, f"quantized ({policy.quantization_mode})")
  if getattr(layer, "data_format", "channels_last") != "channels_last":
    _refuse(layer, f"data_format={layer.data_format!r} (channels_last only)")
  if getattr(layer, "activity_regularizer", None) is not None:
    _refuse(layer, "an activity regularizer (a loss added outside the layer's weights)")
  if not layer.autocast:
    _refuse(layer, "autocast=False")
  dtype = tf.as_dtype(layer.compute_dtype)
  if not dtype.is_floating:
    _refuse(layer, f"compute dtype {dtype.name}")
  return dtype


def _dense(layer, dtype):
  values, paths, trainable = _weights(layer, ("kernel", "bias"))
  return catalog.Dense(layer.name, values["kernel"], values.get("bias"),
                       activation=_activation(layer, layer.activation), trainable=trainable,
                       compute_dtype=dtype, paths=paths)


def _conv(layer, dtype):
  values, paths, trainable = _weights(layer, ("kernel", "bias"))
  rank = len(layer.kernel_size)
  if layer.padding == "causal" and rank != 1:
    _refuse(layer, "causal padding outside Conv1D")
  cls = catalog.Conv1D if rank == 1 else catalog.Conv2D
  return cls(layer.name, values["kernel"], values.get("bias"), strides=layer.strides,
             padding=layer.padding, dilation_rate=layer.dilation_rate,
             activation=_activation(layer, layer.activation), trainable=trainable,
             compute_dtype=dtype, paths=paths)


def _depthwise(layer, dtype):
  values, paths, trainable = _weights(layer, ("kernel", "bias"))
  return catalog.DepthwiseConv(layer.name, values["kernel"], values.get("bias"),
                               strides=layer.strides, padding=layer.padding,
                               dilation_rate=layer.dilation_rate,
                               activation=_activation(layer, layer.activation),
                               trainable=trainable, compute_dtype=dtype, paths=paths)


def _separable(layer, dtype):
  values, paths, trainable = _weights(layer, ("depthwise_kernel", "pointwise_kernel", "bias"))
  return catalog.SeparableConv(layer.name, values["depthwise_kernel"],
                               values["pointwise_kernel"], values.get("bias"),
                               strides=layer.strides, padding=layer.padding,
                               dilation_rate=layer.dilation_rate,
                               activation=_activation(layer, layer.activation),
                               trainable=trainable, compute_dtype=dtype, paths=paths)


def _softmax(layer, dtype):
  axis = layer.axis
  try:  # an int axis that is the last one (axis=1 on a 2-D input) is Keras's tagged softmax
    rank = len(layer.input.shape)
    if isinstance(axis, int) and axis % rank == rank - 1:
      axis = -1
  except (AttributeError, ValueError, TypeError):
    pass
  return catalog.Softmax(layer.name, axis=axis, compute_dtype=dtype)


def _dropout(layer, dtype):
  state = _seed_state(layer)
  kwargs = dict(seed_state=state.numpy() if state is not None else (0, 0),
                state_path=state.path if state is not None else None, compute_dtype=dtype)
  if type(layer).__name__.startswith("Spatial"):
    return catalog.SpatialDropout(layer.name, layer.rate, **kwargs)
  return catalog.Dropout(layer.name, layer.rate, noise_shape=layer.noise_shape, **kwargs)


def _rescaling(layer, dtype):
  import keras
  if keras.config.image_data_format() == "channels_first" and np.ndim(layer.scale) > 0:
    _refuse(layer, "a per-channel scale with image_data_format 'channels_first'")
  return catalog.Rescaling(layer.name, layer.scale, layer.offset, compute_dtype=dtype)


def _builders() -> dict[type, Callable[[Any, tf.DType], Any]]:
  from keras import layers as L
  pool = lambda mode: lambda layer, dtype: catalog.Pooling(  # noqa: E731
      layer.name, mode, layer.pool_size, layer.strides, layer.padding, compute_dtype=dtype)
  global_pool = lambda mode: lambda layer, dtype: catalog.GlobalPooling(  # noqa: E731
      layer.name, mode, keepdims=layer.keepdims, compute_dtype=dtype)
  merge = lambda mode: lambda layer, dtype: catalog.Merge(  # noqa: E731
      layer.name, mode, compute_dtype=dtype)
  return {
      L.Dense: _dense,
      L.Conv1D: _conv,
      L.Conv2D: _conv,
      L.DepthwiseConv1D: _depthwise,
      L.DepthwiseConv2D: _depthwise,
      L.SeparableConv1D: _separable,
      L.SeparableConv2D: _separable,
      L.Activation: lambda layer, dtype: catalog.Activation(
          layer.name, _activation(layer, layer.activation), compute_dtype=dtype),
      L.ReLU: lambda layer, dtype: catalog.ReLU(
          layer.name, max_value=layer.max_value, negative_slope=layer.negative_slope,
          threshold=layer.threshold, compute_dtype=dtype),
      L.LeakyReLU: lambda layer, dtype: catalog.LeakyReLU(
          layer.name, negative_slope=layer.negative_slope, compute_dtype=dtype),
      L.ELU: lambda layer, dtype: catalog.ELU(layer.name, alpha=layer.alpha,
                                              compute_dtype=dtype),
      L.Softmax: _softmax,
      L.MaxPooling1D: pool("max"),
      L.MaxPooling2D: pool("max"),
      L.AveragePooling1D: pool("average"),
      L.AveragePooling2D: pool("average"),
      L.GlobalMaxPooling1D: global_pool("max"),
      L.GlobalMaxPooling2D: global_pool("max"),
      L.GlobalAveragePooling1D: global_pool("average"),
      L.GlobalAveragePooling2D: global_pool("average"),
      L.Flatten: lambda layer, dtype: catalog.Flatten(layer.name, compute_dtype=dtype),
      L.Reshape: lambda layer, dtype: catalog.Reshape(layer.name, layer.target_shape,
                                                      compute_dtype=dtype),
      L.Permute: lambda layer, dtype: catalog.Permute(layer.name, layer.dims,
                                                      compute_dtype=dtype),
      L.ZeroPadding2D: lambda layer, dtype: catalog.ZeroPadding2D(layer.name, layer.padding,
                                                                  compute_dtype=dtype),
      L.Cropping2D: lambda layer, dtype: catalog.Cropping2D(layer.name, layer.cropping,
                                                            compute_dtype=dtype),
      L.Dropout: _dropout,
      L.SpatialDropout1D: _dropout,
      L.SpatialDropout2D: _dropout,
      L.Add: merge("add"),
      L.Subtract: merge("subtract"),
      L.Multiply: merge("multiply"),
      L.Average: merge("average"),
      L.Maximum: merge("maximum"),
      L.Minimum: merge("minimum"),
      L.Concatenate: lambda layer, dtype: catalog.Concatenate(layer.name, axis=layer.axis,
                                                              compute_dtype=dtype),
      L.Rescaling: _rescaling,
      L.Identity: lambda layer, dtype: catalog.Identity(layer.name, compute_dtype=dtype),
  }


def _is_callers(layer) -> bool:
  import keras
  return type(layer).__name__ in CALLER_CLASSES or isinstance(layer, keras.Model)


def raw_layer(keras_layer, node=None) -> Optional[Any]:
  """The raw twin of a built Keras 3 layer, its weights (and Dropout seed state) copied: a
  catalog layer for the classes :func:`_builders` knows (exactly those classes), an
  :class:`OpaqueLayer` for any other (a custom layer, a subclass, a built-in bnraw has no
  hand-written twin for), called at ``node`` (default: its first call).

  Returns None for BatchNormalization, InputLayer and models (the caller converts those).

  Raises:
    UsageError: ("keras_model") one of the layer's settings has no raw twin, or an opaque
      layer holds BN, draws random numbers, updates its state or adds a loss.
  """
  if _is_callers(keras_layer):
    return None
  build = _builders().get(type(keras_layer))
  if build is None:
    return OpaqueLayer(keras_layer.name, keras_layer, node or keras_layer._inbound_nodes[0])
  dtype = _check_common(keras_layer)
  if keras_layer.weights and build not in (_dense, _conv, _depthwise, _separable):
    _refuse(keras_layer, f"unexpected weights {[v.path for v in keras_layer.weights]}")
  return build(keras_layer, dtype)


# keras.ops families whose operations are pure functions of their arguments (no seeds, no
# variables, no control flow): random, image, linalg and core operations are refused.
OP_MODULES = ("keras.src.ops.numpy", "keras.src.ops.nn", "keras.src.ops.math")


class OpNode:
  """A Keras operation on symbolic tensors, e.g. ``Add`` from ``x + 3.0``: called with the raw
  tensors in place of its KerasTensor arguments (``node.arguments.fill_in``, as
  ``Functional._run_through_graph``), constants and keyword arguments as recorded."""

  variables = trainable_variables = state_variables = ()
  regularizable: dict = {}
  opens_own_scope = True  # Keras opens no scope for an operation (graph.name_scope)

  def __init__(self, name: str, operation, arguments):
    self.name, self.operation, self.arguments = name, operation, arguments
    self.keras_tensors = list(arguments.keras_tensors)  # the order of node.input_tensors

  @property
  def kernels(self) -> list:
    return []

  def _fill_in(self, inputs) -> tuple[list, dict]:
    values = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    return self.arguments.fill_in({id(t): v for t, v in zip(self.keras_tensors, values)})

  def __call__(self, inputs, *, training: bool) -> tf.Tensor:
    del training  # an operation has one branch
    args, kwargs = self._fill_in(inputs)
    return self.operation.call(*args, **kwargs)


class OpaqueLayer(OpNode):
  """A layer bnraw has no hand-written twin for (a user's custom layer, InceptionResNetV2's
  ``CustomScaleLayer``, EfficientNet's ``Normalization``), run as Keras runs it: the layer's own
  ``__call__`` (input cast, autocast, ``call``) on the raw tensors, inside a Keras
  ``StatelessScope`` that maps each of its Keras variables to its raw copy, so every read is a
  read of the raw variable and the tape sees it. Its weights are copied, paired and trained like
  any other layer's. Only a pure function of its inputs and weights qualifies: checked once at
  conversion by a call on zeros (no BN inside, no seed generator, no variable written, no
  ``add_loss``)."""

  def __init__(self, name: str, keras_layer, node):
    super().__init__(name, keras_layer, node.arguments)  # self.operation: the Keras layer
    _check_opaque(keras_layer, node)
    trainable = {id(v) for v in keras_layer.trainable_variables}
    self.variables = tuple(tf.Variable(v.numpy(), name=v.path, trainable=id(v) in trainable)
                           for v in keras_layer.weights)
    self.trainable_variables = tuple(
        r for k, r in zip(keras_layer.weights, self.variables) if id(k) in trainable)
    self.compute_dtype = tf.as_dtype(keras_layer.compute_dtype)

  def __call__(self, inputs, *, training: bool) -> tf.Tensor:
    import keras
    args, kwargs = self._fill_in(inputs)
    if "training" in self.operation._call_context_args:  # as Functional's operation_fn
      kwargs["training"] = training
    with keras.StatelessScope(state_mapping=list(zip(self.operation.weights, self.variables))):
      return self.operation(*args, **kwargs)


def _check_opaque(layer, node) -> None:
  """Refuses a layer whose own call is not a pure function of its inputs and weights."""
  import keras
  kind = f"{type(layer).__module__}.{type(layer).__name__}"

  def refuse(why):
    raise UsageError("keras_model", f"layer {layer.name!r} ({kind}) has no hand-written twin "
                     f"and cannot run as an opaque node: {why}; see {SUPPORTED}")
  if not layer.built:
    refuse("it is not built (call the model on an input first)")
  if len(node.outputs) != 1:
    refuse(f"it returns {len(node.outputs)} tensors (bnraw runs layers with one output)")
  for inner in layer._flatten_layers(include_self=False):
    if type(inner).__name__ in ("BatchNormalization",) or isinstance(inner, keras.Model):
      refuse(f"it holds {type(inner).__name__} {inner.name!r} (bnraw must see every BN layer "
             "and model: build the block as a functional sub-model)")
  for inner in layer._flatten_layers(include_self=True):
    if inner._seed_generators:
      refuse("it draws random numbers (a seed generator)")
  zeros = {id(t): tf.zeros([2 if d is None else d for d in t.shape], t.dtype)
           for t in node.arguments.keras_tensors}
  args, kwargs = node.arguments.fill_in(zeros)
  if "training" in layer._call_context_args:
    kwargs["training"] = True
  mapping = [(v, v.value) for v in layer.weights]
  try:
    with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
      before = dict(scope.state_mapping)
      layer(*args, **kwargs)
  except Exception as e:  # a user's call may raise anything on zeros
    refuse(f"a trial call on zeros raised {type(e).__name__}: {str(e).splitlines()[0]}")
  written = [v.path for v in layer.weights
             if scope.state_mapping.get(id(v)) is not before.get(id(v))]
  if written or len(scope.state_mapping) != len(before):
    refuse(f"its call writes {', '.join(written) or 'a variable'} (state updates)")
  if scope.losses:
    refuse("its call adds a loss (add_loss)")


def raw_operation(operation, node, name: str) -> OpNode:
  """The :class:`OpNode` for ``operation`` called at ``node`` of a functional graph.

  Raises:
    UsageError: ("keras_model") an operation outside :data:`OP_MODULES`, or one returning
      several tensors.
  """
  where = f"{type(operation).__module__}.{type(operation).__name__}"
  if type(operation).__module__ not in OP_MODULES:
    raise UsageError("keras_model", f"operation {operation.name!r} ({where}) in the functional "
                     "graph is not supported: bnraw runs keras.ops numpy, nn and math "
                     f"operations; supported layers are listed in {SUPPORTED}")
  if len(node.outputs) != 1:
    raise UsageError("keras_model", f"operation {operation.name!r} ({where}) returns "
                     f"{len(node.outputs)} tensors; bnraw runs operations with one output")
  return OpNode(name, operation, node.arguments)


def _seed_state(keras_layer):
  """The Keras Dropout-family layer's seed-generator state variable, or None (rate 0)."""
  generator = getattr(keras_layer, "seed_generator", None)
  return None if generator is None or keras_layer.rate <= 0 else generator.state


def keras_state_variables(keras_layer) -> list:
  """The Keras variables matching ``raw_layer(keras_layer).state_variables``, in order: a
  Dropout-family layer's seed-generator state (int64 ``[seed, counter]``); [] for others."""
  import keras
  if isinstance(keras_layer, keras.layers.Dropout) and not _is_callers(keras_layer):
    state = _seed_state(keras_layer)
    return [] if state is None else [state]
  return []


__all__ = ["CALLER_CLASSES", "OpNode", "OpaqueLayer", "keras_state_variables", "raw_layer",
           "raw_operation"]
