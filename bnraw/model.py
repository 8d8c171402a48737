"""The seed's ``model_toy`` with explicit variables, created up front with Keras-style names.

Blocks 1-7: ``Conv2D(VALID, +bias) -> ReLU -> BN``; block 8: ``Flatten -> Dense -> ReLU -> BN``;
block 9: ``Dense -> softmax`` (the softmax lives in the loss; :meth:`SeedNet.forward` returns
logits). Note ReLU comes *before* BN. NHWC throughout.

Variables: ``conv_{i}/kernel``, ``conv_{i}/bias`` (i = 1..7), ``dense_8/*``, ``dense_9/*`` and
``bn_{i}/{gamma,beta,moving_mean,moving_variance}`` (i = 1..8).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf

from bnraw import ops
from bnraw.batchnorm import BatchNorm, UpdateHook, update_moving_statistics
from bnraw.config import CONV_BLOCKS, IMAGE_SIZE, NUM_IMAGES, ModelConfig


class Forward(NamedTuple):
  """What one pass returns besides the logits, per BN layer (first to last)."""

  logits: tf.Tensor
  statistics: list[ops.Moments]  # what each BN layer normalised with
  counts: list[tf.Tensor]  # n = values per channel each layer saw (N*H*W)


def glorot_uniform(shape: Sequence[int], seed: tuple[int, int]) -> tf.Tensor:
  """Keras's default kernel initialiser: U(-l, l), ``l = sqrt(6 / (fan_in + fan_out))``,
  with fans counted over the receptive field (kh * kw * channels)."""
  receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
  fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
  limit = np.sqrt(6.0 / (fan_in + fan_out))
  return tf.random.stateless_uniform(shape, seed, -limit, limit, dtype=tf.float32)


class Linear(NamedTuple):
  """A conv or dense layer's kernel and bias."""

  kernel: tf.Variable
  bias: tf.Variable

  @classmethod
  def create(cls, name: str, shape: Sequence[int], seed: tuple[int, int]) -> "Linear":
    return cls(tf.Variable(glorot_uniform(shape, seed), name=f"{name}/kernel"),
               tf.Variable(tf.zeros([shape[-1]]), name=f"{name}/bias"))


class SeedNet:
  """Seed network; ``model(x, training=...)`` is the Keras layer's call, state changes included."""

  def __init__(self, config: ModelConfig = ModelConfig(), seed: int = 0):
    self.config = config
    self.kernel_sizes = [k for k, _ in CONV_BLOCKS]
    channels_in = 3
    self.convs: list[Linear] = []
    self.bns: list[BatchNorm] = []
    bn = dict(momentum=config.momentum, epsilon=config.epsilon)
    dense_bessel = config.bessel and config.bessel_scope == "all"
    for i, (k, c) in enumerate(zip(self.kernel_sizes, config.conv_channels()), start=1):
      self.convs.append(Linear.create(f"conv_{i}", [k, k, channels_in, c], (seed, i)))
      self.bns.append(BatchNorm.create(f"bn_{i}", c, bessel=config.bessel, **bn))
      channels_in = c
    side = IMAGE_SIZE - sum(k - 1 for k in self.kernel_sizes)
    units = config.dense_units()
    self.dense_8 = Linear.create("dense_8", [side * side * channels_in, units], (seed, 8))
    self.bns.append(BatchNorm.create("bn_8", units, bessel=dense_bessel, **bn))
    self.dense_9 = Linear.create("dense_9", [units, NUM_IMAGES], (seed, 9))

  # -- variables ------------------------------------------------------------------------------

  @property
  def trainable_variables(self) -> list[tf.Variable]:
    """In Keras's order: per block kernel, bias, gamma, beta; then the two dense layers."""
    out = []
    for conv, bn in zip(self.convs, self.bns):
      out += [conv.kernel, conv.bias, bn.gamma, bn.beta]
    out += [self.dense_8.kernel, self.dense_8.bias, self.bns[-1].gamma, self.bns[-1].beta,
            self.dense_9.kernel, self.dense_9.bias]
    return out

  @property
  def kernels(self) -> list[tf.Variable]:
    return [conv.kernel for conv in self.convs] + [self.dense_8.kernel, self.dense_9.kernel]

  @property
  def variables(self) -> list[tf.Variable]:
    """Every variable in Keras's ``model.weights`` order (moving statistics after beta)."""
    out = []
    for conv, bn in zip(self.convs, self.bns):
      out += [conv.kernel, conv.bias, bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance]
    last = self.bns[-1]
    out += [self.dense_8.kernel, self.dense_8.bias, last.gamma, last.beta, last.moving_mean,
            last.moving_variance, self.dense_9.kernel, self.dense_9.bias]
    return out

  def count_parameters(self) -> int:
    """Keras's ``count_params()``: every weight, moving statistics included."""
    return sum(int(np.prod(v.shape)) for v in self.variables)

  # -- computation ----------------------------------------------------------------------------

  def forward(self, x: tf.Tensor,
              statistics: Sequence[Optional[ops.Moments]]) -> Forward:
    """Pure pass: BN layer i normalises with ``statistics[i]``, or with its own batch moments
    where that entry is None (the training branch's normalisation). Changes no state."""
    used, counts = [], []

    def block_bn(h, layer, chosen):
      with tf.name_scope(layer.name):  # op names "bn_3/moments/..." survive into XLA's HLO
        stats = ops.moments(h) if chosen is None else chosen
        used.append(stats)
        counts.append(ops.elements_per_channel(h))
        return layer.normalize(h, stats)

    h = x
    for conv, layer, chosen in zip(self.convs, self.bns, statistics):
      covers_input = tuple(h.shape[1:3]) == tuple(conv.kernel.shape[:2])
      conv_op = ops.conv2d_as_matmul if self.config.fast_conv and covers_input else ops.conv2d
      h = block_bn(ops.relu(conv_op(h, conv.kernel, conv.bias)), layer, chosen)
    h = tf.reshape(h, (tf.shape(h)[0], -1))
    h = block_bn(ops.relu(ops.dense(h, *self.dense_8)), self.bns[-1], statistics[-1])
    logits = ops.dense(h, *self.dense_9)
    return Forward(logits, used, counts)

  def __call__(self, x: tf.Tensor, *, training: bool,
               hook: Optional[UpdateHook] = None) -> Forward:
    """Keras semantics. ``training=True``: normalise with batch moments and update every layer's
    moving statistics from them. ``training=False``: normalise with the moving statistics."""
    if not training:
      return self.forward(x, [layer.moving for layer in self.bns])
    out = self.forward(x, [None] * len(self.bns))
    for layer, stats, n in zip(self.bns, out.statistics, out.counts):
      update_moving_statistics(layer, stats, n, hook)
    return out

  def loss(self, logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """What fit and evaluate report: cross-entropy, plus the L2 penalty when l2 > 0."""
    loss = ops.softmax_cross_entropy(logits, labels)
    penalty = self.regularization()
    return loss if penalty is None else tf.add_n([loss, penalty])

  def regularization(self) -> Optional[tf.Tensor]:
    """The L2 penalty on kernels, or None when l2 is 0 (Keras then adds no loss term at all)."""
    if self.config.l2 == 0:
      return None
    return ops.l2_penalty(self.kernels, self.config.l2)
