"""The explicit training loop: a GradientTape step compiled per mode, fit() and evaluate().

A step is a pure function of its inputs and the model/optimizer variables; everything worth
seeing comes out as its return value (no prints, no Python side effects), so the same step runs
eagerly, under ``tf.function`` and under XLA. With ``trace=True`` it also returns, per BN layer,
the statistics it normalised with and the moving statistics before and after their update.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from bnraw import ops
from bnraw.batchnorm import UpdateHook
from bnraw.model import SeedNet

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
  return tf.function(fn, jit_compile=(mode == "xla"), reduce_retracing=True)


def _moving(model: SeedNet, which: str) -> list[tf.Tensor]:
  return [tf.identity(getattr(layer, which)) for layer in model.bns]


def make_train_step(model: SeedNet, optimizer, *, mode: str, trace: bool,
                    hook: Optional[UpdateHook] = None) -> Callable:
  """``step(images, labels) -> {"loss", "correct"[, "trace"]}``: one optimizer step.

  ``loss`` is the training-branch loss (plus L2) *before* the update, as fit reports it;
  ``correct`` counts arg-max hits in that same forward pass. ``hook`` (eager mode only) is
  called in each BN layer just before its moving update: the step debugger uses it.
  """
  if hook is not None and resolve_mode(mode) != "eager":
    raise ValueError("a BN update hook needs mode='eager'")

  def step(images: tf.Tensor, labels: tf.Tensor) -> dict:
    if trace:
      before = (_moving(model, "moving_mean"), _moving(model, "moving_variance"))
    with tf.GradientTape() as tape:
      out = model(images, training=True, hook=hook)
      loss = ops.softmax_cross_entropy(out.logits, labels)
      penalty = model.regularization()
      if penalty is not None:
        loss = tf.add_n([loss, penalty])
    gradients = tape.gradient(loss, model.trainable_variables)
    optimizer.apply(gradients)
    result = {"loss": loss, "correct": ops.correct_predictions(out.logits, labels)}
    if trace:
      result["trace"] = dict(zip(TRACE_KEYS, (
          [s.mean for s in out.statistics], [s.variance for s in out.statistics], *before,
          _moving(model, "moving_mean"), _moving(model, "moving_variance"))))
    return result

  return compile_fn(step, mode)


def make_eval_step(model: SeedNet, *, mode: str) -> Callable:
  """``step(images, labels) -> {"loss", "correct"}`` in the inference branch (no state change)."""

  def step(images: tf.Tensor, labels: tf.Tensor) -> dict:
    out = model(images, training=False)
    loss = ops.softmax_cross_entropy(out.logits, labels)
    penalty = model.regularization()
    if penalty is not None:
      loss = tf.add_n([loss, penalty])
    return {"loss": loss, "correct": ops.correct_predictions(out.logits, labels)}

  return compile_fn(step, mode)


class MeanTracker:
  """Keras's ``Mean`` metric in float32: ``total += value * weight; count += weight``."""

  def __init__(self):
    self.total = np.float32(0.0)
    self.count = np.float32(0.0)

  def update(self, value, weight: int) -> None:
    self.total = np.float32(self.total + np.float32(value) * np.float32(weight))
    self.count = np.float32(self.count + np.float32(weight))

  def result(self) -> float:
    return float(self.total / self.count) if self.count else 0.0


def epoch_orders(seed: int, n: int):
  """The per-epoch example orders: ``np.random.default_rng(seed).permutation(n)``, forever."""
  rng = np.random.default_rng(seed)
  while True:
    yield rng.permutation(n)


def batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
  """Consecutive slices of ``order``; the last one may be partial, as Keras's data adapter."""
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@dataclasses.dataclass
class StepRecord:
  """What the loop hands to ``on_step`` after every optimizer step (numpy values)."""

  epoch: int  # 0-based
  step: int  # global optimizer step, 0-based
  batch: np.ndarray  # example indices of this batch
  loss: float
  accuracy: float
  trace: Optional[dict]  # TRACE_KEYS -> list (per BN layer) of arrays, when tracing


@dataclasses.dataclass
class History:
  """Per epoch, what ``model.fit`` would print, and the batch order that produced it."""

  loss: list = dataclasses.field(default_factory=list)
  accuracy: list = dataclasses.field(default_factory=list)
  permutations: list = dataclasses.field(default_factory=list)


def fit(model: SeedNet, optimizer, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
        epochs: int, seed: int, mode: str, trace: bool = False,
        on_step: Optional[Callable[[StepRecord], None]] = None,
        on_epoch: Optional[Callable[[int, History], None]] = None,
        hook: Optional[UpdateHook] = None) -> History:
  """Trains for ``epochs`` epochs, reshuffling every epoch from ``np.random.default_rng(seed)``.

  The permutations are recorded in the returned history so another trainer (Keras ``fit``) can
  replay exactly the same batches.
  """
  step_fn = make_train_step(model, optimizer, mode=mode, trace=trace, hook=hook)
  x, y = tf.constant(images), tf.constant(labels)
  orders = epoch_orders(seed, len(images))
  history = History()
  global_step = int(optimizer.iterations.numpy())
  for epoch in range(epochs):
    order = next(orders)
    history.permutations.append(order)
    loss_mean, accuracy_mean = MeanTracker(), MeanTracker()
    for batch in batches(order, batch_size):
      index = tf.constant(batch)
      out = step_fn(tf.gather(x, index), tf.gather(y, index))
      loss, correct = float(out["loss"]), float(out["correct"])
      loss_mean.update(loss, len(batch))
      accuracy_mean.update(correct / len(batch), len(batch))
      if on_step is not None:
        record_trace = (tf.nest.map_structure(lambda t: t.numpy(), out["trace"])
                        if trace else None)
        on_step(StepRecord(epoch, global_step, batch, loss, correct / len(batch), record_trace))
      global_step += 1
    history.loss.append(loss_mean.result())
    history.accuracy.append(accuracy_mean.result())
    if on_epoch is not None:
      on_epoch(epoch, history)
  return history


def evaluate(model: SeedNet, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
             mode: str, eval_step: Optional[Callable] = None) -> tuple[float, float]:
  """``model.evaluate``: inference-branch loss and accuracy, averaged over batches in order."""
  step_fn = eval_step or make_eval_step(model, mode=mode)
  loss_mean, accuracy_mean = MeanTracker(), MeanTracker()
  for batch in batches(np.arange(len(images)), batch_size):
    out = step_fn(tf.constant(images[batch]), tf.constant(labels[batch]))
    loss_mean.update(float(out["loss"]), len(batch))
    accuracy_mean.update(float(out["correct"]) / len(batch), len(batch))
  return loss_mean.result(), accuracy_mean.result()
