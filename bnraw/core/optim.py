"""Hand-written optimizers with Keras 3's operation order (optimizers/adam.py, sgd.py).

Slots are variables created up front, one per trainable variable, in the same order, so they can
be copied to and from a Keras optimizer by index.

Adam (t = iterations + 1)::

    alpha = lr * sqrt(1 - b2^t) / (1 - b1^t)
    m += (g - m) * (1 - b1);  v += (g^2 - v) * (1 - b2)
    w -= (m * alpha) / (sqrt(v) + eps)

SGD with momentum mu (Nesterov)::

    m = m * mu - g * lr;  w += m * mu - g * lr       (plain momentum: w += m)
"""

from __future__ import annotations

from typing import Sequence

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


def make_optimizer(name: str, variables: Sequence[tf.Variable], lr: float,
                   sgd_momentum: float = 0.9, nesterov: bool = True):
  """``"adam"`` or ``"sgd"`` over ``variables``."""
  if name == "adam":
    return Adam(variables, lr=lr)
  if name == "sgd":
    return SGD(variables, lr=lr, momentum=sgd_momentum, nesterov=nesterov)
  raise ValueError(f"unknown optimizer {name!r}")
