"""A raw model: raw layers called as nodes of a graph in Keras's execution order, with
explicit, Keras-named variables. The seed network is a chain of them (:func:`chain`); a user's
Keras model's twin is any graph (bnraw.models.twin). NHWC throughout.

What fit's train step does with a model is made explicit by whoever builds it: ``loss_fn(y_true,
y_pred, logits)`` is the compiled loss, ``metric_fn(y_true, y_pred)`` the first compiled metric
per example (None: no metric), ``regularizers`` the ``(variable, penalty)`` pairs in Keras's
``model.losses`` order. When the output comes from a softmax or sigmoid, ``output_activation``
names it: the forward pass stops before it (``Forward.logits`` is the pre-activation) and the loss
applies it, handing the logits on when ``loss_uses_logits`` (as Keras's cross-entropy recovers
``_keras_logits``).

``compute_dtype`` is Keras's dtype policy made explicit: the input is cast to it first, and every
layer computes in it (float32 variables cast on read; BN in float32 inside, see
:class:`bnraw.core.layers.BatchNorm`); the logits come out in it.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from bnraw.core import ops
from bnraw.core.layers import BATCH, BatchNorm, Switch, UpdateHook

# What every BN layer normalises with: None = the branch's own (``training`` decides), BATCH =
# every layer its batch moments without updates, or per layer name (absent names: the branch;
# see BatchNorm.__call__ for Moments, BATCH and Switch).
StatisticsChoice = Union[None, str, Mapping[str, Union[ops.Moments, Switch, str]]]


class Forward(NamedTuple):
  """One pass's logits and, per BN layer (first to last), what it normalised with and ``n``."""

  logits: tf.Tensor
  statistics: list[ops.Moments]
  counts: list[tf.Tensor]


class Node(NamedTuple):
  """One call of a layer in a :class:`Model`: the value ids it reads (0 is the model's input,
  node k's output is value k + 1); several ids: a list argument (a merge layer)."""

  layer: object
  inputs: tuple[int, ...]


def chain(layers: Sequence) -> list[Node]:
  """Layers applied in order: node k reads value k (the input, or layer k-1's output)."""
  return [Node(layer, (k,)) for k, layer in enumerate(layers)]


def name_scope(layer):
  """The name scope a layer's ops are created in, Keras's: ``{layer}/`` inside the model's
  (nested layers by path, ``backbone/conv/``). Grappler sorts the inputs of commutative ops
  (AddN, Add, Mul) by node name, so the order in which gradients are summed, and their rounding,
  follows the names: the twin must name its ops as Keras does to be bit-identical. A layer
  with ``opens_own_scope`` (BN, and a Keras layer run opaquely) opens its leaf itself; an
  operation (``x + 3.0``) opens none, as in Keras."""
  own = getattr(layer, "opens_own_scope", False)
  scope = layer.name.rpartition("/")[0] if own else layer.name
  return tf.name_scope(scope) if scope else contextlib.nullcontext()


class Model:
  """Nodes in Keras's execution order (nested models inlined, their layers named by path, e.g.
  ``backbone/bn_1``), each layer called once; ``model(x, training=...)`` is Keras's
  ``model(x, training=...)``, state changes included. ``variables`` and
  ``trainable_variables`` default to the layers' own, layer by layer (Keras's ``model.weights``
  order for a chain)."""

  def __init__(self, name: str, nodes: Sequence[Node], *, loss_fn: Callable,
               variables: Optional[Sequence[tf.Variable]] = None,
               trainable_variables: Optional[Sequence[tf.Variable]] = None,
               state_variables: Sequence[tf.Variable] = (),
               metric_fn: Optional[Callable] = None, regularizers: Sequence = (),
               output_activation: Optional[Callable] = None, loss_uses_logits: bool = False,
               compute_dtype: str = "float32"):
    self.nodes = list(nodes)
    self.layers = [node.layer for node in self.nodes]
    names = [layer.name for layer in self.layers]
    if len(set(names)) != len(names):
      raise ValueError(f"layer names must be unique: {names}")
    if len({id(layer) for layer in self.layers}) != len(self.layers):
      raise ValueError("each layer must be called once")
    self.name = name
    self.compute_dtype = tf.as_dtype(compute_dtype)
    self.batch_norms: list[BatchNorm] = [l for l in self.layers if isinstance(l, BatchNorm)]
    self.variables = (list(variables) if variables is not None
                      else [v for layer in self.layers for v in layer.variables])
    self.trainable_variables = (
        list(trainable_variables) if trainable_variables is not None
        else [v for layer in self.layers for v in layer.trainable_variables])
    self.state_variables = list(state_variables)
    self.loss_fn, self.metric_fn, self.regularizers = loss_fn, metric_fn, list(regularizers)
    self.output_activation, self.loss_uses_logits = output_activation, loss_uses_logits

  @property
  def kernels(self) -> list[tf.Variable]:
    """The regularised variables, in ``model.losses`` order."""
    return [variable for variable, _ in self.regularizers]

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
               hook: Optional[UpdateHook] = None,
               outputs: Optional[dict] = None) -> Forward:
    """Runs every layer in ``training``'s branch; ``statistics`` overrides what BN layers
    normalise with (those layers then change no state; see :meth:`BatchNorm.__call__`).
    ``outputs``: a dict that receives each layer's output by layer name."""
    self._check_names(statistics)
    used, counts = [], []
    last = len(self.nodes) - 1
    with tf.name_scope(self.name):  # Keras's op names: "{model}/{layer}/...", see name_scope
      values = [tf.cast(x, self.compute_dtype)]  # Keras casts float inputs to the policy
      for k, (layer, inputs) in enumerate(self.nodes):
        h = values[inputs[0]] if len(inputs) == 1 else [values[i] for i in inputs]
        with name_scope(layer):
          if isinstance(layer, BatchNorm):
            out = layer(h, training=training, statistics=self._choice(statistics, layer),
                        hook=hook)
            h = out.y
            used.append(out.statistics)
            counts.append(out.count)
          elif k == last and self.output_activation is not None:  # the loss applies it
            h = layer.preactivation(h, training=training)
          else:
            h = layer(h, training=training)
        values.append(h)
        if outputs is not None:
          outputs[layer.name] = h
    return Forward(values[-1], used, counts)

  def predictions(self, logits: tf.Tensor) -> tf.Tensor:
    """``y_pred``: the model's output from what the forward pass returned."""
    return logits if self.output_activation is None else self.output_activation(logits)

  def loss(self, logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """What fit and evaluate report, Keras's ``compute_loss``: the compiled loss, then each
    regularisation penalty (summed on its own, as ``_aggregate_additional_loss``), all summed as
    one stacked ``reduce_sum`` (the rounding of a stacked sum, not a chain of adds); no
    regulariser: the loss alone, as Keras adds no term at all."""
    loss = self.loss_fn(labels, self.predictions(logits),
                        logits if self.loss_uses_logits else None)
    if not self.regularizers:
      return loss
    terms = [tf.reduce_sum(penalty(variable)) for variable, penalty in self.regularizers]
    return tf.reduce_sum(tf.stack([loss, *terms]))

  def correct(self, logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """The first compiled metric's sum over this batch (fit averages it per example; 0 without
    a metric)."""
    if self.metric_fn is None:
      return tf.constant(0.0)
    return tf.reduce_sum(tf.cast(self.metric_fn(labels, self.predictions(logits)), tf.float32))

  def _check_names(self, statistics: StatisticsChoice) -> None:
    if statistics is not None and not isinstance(statistics, str):
      unknown = set(statistics) - {layer.name for layer in self.batch_norms}
      if unknown:
        raise KeyError(f"no BN layer {sorted(unknown)}")

  def _choice(self, statistics: StatisticsChoice, layer: BatchNorm):
    return (statistics if statistics is None or isinstance(statistics, str)
            else statistics.get(layer.name))


def switch_arguments(model: Model, statistics: StatisticsChoice
                     ) -> tuple[list[ops.Moments], tf.Tensor]:
  """``statistics`` for the inference branch (BATCH, or per layer name Moments or BATCH; a
  layer not named keeps its moving statistics) as the arguments of a forward that takes
  :func:`switched` statistics: every BN layer's given moments, and a bool vector saying which
  layers take their batch's instead. Any choice has the same structure, so a compiled forward
  traces once for all of them."""
  model._check_names(statistics)
  given, use_batch = [], []
  for layer in model.batch_norms:
    choice = model._choice(statistics, layer)
    if isinstance(choice, str) and choice != BATCH:
      raise ValueError(f"statistics must be BATCH, Moments or None, got {choice!r}")
    moments = layer.moving if choice is None or choice == BATCH else ops.Moments(*choice)
    given.append(ops.Moments(tf.convert_to_tensor(moments.mean, tf.float32),
                             tf.convert_to_tensor(moments.variance, tf.float32)))
    use_batch.append(isinstance(choice, str))
  return given, tf.constant(use_batch, tf.bool, shape=[len(use_batch)])


def switched(model: Model, given: Sequence[ops.Moments], use_batch: tf.Tensor) -> dict:
  """The ``statistics`` argument from :func:`switch_arguments`'s values (inside a traced
  forward): layer j its batch's moments where ``use_batch[j]``, else ``given[j]``."""
  return {layer.name: Switch(use_batch[j], given[j])
          for j, layer in enumerate(model.batch_norms)}


__all__ = ["BATCH", "Forward", "Model", "Node", "StatisticsChoice", "Switch", "chain",
           "switch_arguments", "switched"]
