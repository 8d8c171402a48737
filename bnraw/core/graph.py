"""A raw model: raw layers applied in order (:class:`Model`, the seed network is one) or as a
graph (:class:`Graph`, a user's Keras model's twin), with explicit, Keras-named variables.

For :class:`Model`: The model's last layer produces logits;
the softmax lives in the loss, as Keras's categorical cross-entropy on a Softmax output computes
it (:func:`ops.cross_entropy`). NHWC throughout.

``compute_dtype`` is Keras's dtype policy made explicit: the input is cast to it first, and every
layer computes in it (float32 variables cast on read; BN in float32 inside, see
:class:`bnraw.core.layers.BatchNorm`); the logits come out in it.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from bnraw.core import ops
from bnraw.core.layers import BATCH, BatchNorm, UpdateHook

# What every BN layer normalises with: None = the branch's own (``training`` decides), BATCH =
# every layer its batch moments without updates, or per layer name (absent names: the branch).
StatisticsChoice = Union[None, str, Mapping[str, Union[ops.Moments, str]]]


class Forward(NamedTuple):
  """One pass's logits and, per BN layer (first to last), what it normalised with and ``n``."""

  logits: tf.Tensor
  statistics: list[ops.Moments]
  counts: list[tf.Tensor]


class Node(NamedTuple):
  """One call of a layer in a :class:`Graph`: the value ids it reads (0 is the model's input,
  node k's output is value k + 1); several ids: a list argument (a merge layer)."""

  layer: object
  inputs: tuple[int, ...]


class Model:
  """Layers in order; ``model(x, training=...)`` is Keras's ``model(x, training=...)``, state
  changes included."""

  def __init__(self, name: str, layers: Sequence, *, l2: float = 0.0,
               compute_dtype: str = "float32"):
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
      raise ValueError(f"layer names must be unique: {names}")
    self.name, self.layers, self.l2 = name, list(layers), l2
    self.compute_dtype = tf.as_dtype(compute_dtype)
    self.batch_norms: list[BatchNorm] = [l for l in self.layers if isinstance(l, BatchNorm)]
    # a chain: node k reads value k (the input, or layer k-1's output); Graph sets its own
    self.nodes = [Node(layer, (k,)) for k, layer in enumerate(self.layers)]
    self.output_activation: Optional[Callable] = None  # see Graph

  @property
  def variables(self) -> list[tf.Variable]:
    """Every variable in Keras's ``model.weights`` order (layer by layer)."""
    return [v for layer in self.layers for v in layer.variables]

  @property
  def trainable_variables(self) -> list[tf.Variable]:
    """In Keras's ``model.trainable_variables`` order: the optimizer's slots follow it."""
    return [v for layer in self.layers for v in layer.trainable_variables]

  @property
  def kernels(self) -> list[tf.Variable]:
    return [k for layer in self.layers for k in layer.kernels]

  def layer(self, name: str):
    """The layer called ``name`` (Keras's ``model.get_layer``)."""
    for layer in self.layers:
      if layer.name == name:
        return layer
    raise KeyError(f"no layer {name!r}; layers: {', '.join(l.name for l in self.layers)}")

  def count_parameters(self) -> int:
    """Keras's ``count_params()``: every weight, moving statistics included."""
    return sum(int(np.prod(v.shape)) for v in self.variables)

  def __call__(self, x: tf.Tensor, *, training: bool, statistics: StatisticsChoice = None,
               hook: Optional[UpdateHook] = None) -> Forward:
    """Runs every layer in ``training``'s branch; ``statistics`` overrides what BN layers
    normalise with (those layers then change no state; see :meth:`BatchNorm.__call__`)."""
    if statistics is not None and not isinstance(statistics, str):
      unknown = set(statistics) - {layer.name for layer in self.batch_norms}
      if unknown:
        raise KeyError(f"no BN layer {sorted(unknown)}")
    used, counts = [], []
    values = [tf.cast(x, self.compute_dtype)]  # Keras casts a model's float inputs to its policy
    last = len(self.nodes) - 1
    for k, (layer, inputs) in enumerate(self.nodes):
      h = values[inputs[0]] if len(inputs) == 1 else [values[i] for i in inputs]
      if isinstance(layer, BatchNorm):
        out = layer(h, training=training, statistics=self._choice(statistics, layer), hook=hook)
        h = out.y
        used.append(out.statistics)
        counts.append(out.count)
      elif k == last and self.output_activation is not None:  # the loss applies it
        h = layer.preactivation(h, training=training)
      else:
        h = layer(h, training=training)
      values.append(h)
    return Forward(values[-1], used, counts)

  def loss(self, logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """What fit and evaluate report: cross-entropy (float32, :func:`ops.cross_entropy`), plus
    each kernel's L2 term when l2 > 0, summed as Keras's ``compute_loss`` sums them (one
    ``reduce_sum`` over the stacked terms: the rounding of a stacked sum, not a chain of adds)."""
    loss = ops.cross_entropy(logits, labels)
    if self.l2 == 0:  # Keras then adds no loss term at all
      return loss
    return tf.reduce_sum(tf.stack([loss, *ops.l2_terms(self.kernels, self.l2)]))

  def correct(self, logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """The metric's sum over this batch (fit averages it per example): arg-max hits."""
    return ops.correct_predictions(logits, labels)

  def _choice(self, statistics: StatisticsChoice, layer: BatchNorm):
    return (statistics if statistics is None or isinstance(statistics, str)
            else statistics.get(layer.name))


class Graph(Model):
  """A user's model as raw nodes in Keras's execution order (nested models inlined, their layers
  named by path, e.g. ``backbone/bn_1``); each layer is called once.

  What fit's train step does with it, made explicit by the converter (bnraw.models.twin):
  ``loss_fn(y_true, y_pred, logits)`` is the compiled loss, ``metric_fn(y_true, y_pred)`` the first
  compiled metric per example (None: no metric), ``regularizers`` the ``(variable, penalty)``
  pairs in Keras's ``model.losses`` order. When the output comes from a softmax or sigmoid,
  ``output_activation`` names it: the forward pass stops before it (``Forward.logits`` is the
  pre-activation) and the loss applies it, handing the logits on when ``loss_uses_logits`` (as
  Keras's cross-entropy recovers ``_keras_logits``).
  """

  def __init__(self, name: str, nodes: Sequence[Node], *, variables: Sequence[tf.Variable],
               trainable_variables: Sequence[tf.Variable],
               state_variables: Sequence[tf.Variable] = (), loss_fn: Callable,
               metric_fn: Optional[Callable] = None, regularizers: Sequence = (),
               output_activation: Optional[Callable] = None, loss_uses_logits: bool = False,
               compute_dtype: str = "float32"):
    layers = [node.layer for node in nodes]
    if len({id(layer) for layer in layers}) != len(layers):
      raise ValueError("each layer must be called once")
    super().__init__(name, layers, compute_dtype=compute_dtype)
    self.nodes = list(nodes)
    self._variables, self._trainable = list(variables), list(trainable_variables)
    self.state_variables = list(state_variables)
    self.loss_fn, self.metric_fn, self.regularizers = loss_fn, metric_fn, list(regularizers)
    self.output_activation, self.loss_uses_logits = output_activation, loss_uses_logits

  @property
  def variables(self) -> list[tf.Variable]:
    return self._variables

  @property
  def trainable_variables(self) -> list[tf.Variable]:
    return self._trainable

  @property
  def kernels(self) -> list[tf.Variable]:
    return [variable for variable, _ in self.regularizers]

  def predictions(self, logits: tf.Tensor) -> tf.Tensor:
    """``y_pred``: the model's output from what the forward pass returned."""
    return logits if self.output_activation is None else self.output_activation(logits)

  def loss(self, logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Keras's ``compute_loss``: the compiled loss, then each regularisation penalty (summed on
    its own, as ``_aggregate_additional_loss``), all summed as one stacked ``reduce_sum``."""
    loss = self.loss_fn(labels, self.predictions(logits),
                        logits if self.loss_uses_logits else None)
    if not self.regularizers:
      return loss
    terms = [tf.reduce_sum(penalty(variable)) for variable, penalty in self.regularizers]
    return tf.reduce_sum(tf.stack([loss, *terms]))

  def correct(self, logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """The first compiled metric's sum over this batch (0 without a metric)."""
    if self.metric_fn is None:
      return tf.constant(0.0)
    return tf.reduce_sum(tf.cast(self.metric_fn(labels, self.predictions(logits)), tf.float32))


__all__ = ["BATCH", "Forward", "Graph", "Model", "Node", "StatisticsChoice"]
