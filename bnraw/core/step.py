"""The train and eval steps, compiled per mode: eager, ``tf.function``, or XLA.

A step is a pure function of its inputs and the model/optimizer variables; everything worth
seeing comes out as its return value (no prints, no Python side effects), so the same step runs
eagerly, under ``tf.function`` and under XLA. With ``trace=True`` it also returns, per BN layer,
the statistics it normalised with and the moving statistics before and after their update.
"""

from __future__ import annotations

from typing import Callable, Optional

import tensorflow as tf

from bnraw.core import ops
from bnraw.core.graph import Model
from bnraw.core.layers import UpdateHook

MODES = ("eager", "function", "xla", "auto")
TRACE_KEYS = ("batch_mean", "batch_variance", "moving_mean_before", "moving_variance_before",
              "moving_mean_after", "moving_variance_after")


def has_gpu() -> bool:
  return bool(tf.config.list_physical_devices("GPU"))


def resolve_mode(mode: str) -> str:
  """``auto`` is XLA with a GPU and plain tf.function on CPU (as Keras ``jit_compile="auto"``)."""
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
  if mode == "auto":
    return "xla" if has_gpu() else "function"
  return mode


def compile_fn(fn: Callable, mode: str) -> Callable:
  """``fn`` as is (eager), under tf.function, or under tf.function with ``jit_compile=True``."""
  mode = resolve_mode(mode)
  if mode == "eager":
    return fn
  # One concrete graph per batch shape (full, and the partial last batch): with
  # reduce_retracing a shape-relaxed graph would take over depending on call history, and its
  # kernels round differently, so a resumed run would not repeat an uninterrupted one exactly.
  return tf.function(fn, jit_compile=(mode == "xla"))


def _moving(model: Model) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
  return ([tf.identity(layer.moving_mean) for layer in model.batch_norms],
          [tf.identity(layer.moving_variance) for layer in model.batch_norms])


def make_train_step(model: Model, optimizer, *, mode: str, trace: bool,
                    hook: Optional[UpdateHook] = None) -> Callable:
  """``step(images, labels) -> {"loss", "correct", "finite"[, "trace"]}``: one optimizer step.

  ``loss`` is the training-branch loss (plus L2) *before* the update, as fit reports it;
  ``correct`` counts arg-max hits in that same forward pass; ``finite`` is the per-layer NaN/Inf
  guard (:func:`layers_finite`). ``hook`` (eager mode only) is called in each BN layer just
  before its moving update: the step debugger uses it.
  """
  if hook is not None and resolve_mode(mode) != "eager":
    raise ValueError("a BN update hook needs mode='eager'")

  def train_step(images: tf.Tensor, labels: tf.Tensor) -> dict:
    before = _moving(model) if trace else None
    with tf.GradientTape() as tape:
      out = model(images, training=True, hook=hook)
      loss = model.loss(out.logits, labels)
    gradients = tape.gradient(loss, model.trainable_variables)
    optimizer.apply(gradients)
    result = {"loss": loss, "correct": ops.correct_predictions(out.logits, labels),
              "finite": layers_finite(model, out.statistics)}
    if trace:
      result["trace"] = dict(zip(TRACE_KEYS, (
          [s.mean for s in out.statistics], [s.variance for s in out.statistics], *before,
          *_moving(model))))
    return result

  return compile_fn(train_step, mode)


def layers_finite(model: Model, statistics: list[ops.Moments]) -> tf.Tensor:
  """``[L]`` bool: layer i's batch and (updated) moving statistics are all finite. A handful of
  tiny reductions, cheap enough to leave on; a returned value, so it works under XLA."""
  return tf.stack([
      tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in
                     (s.mean, s.variance, layer.moving_mean, layer.moving_variance)])
      for s, layer in zip(statistics, model.batch_norms)])


def make_eval_step(model: Model, *, mode: str) -> Callable:
  """``step(images, labels) -> {"loss", "correct"}`` in the inference branch (no state change)."""

  def eval_step(images: tf.Tensor, labels: tf.Tensor) -> dict:
    logits = model(images, training=False).logits
    return {"loss": model.loss(logits, labels),
            "correct": ops.correct_predictions(logits, labels)}

  return compile_fn(eval_step, mode)
