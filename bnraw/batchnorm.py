"""BatchNormalization as explicit state: four variables and the one place they change.

Training branch (``training=True``)::

    mean, variance = biased moments of x over N,H,W       (ops.moments)
    y = gamma * (x - mean) / sqrt(variance + eps) + beta  (ops.normalize)
    moving_mean     <- moving_mean     * m + mean     * (1 - m)
    moving_variance <- moving_variance * m + variance' * (1 - m)

with ``variance' = variance * n / (n - 1)`` in the legacy ("bessel") variant and ``variance``
otherwise. Inference branch (``training=False``): the same normalisation with the moving
statistics; no state changes. ``m`` is Keras's momentum.

The moving statistics are updated in exactly one function, :func:`update_moving_statistics`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import tensorflow as tf

from bnraw import ops

# Called eagerly as hook(layer, moving, batch) just before a layer's moving update: the
# step-debugger (bnraw.debug) puts a breakpoint here. None in normal runs.
UpdateHook = Callable[["BatchNorm", ops.Moments, ops.Moments], None]


@dataclasses.dataclass
class BatchNorm:
  """One BN layer's variables (Keras names ``{name}/gamma`` ... ``{name}/moving_variance``)."""

  name: str
  gamma: tf.Variable
  beta: tf.Variable
  moving_mean: tf.Variable
  moving_variance: tf.Variable
  momentum: float
  epsilon: float
  bessel: bool = False

  @classmethod
  def create(cls, name: str, channels: int, *, momentum: float, epsilon: float,
             bessel: bool) -> "BatchNorm":
    """Keras initial values: gamma 1, beta 0, moving mean 0, moving variance 1."""
    def var(suffix, value, trainable):
      return tf.Variable(tf.fill([channels], value), name=f"{name}/{suffix}", trainable=trainable)
    return cls(name, var("gamma", 1.0, True), var("beta", 0.0, True),
               var("moving_mean", 0.0, False), var("moving_variance", 1.0, False),
               momentum=momentum, epsilon=epsilon, bessel=bessel)

  @property
  def moving(self) -> ops.Moments:
    """The moving statistics, read now."""
    return ops.Moments(tf.identity(self.moving_mean), tf.identity(self.moving_variance))

  def normalize(self, x: tf.Tensor, statistics: ops.Moments) -> tf.Tensor:
    """``gamma * (x - mean) / sqrt(variance + eps) + beta`` with the given statistics."""
    return ops.normalize(x, statistics, self.gamma, self.beta, self.epsilon)


def update_moving_statistics(layer: BatchNorm, batch: ops.Moments, n: tf.Tensor,
                             hook: Optional[UpdateHook] = None) -> None:
  """Assigns the moving-average update of ``layer`` from this batch's biased moments.

  ``n`` is the number of values per channel behind ``batch`` (N*H*W); the legacy variant feeds
  ``variance * n / (n - 1)`` into the moving variance.
  """
  with tf.name_scope(f"{layer.name}_moving_update"):  # findable in graphs and XLA's HLO
    variance = ops.bessel_variance(batch.variance, n) if layer.bessel else batch.variance
    if hook is not None:
      hook(layer, layer.moving, ops.Moments(batch.mean, variance))
    layer.moving_mean.assign(ops.moving_average(layer.moving_mean, batch.mean, layer.momentum))
    layer.moving_variance.assign(
        ops.moving_average(layer.moving_variance, variance, layer.momentum))
