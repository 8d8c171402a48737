"""Pure maths of the raw layers and losses: no variables, no state, NHWC throughout.

Every function mirrors the TensorFlow operations that Keras 3.15 (TF backend) emits for the same
layer, in the same order, so that the raw path reproduces Keras bit for bit where it can:

* Conv2D: ``tf.nn.convolution(VALID)`` then ``ops.add(x, reshape(bias, (1, 1, 1, C)))``, and
  Dense: ``matmul`` then ``ops.add(x, bias)``; Keras's TF ``add`` turns a bias-shaped operand into
  ``tf.nn.bias_add`` (see :func:`add`), whose gradient (BiasAddGrad) rounds differently from
  the broadcast-add gradient.
* BatchNormalization: ``tf.nn.moments`` (biased) and ``tf.nn.batch_normalization``.
* categorical cross-entropy on a softmax output: ``softmax_cross_entropy_with_logits`` on the
  logits, reduced as "sum over batch size"; under a mixed policy, from the probabilities
  (:func:`cross_entropy`).
* Mixed precision: layers cast inputs, kernels and biases to the compute dtype (a ``tf.cast`` to
  the same dtype is no op, so float32 graphs are unchanged); BN works in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf


class Moments(NamedTuple):
  """Per-channel statistics a BN layer normalises with (shape ``[C]`` each)."""

  mean: tf.Tensor
  variance: tf.Tensor


def add(x1: tf.Tensor, x2: tf.Tensor) -> tf.Tensor:
  """``x1 + x2`` as Keras 3's TF ``ops.add`` computes it (backend/tensorflow/numpy.py), the one
  rule for every bias and every merge: where ``x2`` squeezes to a vector whose (static) length is
  ``x1``'s second or last dimension, a ``tf.nn.bias_add`` (NHWC when it is the last), else a
  broadcast ``tf.add``. Same values; the gradients round differently (BiasAddGrad against the
  broadcast add's reduction)."""
  squeezed = [d for d in x2.shape.as_list() if d is None or d > 1]
  if (len(squeezed) == 1 and x1.shape.rank > 1 and squeezed[0] is not None
      and squeezed[0] in {x1.shape[1], x1.shape[-1]}):
    data_format = "NHWC" if x1.shape[-1] == squeezed[0] else "NCHW"
    if x2.shape.rank > 1:
      x2 = tf.squeeze(x2)
    return tf.nn.bias_add(x1, x2, data_format=data_format)
  return tf.add(x1, x2)


def conv2d_as_matmul(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
  """A VALID, stride-1 convolution whose kernel covers the whole input (output
  ``[N, 1, 1, Cout]``), as one matmul: ``reshape(x, [N, kh*kw*Cin]) @ reshape(kernel,
  [kh*kw*Cin, Cout])``, still ``[N, Cout]``.

  The same sum of products, taken in another order: not bit-identical to Keras's conv, within
  the compare tolerance, and 4-5x faster on CPU (oneDNN runs a 1x1-output conv at ~35 GFLOP/s,
  the matmul near the ceiling; docs/measurements.md, "Speed: the profile").
  """
  if x.shape[1:3] != kernel.shape[:2]:
    raise ValueError(f"conv2d_as_matmul needs a kernel covering the input: {x.shape} vs "
                     f"{kernel.shape}")
  return tf.matmul(tf.reshape(x, (-1, x.shape[1] * x.shape[2] * x.shape[3])),
                   tf.reshape(kernel, (-1, kernel.shape[-1])))


def reduction_axes(x: tf.Tensor, axis: int = -1) -> list[int]:
  """Every axis of ``x`` but ``axis`` (the channel axis): what BN's moments average over."""
  channel = axis % x.shape.rank
  return [a for a in range(x.shape.rank) if a != channel]


def moments(x: tf.Tensor, axis: int = -1) -> Moments:
  """Biased batch moments over every axis but ``axis`` (N,H,W for NHWC convs, N for dense).

  ``mean = E[x]``, ``variance = E[(x - mean)^2]`` (divides by n, not n - 1), as ``tf.nn.moments``
  computes them (the variance is taken around the stop-gradient mean, then squared difference).
  """
  mean, variance = tf.nn.moments(x, reduction_axes(x, axis))
  return Moments(mean, variance)


def moments_one_pass(x: tf.Tensor, axis: int = -1) -> Moments:
  """The synchronized BN's moments (Keras's ``_compute_moments_sync``), on one device or
  summed over the replicas of a strategy (bnraw.core.replicas):
  ``mean = S1 / n``, ``variance = max(S2 / n - mean^2, 0)`` from per-channel sums ``S1 = sum x``,
  ``S2 = sum x^2`` and the count ``n``, each summed keeping dimensions, then squeezed. Differs
  from :func:`moments` in rounding, visibly so for inputs with a large mean."""
  axes = reduction_axes(x, axis)
  count = tf.reduce_sum(tf.ones_like(x), axis=axes, keepdims=True)
  total = tf.reduce_sum(x, axis=axes, keepdims=True)
  squares = tf.reduce_sum(tf.square(x), axis=axes, keepdims=True)
  # the BN all-reduce: under a strategy with several replicas, each sum over all of them
  # (three all-reduces, Keras's order: sum, sum of squares, count); one replica: as they are
  context = tf.distribute.get_replica_context()
  if context is not None and context.num_replicas_in_sync > 1:
    total, squares, count = [context.all_reduce(tf.distribute.ReduceOp.SUM, t)
                             for t in (total, squares, count)]
  mean = tf.math.divide_no_nan(total, count)
  variance = tf.maximum(tf.math.divide_no_nan(squares, count) - tf.square(mean), 0.0)
  return Moments(tf.squeeze(mean, axes), tf.squeeze(variance, axes))


def elements_per_channel(x: tf.Tensor, axis: int = -1) -> tf.Tensor:
  """n, the number of values each channel's moments average over (N*H*W), as float32."""
  shape = tf.shape(x)
  return tf.cast(tf.reduce_prod(tf.gather(shape, reduction_axes(x, axis))), x.dtype)


def normalize(x: tf.Tensor, statistics: Moments, gamma, beta, epsilon: float,
              axis: int = -1) -> tf.Tensor:
  """``gamma * (x - mean) / sqrt(variance + epsilon) + beta``, per channel (``axis``);
  ``gamma``/``beta`` None: Keras's ``scale=False``/``center=False``.

  ``tf.nn.batch_normalization`` evaluates it as ``x * inv + (beta - mean * inv)`` with
  ``inv = rsqrt(variance + epsilon) * gamma``; we call it so the rounding is Keras's, and, for a
  channel axis other than -1, reshape every per-channel operand first as Keras's TF backend does.
  """
  mean, variance = statistics
  if axis != -1:
    shape = [1] * x.shape.rank
    shape[axis] = mean.shape[0]
    mean, variance = tf.reshape(mean, shape), tf.reshape(variance, shape)
    gamma = None if gamma is None else tf.reshape(gamma, shape)
    beta = None if beta is None else tf.reshape(beta, shape)
  return tf.nn.batch_normalization(x, mean, variance, beta, gamma, epsilon)


def moving_average(moving: tf.Tensor, batch: tf.Tensor, momentum: float) -> tf.Tensor:
  """Keras's moving-statistics update: ``moving * momentum + batch * (1 - momentum)``.

  ``momentum`` is Keras's (0.9 here is PyTorch's 0.1). ``momentum=0`` makes the result the batch
  value; ``momentum=1`` freezes it.
  """
  return moving * momentum + batch * (1.0 - momentum)


def bessel_variance(variance: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
  """Unbiased variance ``variance * n / (n - 1)``: what Keras 2.2.4 / tf_keras's fused kernel
  feed into the moving variance (normalisation still uses the biased one). ``n = 1`` gives
  ``inf``; the flags refuse batches that small with --bessel."""
  return variance * (n / (n - 1.0))


def cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  """The seed's loss as Keras computes it for this logits dtype: float32 logits take
  :func:`softmax_cross_entropy`; float16/bfloat16 ones (a mixed policy) go through the softmax in
  that dtype and :func:`cross_entropy_from_probabilities`, because Keras's loss casts the
  softmax output to float32 and the cast drops the logits it would otherwise recover."""
  if logits.dtype == tf.float32:
    return softmax_cross_entropy(logits, labels)
  return cross_entropy_from_probabilities(tf.cast(tf.nn.softmax(logits), tf.float32), labels)


def cross_entropy_from_probabilities(probabilities: tf.Tensor, labels: tf.Tensor,
                                     epsilon: float = 1e-7) -> tf.Tensor:
  """Keras's categorical cross-entropy from probabilities ``[N, K]`` (float32), integer
  ``labels [N]``: ``p / sum(p)``, clipped to ``[eps, 1 - eps]``, ``-sum(one_hot * log p)`` per
  example, then ``sum / N`` (backend/tensorflow/nn.py, losses/loss.py)."""
  one_hot = tf.one_hot(labels, tf.shape(probabilities)[-1], dtype=probabilities.dtype)
  p = probabilities / tf.reduce_sum(probabilities, -1, keepdims=True)
  p = tf.clip_by_value(p, epsilon, 1.0 - epsilon)
  per_example = -tf.reduce_sum(one_hot * tf.math.log(p), -1)
  return tf.math.divide_no_nan(tf.reduce_sum(per_example),
                               tf.cast(tf.size(per_example), probabilities.dtype))


def softmax_cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  """Mean categorical cross-entropy of integer ``labels [N]`` under ``softmax(logits [N, K])``.

  Keras recovers the logits behind a Softmax output and calls
  ``softmax_cross_entropy_with_logits`` on one-hot targets, then reduces as
  ``sum(losses) / N`` ("sum over batch size"); this is that computation.
  """
  one_hot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
  per_example = tf.nn.softmax_cross_entropy_with_logits(labels=one_hot, logits=logits)
  return tf.math.divide_no_nan(tf.reduce_sum(per_example),
                               tf.cast(tf.size(per_example), logits.dtype))


def argmax_hits(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  """Per example, whether the arg-max class equals the integer label (Keras's categorical
  accuracy, taken on the softmax probabilities as Keras takes it, so ties break the same
  way)."""
  predicted = tf.argmax(tf.nn.softmax(logits), axis=-1, output_type=labels.dtype)
  return tf.equal(predicted, labels)


def l2_penalty(x: tf.Tensor, l2: float) -> tf.Tensor:
  """Keras's ``L2`` regularizer: ``l2 * sum(x^2)``."""
  return tf.cast(l2, x.dtype) * tf.reduce_sum(tf.square(x))


def l1_penalty(x: tf.Tensor, l1: float) -> tf.Tensor:
  """Keras's ``L1`` regularizer: ``l1 * sum(|x|)``."""
  return tf.cast(l1, x.dtype) * tf.reduce_sum(tf.abs(x))


def l1_l2_penalty(x: tf.Tensor, l1: float, l2: float) -> tf.Tensor:
  """Keras's ``L1L2`` regularizer: ``0 (+ l1 * sum(|x|)) (+ l2 * sum(x^2))``, a term only for a
  non-zero factor, added in that order."""
  total = tf.constant(0.0, x.dtype)
  if l1 != 0.0:
    total += tf.cast(l1, x.dtype) * tf.reduce_sum(tf.abs(x))
  if l2 != 0.0:
    total += tf.cast(l2, x.dtype) * tf.reduce_sum(tf.square(x))
  return total
