"""Hand-written optimizers with Keras 3's operation order (optimizers/adam.py, sgd.py).

Slots are variables created up front, one per trainable variable, in the same order, so they can
be copied to and from a Keras optimizer by index.

Adam (t = iterations + 1)::

    alpha = lr * sqrt(1 - b2^t) / (1 - b1^t)
    m += (g - m) * (1 - b1);  v += (g^2 - v) * (1 - b2)
    w -= (m * alpha) / (sqrt(v) + eps)

SGD with momentum mu (Nesterov)::

    m = m * mu - g * lr;  w += m * mu - g * lr       (plain momentum: w += m)

LossScale (Keras's LossScaleOptimizer under mixed_float16) wraps either: the step multiplies
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


class Adam:
  """Keras 3 Adam without amsgrad; defaults are Keras's (b1 0.9, b2 0.999, eps 1e-7)."""

  def __init__(self, variables: Sequence[tf.Variable], lr: float = 1e-3, beta_1: float = 0.9,
               beta_2: float = 0.999, epsilon: float = 1e-7):
    self.variables = list(variables)
    self.lr, self.beta_1, self.beta_2, self.epsilon = lr, beta_1, beta_2, epsilon
    self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
    self.momentums = _slots(self.variables, "momentum")
    self.velocities = _slots(self.variables, "velocity")

  @property
  def slots(self) -> list[list[tf.Variable]]:
    return [self.momentums, self.velocities]

  def apply(self, gradients: Sequence[tf.Tensor]) -> None:
    """One update of every variable, then ``iterations += 1``."""
    lr = tf.constant(self.lr, tf.float32)
    local_step = tf.cast(self.iterations + 1, tf.float32)
    beta_1_power = tf.pow(tf.constant(self.beta_1, tf.float32), local_step)
    beta_2_power = tf.pow(tf.constant(self.beta_2, tf.float32), local_step)
    alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    for g, w, m, v in zip(gradients, self.variables, self.momentums, self.velocities):
      m.assign_add(tf.multiply(tf.subtract(g, m), 1 - self.beta_1))
      v.assign_add(tf.multiply(tf.subtract(tf.square(g), v), 1 - self.beta_2))
      w.assign_sub(tf.divide(tf.multiply(m, alpha), tf.add(tf.sqrt(v), self.epsilon)))
    self.iterations.assign_add(1)


class SGD:
  """Keras 3 SGD with optional (Nesterov) momentum."""

  def __init__(self, variables: Sequence[tf.Variable], lr: float = 0.01, momentum: float = 0.9,
               nesterov: bool = True):
    self.variables = list(variables)
    self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
    self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
    self.momentums = _slots(self.variables, "momentum") if momentum != 0 else []

  @property
  def slots(self) -> list[list[tf.Variable]]:
    return [self.momentums] if self.momentums else []

  def apply(self, gradients: Sequence[tf.Tensor]) -> None:
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
    self.iterations.assign_add(1)


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
