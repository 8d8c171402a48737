"""The raw BatchNormalization layer, the one layer whose state changes outside the optimizer
(every other layer is in :mod:`bnraw.core.catalog`). Its variables are created up front under
Keras's weight names; ``__call__(x, *, training)`` takes ``training`` keyword-only with no
default, so every caller decides the branch.

BatchNorm, training branch (``training=True`` on a trainable layer)::

    mean, variance = biased moments of x over every axis but the channel axis   (ops.moments)
    y = gamma * (x - mean) / sqrt(variance + eps) + beta                (ops.normalize)
    moving_mean     <- moving_mean     * m + mean      * (1 - m)
    moving_variance <- moving_variance * m + variance' * (1 - m)

with ``variance' = variance * n / (n - 1)`` in the legacy ("bessel") variant. Under a mixed
policy BN casts ``x`` to float32, does all of the above in float32 (its variables stay float32)
and casts ``y`` back to ``x``'s dtype, as Keras 3's ``BatchNormalization.call``. Inference branch
(``training=False``, or a frozen layer, as Keras 3's ``training and self.trainable``): the same
normalisation with the moving statistics, no state change.

The moving statistics change in exactly two places: the training writer
(:meth:`BatchNorm._update_moving_statistics`) and the named setter
(:meth:`BatchNorm.set_moving_statistics`, used by PreciseBN's fix).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import tensorflow as tf

from bnraw.core import ops

# ``statistics=BATCH``: normalise with this batch's own moments and change nothing (the
# training branch's normalisation without its update, for the diagnosis).
BATCH = "batch"


class Switch(NamedTuple):
  """``statistics=Switch(use_batch, given)``: :data:`BATCH` where the scalar bool tensor
  ``use_batch`` is true, else ``given``, chosen when the graph runs (``tf.where``, exact), so one
  traced function serves every per-layer choice (PreciseBN's layer-by-layer passes)."""

  use_batch: tf.Tensor
  given: ops.Moments


Statistics = Union[ops.Moments, Switch, str, None]

# Called eagerly as hook(layer, moving, batch) just before a layer's moving update: the step
# debugger (bnraw.tracing.debugger) stops there. None in normal runs.
UpdateHook = Callable[["BatchNorm", ops.Moments, ops.Moments], None]


class BatchNormOutput(NamedTuple):
  """What a BN call returns: the output, the statistics it normalised with, and ``n``."""

  y: tf.Tensor
  statistics: ops.Moments
  count: tf.Tensor  # values per channel behind the batch moments (N*H*W), float32


class BatchNorm:
  """One BN layer: ``gamma``, ``beta``, ``moving_mean``, ``moving_variance`` (Keras names
  ``{name}/gamma`` ...; initial values 1, 0, 0, 1) and the branch choice.

  Keras's options: ``axis`` (the channel axis; moments over all others), ``center=False`` /
  ``scale=False`` (no beta / gamma), ``synchronized`` (the one-pass moments Keras's synchronized
  path takes even on one device, :func:`ops.moments_one_pass`), ``trainable=False`` (frozen:
  the inference branch inside fit too, and gamma/beta not trained).
  """

  opens_own_scope = True  # its ops under "{name}/" wherever it is called (graph.name_scope)

  def __init__(self, name: str, channels: int, *, momentum: float, epsilon: float,
               bessel: bool = False, trainable: bool = True, axis: int = -1,
               center: bool = True, scale: bool = True, synchronized: bool = False,
               compute_dtype: Optional[str] = None):
    def var(suffix, value, is_trainable):
      return tf.Variable(tf.fill([channels], value), name=f"{name}/{suffix}",
                         trainable=is_trainable)
    self.name, self.momentum, self.epsilon, self.bessel = name, momentum, epsilon, bessel
    self.trainable, self.axis, self.synchronized = trainable, axis, synchronized
    # the layer's own policy (a user's model): its input is cast to it first and its output
    # comes out in it, as Keras's Layer.__call__ and BN's call; None: the input's dtype
    self.compute_dtype = None if compute_dtype is None else tf.as_dtype(compute_dtype)
    self.gamma = var("gamma", 1.0, trainable) if scale else None
    self.beta = var("beta", 0.0, trainable) if center else None
    self.moving_mean = var("moving_mean", 0.0, False)
    self.moving_variance = var("moving_variance", 1.0, False)
    affine = [v for v in (self.gamma, self.beta) if v is not None]
    self.variables = [*affine, self.moving_mean, self.moving_variance]
    self.trainable_variables = affine if trainable else []

  @property
  def moving(self) -> ops.Moments:
    """The moving statistics, read now."""
    return ops.Moments(tf.identity(self.moving_mean), tf.identity(self.moving_variance))

  def __call__(self, x: tf.Tensor, *, training: bool, statistics: Statistics = None,
               hook: Optional[UpdateHook] = None) -> BatchNormOutput:
    """Keras 3's ``BatchNormalization.call``, with the statistics made explicit.

    Args:
      x: ``[..., C]``; moments are taken over every axis but the last.
      training: the branch. True on a trainable layer: batch moments, then the moving update.
        False, or a frozen layer: the moving statistics, no state change.
      statistics: overrides the branch and changes no state: :data:`BATCH` normalises as the
        training branch does (the batch's own moments; a frozen layer's moving statistics), an
        ``ops.Moments`` with those (the diagnosis), a :class:`Switch` either of them chosen at
        run time (PreciseBN).
      hook: called eagerly just before the moving update (the step debugger).
    """
    with tf.name_scope(self.name):  # op names "bn_3/moments/..." survive into XLA's HLO
      update = statistics is None and training and self.trainable
      if self.compute_dtype is not None:
        x = tf.cast(x, self.compute_dtype)
      compute_dtype = x.dtype
      x = tf.cast(x, tf.float32)  # Keras upcasts float16/bfloat16 inputs (no op for float32)
      count = ops.elements_per_channel(x, self.axis)
      if statistics is None:
        statistics = BATCH if update else self.moving
      if isinstance(statistics, Switch):
        batch, given = self._batch_branch(x), statistics.given
        statistics = ops.Moments(tf.where(statistics.use_batch, batch.mean, given.mean),
                                 tf.where(statistics.use_batch, batch.variance, given.variance))
      elif isinstance(statistics, str):
        if statistics != BATCH:
          raise ValueError(f"statistics must be BATCH, Moments, Switch or None, got "
                           f"{statistics!r}")
        statistics = self._batch_branch(x)
      y = tf.cast(ops.normalize(x, statistics, self.gamma, self.beta, self.epsilon, self.axis),
                  compute_dtype)
    if update:
      self._update_moving_statistics(statistics, count, hook)
    return BatchNormOutput(y, statistics, count)

  def _batch_branch(self, x: tf.Tensor) -> ops.Moments:
    """What :data:`BATCH` normalises with: the training branch's statistics (a frozen layer's
    are its moving statistics)."""
    return self.batch_moments(x) if self.trainable else self.moving

  def batch_moments(self, x: tf.Tensor) -> ops.Moments:
    """This batch's biased moments, as this layer's training branch takes them."""
    if self.synchronized:
      return ops.moments_one_pass(x, self.axis)
    return ops.moments(x, self.axis)

  def _update_moving_statistics(self, batch: ops.Moments, n: tf.Tensor,
                                hook: Optional[UpdateHook]) -> None:
    """The training writer: the moving-average update from this batch's biased moments
    (``variance * n / (n - 1)`` into the moving variance in the legacy variant)."""
    with tf.name_scope(f"{self.name}_moving_update"):  # findable in graphs and XLA's HLO
      if self.bessel:
        batch = ops.Moments(batch.mean, ops.bessel_variance(batch.variance, n))
      if hook is not None:  # the step debugger stops in this frame, with these names in scope
        layer, moving = self, self.moving
        hook(layer, moving, batch)
      self.moving_mean.assign(ops.moving_average(self.moving_mean, batch.mean, self.momentum))
      self.moving_variance.assign(
          ops.moving_average(self.moving_variance, batch.variance, self.momentum))

  def set_moving_statistics(self, statistics: ops.Moments) -> None:
    """The named setter: replaces the moving statistics (PreciseBN and its fix). Whole-state
    loads (checkpoint restore, parity sync) copy every variable alike and do not come here."""
    mean = tf.convert_to_tensor(statistics.mean, tf.float32)
    variance = tf.convert_to_tensor(statistics.variance, tf.float32)
    if mean.shape != self.moving_mean.shape or variance.shape != self.moving_variance.shape:
      raise ValueError(f"{self.name}: statistics of shape {mean.shape}/{variance.shape} for "
                       f"{self.moving_mean.shape} channels")
    self.moving_mean.assign(mean)
    self.moving_variance.assign(variance)
