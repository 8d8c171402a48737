"""Hand-written optimizers with Keras 3's operation order (optimizers/base_optimizer.py,
backend/tensorflow/optimizer.py, adam.py, adamw.py, sgd.py, rmsprop.py).

Slots are variables created up front, one per trainable variable, in the same order, so they can
be copied to and from a Keras optimizer by index.

Every step (:meth:`Optimizer.apply`) is Keras's ``apply``: clip the gradients (at most one of
``clipnorm``: each gradient by its own norm, ``tf.clip_by_norm``; ``global_clipnorm``: all by
their global norm; ``clipvalue``: elementwise), then decoupled weight decay of every variable
(``w -= w * weight_decay * lr``, before and apart from the update; none exempt), then the update
of each variable, then ``iterations += 1``.

Adam (t = iterations + 1)::

    alpha = lr * sqrt(1 - b2^t) / (1 - b1^t)
    m += (g - m) * (1 - b1);  v += (g^2 - v) * (1 - b2)
    w -= (m * alpha) / (sqrt(v) + eps)      (amsgrad: v_hat = max(v_hat, v) in place of v)

AdamW is Adam with ``weight_decay`` 0.004 by default.

SGD with momentum mu (Nesterov)::

    m = m * mu - g * lr;  w += m * mu - g * lr       (plain momentum: w += m)

RMSprop (centered: a = rho * a + (1 - rho) * g, else a = 0)::

    v = rho * v + (1 - rho) * g^2
    inc = lr * g / sqrt(v - a^2 + eps)      (not centered: sqrt(v + eps))
    m = momentum * m + inc;  w -= m         (momentum 0: w -= inc)

LossScale (Keras's LossScaleOptimizer under mixed_float16) wraps any: the step multiplies
the loss by ``scale`` before differentiating; then, if every gradient is finite, the inner
optimizer gets ``g / scale`` and ``counter += 1`` (at ``growth_steps`` in a row: ``scale *= 2``,
``counter = 0``); otherwise the step is skipped (no weight, slot or ``iterations`` change) and
``scale *= 0.5``, ``counter = 0``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf


def _slots(variables: Sequence[tf.Variable], suffix: str) -> list[tf.Variable]:
  return [tf.Variable(tf.zeros_like(v), trainable=False, name=f"{v.name.split(':')[0]}/{suffix}")
          for v in variables]


def clip_by_global_norm(gradients: Sequence[tf.Tensor], clip_norm: float) -> list[tf.Tensor]:
  """Keras's ``clip_by_global_norm`` (base_optimizer.py), op for op: ``g * scale`` with
  ``scale = clip_norm * min(1 / norm, 1 / clip_norm) + (norm - norm)`` (NaN for a non-finite
  norm)."""
  squared_norm = tf.reduce_sum(tf.stack([tf.reduce_sum(tf.square(g)) for g in gradients]))
  use_norm = tf.sqrt(squared_norm)
  scale_for_finite = clip_norm * tf.minimum(1.0 / use_norm, 1.0 / clip_norm)
  scale = scale_for_finite + (use_norm - use_norm)
  return [g * scale for g in gradients]


class Optimizer:
  """What every optimizer here shares with Keras 3's base optimizer: ``lr`` (a float),
  ``iterations``, gradient clipping (``clipnorm``, ``global_clipnorm`` or ``clipvalue``, at most
  one) and decoupled ``weight_decay``. Subclasses give ``slots`` and ``_update``."""

  def __init__(self, variables: Sequence[tf.Variable], lr: float,
               weight_decay: Optional[float] = None, clipnorm: Optional[float] = None,
               global_clipnorm: Optional[float] = None, clipvalue: Optional[float] = None):
    if sum(a is not None for a in (clipnorm, global_clipnorm, clipvalue)) > 1:
      raise ValueError("only one of clipnorm, global_clipnorm and clipvalue can be set")
    self.variables = list(variables)
    self.lr, self.weight_decay = lr, weight_decay
    self.clipnorm, self.global_clipnorm, self.clipvalue = clipnorm, global_clipnorm, clipvalue
    self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
    # Keras keeps the rate in a variable: read from one, it is not a constant that TF's graph
    # optimizer (grappler) may fold or move, e.g. (w * wd) * lr into w * (wd * lr). Weight decay
    # and RMSprop read it; Adam's and SGD's steps keep the constant ``lr`` they always used.
    self.learning_rate = tf.Variable(lr, dtype=tf.float32, trainable=False, name="learning_rate")

  @property
  def slots(self) -> list[list[tf.Variable]]:
    raise NotImplementedError

  def apply(self, gradients: Sequence[tf.Tensor]) -> None:
    """One update of every variable (clip, weight decay, update), then ``iterations += 1``."""
    gradients = self.clip(list(gradients))
    self._decay_weights()
    self._update(gradients)
    self.iterations.assign_add(1)

  def clip(self, gradients: list[tf.Tensor]) -> list[tf.Tensor]:
    """Keras's ``_clip_gradients`` with the TF backend's ``_clip_by_norm``."""
    if self.clipnorm and self.clipnorm > 0:
      return [tf.clip_by_norm(g, self.clipnorm) for g in gradients]
    if self.global_clipnorm and self.global_clipnorm > 0:
      return clip_by_global_norm(gradients, self.global_clipnorm)
    if self.clipvalue and self.clipvalue > 0:
      return [tf.clip_by_value(g, -self.clipvalue, self.clipvalue) for g in gradients]
    return gradients

  def _decay_weights(self) -> None:
    """The TF backend's ``_apply_weight_decay``: ``w -= w * wd * lr`` for every variable."""
    if self.weight_decay is None:
      return
    for w in self.variables:
      lr = tf.cast(self.learning_rate, w.dtype)
      wd = tf.cast(self.weight_decay, w.dtype)
      w.assign_sub(w * wd * lr)

  def _update(self, gradients: list[tf.Tensor]) -> None:
    raise NotImplementedError


class Adam(Optimizer):
  """Keras 3 Adam; defaults are Keras's (b1 0.9, b2 0.999, eps 1e-7, no amsgrad, no decay)."""

  def __init__(self, variables: Sequence[tf.Variable], lr: float = 1e-3, beta_1: float = 0.9,
               beta_2: float = 0.999, epsilon: float = 1e-7, amsgrad: bool = False, **common):
    super().__init__(variables, lr, **common)
    self.beta_1, self.beta_2, self.epsilon, self.amsgrad = beta_1, beta_2, epsilon, amsgrad
    self.momentums = _slots(self.variables, "momentum")
    self.velocities = _slots(self.variables, "velocity")
    self.velocity_hats = _slots(self.variables, "velocity_hat") if amsgrad else []

  @property
  def slots(self) -> list[list[tf.Variable]]:
    return [self.momentums, self.velocities] + ([self.velocity_hats] if self.amsgrad else [])

  def _update(self, gradients: list[tf.Tensor]) -> None:
    lr = tf.constant(self.lr, tf.float32)
    local_step = tf.cast(self.iterations + 1, tf.float32)
    beta_1_power = tf.pow(tf.constant(self.beta_1, tf.float32), local_step)
    beta_2_power = tf.pow(tf.constant(self.beta_2, tf.float32), local_step)
    alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    for i, (g, w, m, v) in enumerate(zip(gradients, self.variables, self.momentums,
                                         self.velocities)):
      m.assign_add(tf.multiply(tf.subtract(g, m), 1 - self.beta_1))
      v.assign_add(tf.multiply(tf.subtract(tf.square(g), v), 1 - self.beta_2))
      if self.amsgrad:
        v_hat = self.velocity_hats[i]
        v_hat.assign(tf.maximum(v_hat, v))
        v = v_hat
      w.assign_sub(tf.divide(tf.multiply(m, alpha), tf.add(tf.sqrt(v), self.epsilon)))


class AdamW(Adam):
  """Keras 3 AdamW: Adam with decoupled weight decay, 0.004 by default."""

  def __init__(self, variables: Sequence[tf.Variable], lr: float = 1e-3,
               weight_decay: float = 0.004, **kwargs):
    if weight_decay is None:
      raise ValueError("AdamW needs a float weight_decay")
    super().__init__(variables, lr, weight_decay=weight_decay, **kwargs)


class SGD(Optimizer):
  """Keras 3 SGD with optional (Nesterov) momentum (defaults are the seed's: 0.9, Nesterov)."""

  def __init__(self, variables: Sequence[tf.Variable], lr: float = 0.01, momentum: float = 0.9,
               nesterov: bool = True, **common):
    super().__init__(variables, lr, **common)
    self.momentum, self.nesterov = momentum, nesterov
    self.momentums = _slots(self.variables, "momentum") if momentum != 0 else []

  @property
  def slots(self) -> list[list[tf.Variable]]:
    return [self.momentums] if self.momentums else []

  def _update(self, gradients: list[tf.Tensor]) -> None:
    lr = tf.constant(self.lr, tf.float32)
    if not self.momentums:
      for g, w in zip(gradients, self.variables):
        w.assign_sub(tf.multiply(g, lr))
    else:
      mu = tf.constant(self.momentum, tf.float32)
      for g, w, m in zip(gradients, self.variables, self.momentums):
        m.assign(tf.subtract(tf.multiply(m, mu), tf.multiply(g, lr)))
        if self.nesterov:
          w.assign_add(tf.subtract(tf.multiply(m, mu), tf.multiply(g, lr)))
        else:
          w.assign_add(m)


class RMSprop(Optimizer):
  """Keras 3 RMSprop; defaults are Keras's (rho 0.9, momentum 0, eps 1e-7, not centered).
  ``slots``: velocities, then momentums (momentum > 0), then average gradients (centered)."""

  def __init__(self, variables: Sequence[tf.Variable], lr: float = 1e-3, rho: float = 0.9,
               momentum: float = 0.0, epsilon: float = 1e-7, centered: bool = False, **common):
    super().__init__(variables, lr, **common)
    self.rho, self.momentum, self.epsilon, self.centered = rho, momentum, epsilon, centered
    self.velocities = _slots(self.variables, "velocity")
    self.momentums = _slots(self.variables, "momentum") if momentum > 0 else []
    self.average_gradients = _slots(self.variables, "average_gradient") if centered else []

  @property
  def slots(self) -> list[list[tf.Variable]]:
    return [group for group in (self.velocities, self.momentums, self.average_gradients)
            if group]

  def _update(self, gradients: list[tf.Tensor]) -> None:
    rho = tf.constant(self.rho, tf.float32)
    for i, (g, w, v) in enumerate(zip(gradients, self.variables, self.velocities)):
      lr = tf.cast(self.learning_rate, w.dtype)  # a read per variable, as in Keras
      v.assign(tf.add(tf.multiply(rho, v), tf.multiply(1 - self.rho, tf.square(g))))
      if self.centered:
        a = self.average_gradients[i]
        a.assign(tf.add(tf.multiply(rho, a), tf.multiply(1 - self.rho, g)))
        denominator = tf.subtract(v, tf.square(a)) + self.epsilon
      else:
        denominator = tf.add(v, self.epsilon)
      increment = tf.divide(tf.multiply(lr, g), tf.sqrt(denominator))
      if self.momentums:
        m = self.momentums[i]
        m.assign(tf.add(tf.multiply(tf.constant(self.momentum, tf.float32), m), increment))
        w.assign_sub(m)
      else:
        w.assign_sub(increment)


class LossScale:
  """Keras 3's ``LossScaleOptimizer`` (optimizers/loss_scale_optimizer.py) around ``inner``,
  with the dynamic loss scale as explicit state: ``dynamic_scale`` (float32) and
  ``step_counter`` (int64), Keras's names, plus ``skipped_steps``, which Keras does not keep:
  ``iterations`` (the inner optimizer's) counts applied steps only."""

  def __init__(self, inner, initial_scale: float = 2.0 ** 15, growth_steps: int = 2000):
    self.inner, self.initial_scale, self.growth_steps = inner, initial_scale, growth_steps
    self.variables, self.iterations = inner.variables, inner.iterations
    self.dynamic_scale = tf.Variable(initial_scale, dtype=tf.float32, trainable=False,
                                     name="dynamic_scale")
    self.step_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_counter")
    self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")

  @property
  def slots(self) -> list[list[tf.Variable]]:
    return self.inner.slots

  def scale_loss(self, loss: tf.Tensor) -> tf.Tensor:
    """``loss * scale``: what the step differentiates."""
    return tf.multiply(loss, self.dynamic_scale)

  def apply(self, gradients: Sequence[tf.Tensor]) -> tf.Tensor:
    """Gradients of the *scaled* loss in; returns whether this step was skipped (a bool tensor).
    The branches are a ``tf.cond`` on the data, as Keras's (eager: plain Python)."""
    finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(g)) for g in gradients]))

    def apply_unscaled():
      scale = tf.identity(self.dynamic_scale)
      self.inner.apply([tf.divide(g, scale) for g in gradients])
      tf.cond(tf.equal(self.step_counter, self.growth_steps - 1), grow, count)

    def grow():
      self.step_counter.assign(0)
      self.dynamic_scale.assign(tf.multiply(self.dynamic_scale, 2.0))

    def count():
      self.step_counter.assign_add(1)

    def skip():
      self.step_counter.assign(0)
      self.dynamic_scale.assign(tf.multiply(self.dynamic_scale, 0.5))
      self.skipped_steps.assign_add(1)

    tf.cond(finite, apply_unscaled, skip)
    return tf.logical_not(finite)


def named_state(optimizer) -> dict[str, tf.Variable]:
  """Every variable of an optimizer's state by a stable name (the checkpoint's keys):
  ``iterations``, ``slot{g}.{i}`` (slot group g, variable i) and a loss scale's
  ``dynamic_scale``, ``step_counter``, ``skipped_steps``, in that order."""
  state = {"iterations": optimizer.iterations}
  state.update({f"slot{g}.{i}": v for g, group in enumerate(optimizer.slots)
                for i, v in enumerate(group)})
  if isinstance(optimizer, LossScale):
    state.update(dynamic_scale=optimizer.dynamic_scale, step_counter=optimizer.step_counter,
                 skipped_steps=optimizer.skipped_steps)
  return state


def state_variables(optimizer) -> list[tf.Variable]:
  """Every variable of an optimizer's state (:func:`named_state`'s, in its order)."""
  return list(named_state(optimizer).values())


def steps_run(optimizer) -> int:
  """Optimizer steps taken so far, skipped ones included (``iterations`` leaves them out)."""
  skipped = optimizer.skipped_steps.numpy() if isinstance(optimizer, LossScale) else 0
  return int(optimizer.iterations.numpy() + skipped)


def make_optimizer(name: str, variables: Sequence[tf.Variable], lr: float,
                   sgd_momentum: float = 0.9, nesterov: bool = True,
                   loss_scale: Optional[float] = None):
  """``"adam"`` or ``"sgd"`` over ``variables``; wrapped in :class:`LossScale` starting at
  ``loss_scale`` when one is given (Keras: the mixed_float16 policy)."""
  if name == "adam":
    optimizer = Adam(variables, lr=lr)
  elif name == "sgd":
    optimizer = SGD(variables, lr=lr, momentum=sgd_momentum, nesterov=nesterov)
  else:
    raise ValueError(f"unknown optimizer {name!r}")
  return optimizer if loss_scale is None else LossScale(optimizer, loss_scale)
