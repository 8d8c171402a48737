"""The train and eval steps, compiled per mode: eager, ``tf.function``, or XLA, on one device or
on the N replicas of a ``tf.distribute`` strategy (the same step, its loss scaled and its
gradients all-reduced as Keras's fit does it: :func:`make_train_step`).

A step is a pure function of its inputs and the model/optimizer variables; everything worth
seeing comes out as its return value (no prints, no Python side effects), so the same step runs
eagerly, under ``tf.function`` and under XLA. With ``trace=True`` it also returns, per BN layer,
the statistics it normalised with and the moving statistics before and after their update.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from bnraw.core import ops
from bnraw.core.graph import Model
from bnraw.core.layers import BATCH, UpdateHook
from bnraw.core.optim import LossScale

MODES = ("eager", "function", "xla", "auto")
TRACE_KEYS = ("batch_mean", "batch_variance", "moving_mean_before", "moving_variance_before",
              "moving_mean_after", "moving_variance_after")


def has_gpu() -> bool:
  return bool(tf.config.list_physical_devices("GPU"))


def resolve_mode(mode: str) -> str:
  """``auto`` without measuring: XLA with a GPU and plain tf.function on CPU (as Keras
  ``jit_compile="auto"``). Tools that train measure instead (:mod:`bnraw.core.autotune`); this
  guess serves what only evaluates."""
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
  if mode == "auto":
    return "xla" if has_gpu() else "function"
  return mode


def relaxed_batch(examples: int, batch_size: int) -> bool:
  """Whether Keras traces its steps with an unknown batch dimension for this data: its array
  adapter appends the partial last batch as a second dataset, so the element spec's batch
  dimension is None exactly when ``batch_size`` does not divide ``examples``. A graph traced
  for an unknown batch size rounds differently from one traced for a known one (other kernels
  and reduction orders), so bit-identity needs the same choice."""
  return examples % batch_size != 0


def compile_fn(fn: Callable, mode: str, *, relax_batch: bool = False) -> Callable:
  """``fn(images, labels)`` as is (eager), under tf.function, or under tf.function with
  ``jit_compile=True``; ``relax_batch``: one graph for every batch size (the batch dimension
  traced as None, see :func:`relaxed_batch`), else one concrete graph per batch shape.

  Without autograph: every branch and loop in a step is on Python values (``training``, the
  layer list, K steps per call), so the graph is the same, and tracing skips transpiling each
  function the step calls (measured: a third of a seed run's time at width 1/16)."""
  mode = resolve_mode(mode)
  if mode == "eager":
    return fn
  if not relax_batch:
    # Not reduce_retracing: its shape-relaxed graph would take over depending on call history,
    # so a resumed run would not repeat an uninterrupted one exactly.
    return tf.function(fn, jit_compile=(mode == "xla"), autograph=False)
  return _traced_for(fn, lambda shape: [None, *shape[1:]], jit_compile=(mode == "xla"))


def _traced_for(fn: Callable, dims: Callable, *, jit_compile: bool = False) -> Callable:
  """``fn(images, labels)`` under one tf.function whose input signature is made at the first
  call: each argument's shape passed through ``dims`` (None for a dimension left unknown)."""
  compiled = []

  def call(images: tf.Tensor, labels: tf.Tensor):
    if not compiled:
      signature = [tf.TensorSpec(dims(t.shape), t.dtype) for t in (images, labels)]
      compiled.append(tf.function(fn, jit_compile=jit_compile, input_signature=signature,
                                  autograph=False))
    return compiled[0](images, labels)

  return call


def moving_statistics(model: Model) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
  return ([tf.identity(layer.moving_mean) for layer in model.batch_norms],
          [tf.identity(layer.moving_variance) for layer in model.batch_norms])


def make_train_step(model: Model, optimizer, *, mode: str, trace: bool,
                    hook: Optional[UpdateHook] = None, relax_batch: bool = False,
                    strategy: Optional[tf.distribute.Strategy] = None) -> Callable:
  """``step(images, labels) -> {"loss", "correct", "finite"[, "loss_scale", "skipped"][,
  "trace"]}``: one optimizer step.

  ``loss`` is the training-branch loss (plus L2) *before* the update, as fit reports it
  (unscaled: with a :class:`LossScale` optimizer the tape differentiates ``loss * scale``, and
  ``loss_scale`` is the scale this step used, ``skipped`` whether its gradients were not finite);
  ``correct`` counts arg-max hits in that same forward pass; ``finite`` is the per-layer NaN/Inf
  guard (:func:`layers_finite`). ``hook`` (eager mode only) is called in each BN layer just
  before its moving update: the step debugger uses it. ``relax_batch``: see :func:`compile_fn`.

  ``strategy``: the same step on each of its N replicas, as Keras 3's ``fit`` runs it on the TF
  backend (verified bit for bit): the global batch split contiguously (:func:`_shard`); each
  replica's BN layers normalise with their shard's moments and write *their own* copy of the
  moving statistics (mirrored with aggregation NONE, so the copies diverge; synchronized BN
  all-reduces its sums first, :func:`bnraw.core.ops.moments_one_pass`); each replica's loss
  scaled by ``1/N`` (``scale_loss_for_distribution``) before differentiating; the gradients
  SUM-all-reduced (the optimizer's ``_all_reduce_sum_gradients``), so every copy of the weights
  gets the same update. Then every output is per replica and numpy (``[N, ...]``, all-gathered
  so every worker holds every replica's), plus ``scaled_loss``; ``loss`` is the scaled loss
  times N (``unscale_loss_for_distribution``). Replicas take no hook and no loss scaling.
  """
  if hook is not None and resolve_mode(mode) != "eager":
    raise ValueError("a BN update hook needs mode='eager'")
  if strategy is not None and (hook is not None or isinstance(optimizer, LossScale)):
    raise ValueError("replicated steps take no hook and no loss scaling")

  def train_step(images: tf.Tensor, labels: tf.Tensor) -> dict:
    context = tf.distribute.get_replica_context() if strategy is not None else None
    before = moving_statistics(model) if trace else None  # (replicas: this replica's copies)
    scaling = isinstance(optimizer, LossScale)
    with tf.GradientTape() as tape:
      out = model(images, training=True, hook=hook)
      loss = model.loss(out.logits, labels)
      if scaling:
        loss_scale = tf.identity(optimizer.dynamic_scale)
        scaled_loss = optimizer.scale_loss(loss)
      elif context is not None:
        n = context.num_replicas_in_sync
        scaled_loss = tf.multiply(loss, tf.cast(1.0 / n, loss.dtype))
    gradients = tape.gradient(scaled_loss if scaling or context else loss,
                              model.trainable_variables)
    if context is not None:
      gradients = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
    skipped = optimizer.apply(gradients)
    result = {"loss": loss, "correct": model.correct(out.logits, labels),
              "finite": layers_finite(model, out.statistics)}
    if scaling:
      result.update(loss_scale=loss_scale, skipped=skipped)
    if context is not None:
      result.update(loss=tf.multiply(scaled_loss, tf.cast(n, scaled_loss.dtype)),
                    scaled_loss=scaled_loss)
    if trace:
      result["trace"] = dict(zip(TRACE_KEYS, (
          [s.mean for s in out.statistics], [s.variance for s in out.statistics], *before,
          *moving_statistics(model))))
    return result

  if strategy is not None:
    return _per_replica(train_step, strategy, mode, relax_batch)
  return compile_fn(train_step, mode, relax_batch=relax_batch)


def layers_finite(model: Model, statistics: list[ops.Moments]) -> tf.Tensor:
  """``[L]`` bool: layer i's batch and (updated) moving statistics are all finite. A handful of
  tiny reductions, cheap enough to leave on; a returned value, so it works under XLA."""
  return tf.stack([
      tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in
                     (s.mean, s.variance, layer.moving_mean, layer.moving_variance)])
      for s, layer in zip(statistics, model.batch_norms)])


def make_eval_step(model: Model, *, mode: str, relax_batch: bool = False,
                   strategy: Optional[tf.distribute.Strategy] = None,
                   training: bool = False) -> Callable:
  """``step(images, labels) -> {"loss", "correct"}`` in the inference branch (no state change);
  ``training``: the training branch instead, each BN layer with its batch's own moments and no
  update (``statistics=BATCH``), as fit's forward pass normalises. ``strategy``: on each replica's
  shard, each with *its own* copy of the moving statistics, the loss scaled by 1/N and back (as
  Keras's ``test_step`` reports it); outputs per replica, as :func:`make_train_step`'s."""

  def eval_step(images: tf.Tensor, labels: tf.Tensor) -> dict:
    logits = model(images, training=training, statistics=BATCH if training else None).logits
    loss = model.loss(logits, labels)
    if strategy is not None:
      n = tf.distribute.get_replica_context().num_replicas_in_sync
      scaled = tf.multiply(loss, tf.cast(1.0 / n, loss.dtype))
      loss = tf.multiply(scaled, tf.cast(n, scaled.dtype))
    return {"loss": loss, "correct": model.correct(logits, labels)}

  if strategy is not None:
    return _per_replica(eval_step, strategy, mode, relax_batch)
  return compile_fn(eval_step, mode, relax_batch=relax_batch)


def _shard(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """This replica's contiguous part of the global batch, as Keras's distributed dataset cuts it
  (:func:`bnraw.core.batching.shard_bounds`), cut inside the graph so that its size stays
  unknown when the batch's is."""
  context = tf.distribute.get_replica_context()
  n, r = context.num_replicas_in_sync, context.replica_id_in_sync_group
  size = tf.shape(x)[0]
  per = (size + n - 1) // n
  start = tf.minimum(r * per, size)
  stop = tf.minimum(start + per, size)
  parts = x[start:stop], y[start:stop]
  if x.shape[0] is not None and x.shape[0] % n == 0:  # a known batch: known equal shards
    for part, whole in zip(parts, (x, y)):
      part.set_shape([whole.shape[0] // n, *whole.shape[1:]])
  return parts


def _per_replica(replica_step: Callable, strategy: tf.distribute.Strategy, mode: str,
                 relax_batch: bool = False) -> Callable:
  """``replica_step`` on every replica's shard, compiled as ``mode`` (XLA inside each replica's
  function, as Keras's jit would), its outputs all-gathered (outside XLA) so that each worker
  holds every replica's (``[N, ...]``, replica order, numpy), as Keras's metrics read their
  SUM-on-read totals across workers. ``relax_batch``: traced for an unknown batch size, as
  Keras's distributed dataset is when the batch size does not divide the examples
  (:func:`relaxed_batch`; measured: it rounds differently)."""
  mode = resolve_mode(mode)
  inner = replica_step if mode == "eager" else tf.function(
      replica_step, jit_compile=(mode == "xla"), autograph=False)

  def gather(out):
    context = tf.distribute.get_replica_context()
    stack = lambda t: context.all_gather(t[None], axis=0)
    return tf.nest.map_structure(
        lambda t: tf.cast(stack(tf.cast(t, tf.int32)), tf.bool) if t.dtype == tf.bool
        else stack(t), out)

  # separate runs: a synchronisation inside a nested tf.function must be the whole replica fn
  def run(x, y):
    shards = strategy.run(_shard, args=(x, y))
    return strategy.run(gather, args=(strategy.run(inner, args=shards),))

  if mode == "eager":
    compiled = run
  elif relax_batch:  # every batch size through one graph, as Keras's relaxed element spec
    compiled = _traced_for(run, lambda shape: [None, *shape[1:]])
  else:
    compiled = tf.function(run, autograph=False)

  def step(images, labels) -> dict:
    out = compiled(tf.convert_to_tensor(images), tf.convert_to_tensor(labels))
    return tf.nest.map_structure(
        lambda value: np.asarray(strategy.experimental_local_results(value)[0]), out)

  return step


def make_multi_step(step_fn: Callable, mode: str, *, relax_batch: bool = False) -> Callable:
  """Keras's ``steps_per_execution``: ``multi(images, labels)`` runs ``step_fn`` over
  ``images[k]``/``labels[k]`` for k = 0, 1, ... in one call and returns its outputs stacked
  (``[k, ...]``, the trace too), stopping after the first step that is not finite (loss or
  ``finite`` flags), so the state is the one a one-step loop would stop in.

  As Keras's TF trainer does it: the compiled one-step function inside a ``tf.while_loop`` of
  a plain ``tf.function`` (eager: a Python loop). ``relax_batch`` as ``step_fn`` was made: the
  batch dimension must reach it unknown, or the graph optimiser specialises the inlined step to
  the known size and it rounds differently (measured: the weights then drift from the K=1 run).
  """
  mode = resolve_mode(mode)

  def ok(out):
    return tf.logical_and(tf.reduce_all(out["finite"]), tf.math.is_finite(out["loss"]))

  if mode == "eager":
    def multi_eager(images, labels):
      outs = []
      for k in range(int(images.shape[0])):
        outs.append(step_fn(images[k], labels[k]))
        if not bool(ok(outs[-1])):
          break
      return tf.nest.map_structure(lambda *t: tf.stack(t), *outs)
    return multi_eager

  def multi(images, labels):
    first = step_fn(images[0], labels[0])
    flat = tf.nest.flatten(first)
    arrays = [tf.TensorArray(t.dtype, size=0, dynamic_size=True, element_shape=t.shape).write(0, t)
              for t in flat]

    def cond(k, going, *arrays):
      return tf.logical_and(going, k < tf.shape(images)[0])

    def body(k, going, *arrays):
      out = step_fn(images[k], labels[k])
      arrays = [a.write(k, t) for a, t in zip(arrays, tf.nest.flatten(out))]
      return (k + 1, ok(out), *arrays)

    _, _, *arrays = tf.while_loop(cond, body, (tf.constant(1), ok(first), *arrays))
    return tf.nest.pack_sequence_as(first, [a.stack() for a in arrays])

  # the number of steps is never part of the graph; the batch size as in step_fn's
  return _traced_for(multi, lambda shape: [None, None if relax_batch else shape[1], *shape[2:]])
