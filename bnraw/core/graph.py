"""A raw model: raw layers applied in order, with explicit, Keras-named variables.

The seed network (bnraw.models.seed) is one instance. The model's last layer produces logits;
the softmax lives in the loss, as Keras's categorical cross-entropy on a Softmax output computes
it (:func:`ops.cross_entropy`). NHWC throughout.

``compute_dtype`` is Keras's dtype policy made explicit: the input is cast to it first, and every
layer computes in it (float32 variables cast on read; BN in float32 inside, see
:class:`bnraw.core.layers.BatchNorm`); the logits come out in it.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Sequence, Union

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
    h = tf.cast(x, self.compute_dtype)  # Keras casts a model's float inputs to its policy
    for layer in self.layers:
      if isinstance(layer, BatchNorm):
        chosen = (statistics if statistics is None or isinstance(statistics, str)
                  else statistics.get(layer.name))
        out = layer(h, training=training, statistics=chosen, hook=hook)
        h = out.y
        used.append(out.statistics)
        counts.append(out.count)
      else:
        h = layer(h, training=training)
    return Forward(h, used, counts)

  def loss(self, logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """What fit and evaluate report: cross-entropy (float32, :func:`ops.cross_entropy`), plus
    each kernel's L2 term when l2 > 0, summed as Keras's ``compute_loss`` sums them (one
    ``reduce_sum`` over the stacked terms: the rounding of a stacked sum, not a chain of adds)."""
    loss = ops.cross_entropy(logits, labels)
    if self.l2 == 0:  # Keras then adds no loss term at all
      return loss
    return tf.reduce_sum(tf.stack([loss, *ops.l2_terms(self.kernels, self.l2)]))


__all__ = ["BATCH", "Forward", "Model", "StatisticsChoice"]
