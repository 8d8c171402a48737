"""The raw step on N replicas under ``tf.distribute.MirroredStrategy``, written out as Keras 3's
``fit`` does it on the TF backend (keras/src/backend/tensorflow/trainer.py, optimizer.py,
losses/loss.py), and verified bit for bit against it:

* the global batch is split contiguously over the replicas;
* each replica runs the forward pass on its shard with the same weights; its BN layers normalise
  with the shard's own moments and write *their own* copy of the moving statistics (the
  variables are mirrored with aggregation NONE: in a replica context an assignment changes the
  local copy only, so the copies diverge; read outside one, a variable gives replica 0's copy);
  a ``synchronized`` BN layer all-reduces its sums first (:func:`bnraw.core.ops.moments_one_pass`)
  so that every copy gets the same update;
* each replica's loss is scaled by ``1/N`` (Keras's ``scale_loss_for_distribution``) before
  differentiating; the gradients are SUM-all-reduced (``replica_context.all_reduce``, as the
  optimizer's ``_all_reduce_sum_gradients``) and every replica applies the same update to its
  copy of the weights, which therefore stay identical;
* the reported loss is the scaled loss times ``N`` (``unscale_loss_for_distribution``), and
  ``fit``'s epoch loss adds each replica's ``loss * shard size`` into that replica's own total:
  ``sum(totals) / sum(counts)`` (:class:`bnraw.core.loop.MeanTracker`).

Logical devices: N GPUs when there are that many, otherwise the CPU split into N logical devices
(:func:`configure_devices`, before TensorFlow initialises its devices).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from bnraw.core.layers import BATCH
from bnraw.core.loop import batches, shard_bounds, shard_sizes
from bnraw.core.loop import mean_over_batches as loop_mean_over_batches
from bnraw.core.step import (TRACE_KEYS, _traced_for, layers_finite, moving_statistics,
                             relaxed_batch)


def configure_devices(n: int) -> list[str]:
  """N devices for a MirroredStrategy: the first N GPUs, else the CPU split into N logical
  devices. Must run before TensorFlow initialises its devices (any op, any variable)."""
  gpus = tf.config.list_physical_devices("GPU")
  if len(gpus) >= n:
    return [f"/gpu:{i}" for i in range(n)]
  cpu = tf.config.list_physical_devices("CPU")[0]
  configured = tf.config.get_logical_device_configuration(cpu)  # (listing would start TF)
  if len(configured or [None]) != n:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
  return [device.name for device in tf.config.list_logical_devices("CPU")][:n]


def strategy_for(n: int) -> tf.distribute.Strategy:
  """A MirroredStrategy over :func:`configure_devices`'s N devices."""
  return tf.distribute.MirroredStrategy(configure_devices(n))


def multi_worker_strategy() -> tf.distribute.Strategy:
  """A MultiWorkerMirroredStrategy over the cluster in ``TF_CONFIG``: each worker's GPUs, or
  its CPU as one replica; replicas numbered chief first, then worker 0, 1, ... Must be made
  before TensorFlow initialises its devices."""
  return tf.distribute.MultiWorkerMirroredStrategy()


def copies(variable) -> list[np.ndarray]:
  """Every replica's copy of a (mirrored) variable, in replica order; one for a plain one."""
  parts = getattr(variable, "values", None)
  if parts is None or callable(parts):
    return [np.array(variable.numpy())]
  return [np.array(part.numpy()) for part in parts]


def gathered_copies(strategy: tf.distribute.Strategy, variables: Sequence) -> list[np.ndarray]:
  """Per variable ``[N, ...]``: every replica's copy, all-gathered in one call, so that every
  worker of a multi-worker strategy holds them all (every worker must call it: a collective)."""
  def gather():
    context = tf.distribute.get_replica_context()
    return [context.all_gather(tf.identity(v)[None], axis=0) for v in variables]
  out = tf.function(lambda: strategy.run(gather))()
  return [np.asarray(strategy.experimental_local_results(value)[0]) for value in out]


def any_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
  """Whether ``flag`` is true on any worker of a multi-worker strategy (a SUM all-reduce:
  every worker must call it, as each does after every step to agree on stopping)."""
  value = tf.constant(float(flag))
  out = _any_worker(strategy)(value)
  return bool(np.asarray(strategy.experimental_local_results(out)[0]) > 0)


_ANY_WORKER: dict = {}  # id(strategy) -> its compiled SUM all-reduce (traced once)


def _any_worker(strategy):
  if id(strategy) not in _ANY_WORKER:
    reduce = lambda v: tf.distribute.get_replica_context().all_reduce(  # made on the replica
        tf.distribute.ReduceOp.SUM, tf.identity(v))
    _ANY_WORKER[id(strategy)] = (strategy, tf.function(lambda v: strategy.run(reduce,
                                                                              args=(v,))))
  return _ANY_WORKER[id(strategy)][1]


def moving_variables(model) -> list:
  """Every BN layer's moving mean and moving variance, in that order: the state whose copies
  differ across replicas."""
  return [v for layer in model.batch_norms for v in (layer.moving_mean, layer.moving_variance)]


def moving_copies(strategy: tf.distribute.Strategy, model) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per BN layer every replica's copy of its moving mean and variance (``[N, C]`` each), in one
  all-gather (:func:`gathered_copies`)."""
  values = gathered_copies(strategy, moving_variables(model))
  return list(zip(values[0::2], values[1::2]))


def copy_spread(values: np.ndarray) -> float:
  """How far the replicas' copies (``[N, ...]``) of a variable spread: ``max |copy_r - copy_0|
  / max |copy_0|`` (0: identical, as synchronized BN keeps them)."""
  return float(np.abs(values - values[0]).max() / (np.abs(values[0]).max() or 1.0))


class CopyStore:
  """Every replica's copy of the moving statistics as plain ``[N, C]`` variables (created
  outside the strategy), which a checkpoint holds beside the mirrored ones (whose saved value is
  replica 0's copy): :meth:`gather` fills them from the replicas (every worker takes part),
  :meth:`scatter` puts each row back into its own replica's copy, on every worker."""

  def __init__(self, strategy: tf.distribute.Strategy, variables: Sequence):
    self.strategy, self.mirrored = strategy, list(variables)
    n = strategy.num_replicas_in_sync
    with tf.init_scope():
      self.variables = [tf.Variable(tf.zeros([n, *v.shape], v.dtype), trainable=False,
                                    name=v.name.split(":")[0] + "/replicas")
                        for v in self.mirrored]

  def gather(self) -> None:
    for store, value in zip(self.variables, gathered_copies(self.strategy, self.mirrored)):
      store.assign(value)

  def scatter(self) -> None:
    values = [tf.identity(v) for v in self.variables]

    def put():
      replica = tf.distribute.get_replica_context().replica_id_in_sync_group
      for variable, value in zip(self.mirrored, values):
        variable.assign(value[replica])  # in a replica context: that replica's copy only

    tf.function(lambda: self.strategy.run(put))()


def assign_copies(variable, values: Sequence[np.ndarray]) -> None:
  """Sets each replica's copy (one value: every copy)."""
  parts = getattr(variable, "values", None)
  if parts is None or callable(parts):
    variable.assign(values[0])
    return
  if len(values) == 1:
    values = list(values) * len(parts)
  for part, value in zip(parts, values):
    part.assign(value)


def make_train_step(model, optimizer, strategy: tf.distribute.Strategy, *, mode: str,
                    trace: bool = False, relax_batch: bool = False) -> Callable:
  """``step(x, y) -> {"loss": [N], "scaled_loss": [N], "correct": [N], "finite": [N, L]
  [, "trace"]}`` (numpy, every replica's, on every
  worker) for one global batch: the replicated step of this module's docstring, compiled as
  ``mode`` (function or xla; XLA inside each replica's function, as Keras's jit would).
  ``trace``: per BN layer each replica's statistics (bnraw.core.step.TRACE_KEYS, ``[N, C]``).
  ``relax_batch``: traced for an unknown batch size, as Keras's distributed dataset is when the
  batch size does not divide the examples (bnraw.core.step.relaxed_batch; it rounds
  differently, measured: 3 replicas of batch 48 and the zoo's 40 examples of batch 16)."""
  if mode not in ("function", "xla", "eager"):
    raise ValueError(f"mode must be eager, function or xla, got {mode!r}")

  def replica_step(x, y):
    context = tf.distribute.get_replica_context()
    n = context.num_replicas_in_sync
    before = moving_statistics(model) if trace else None  # this replica's copies
    with tf.GradientTape() as tape:
      out = model(x, training=True)
      loss = model.loss(out.logits, y)
      scaled = tf.multiply(loss, tf.cast(1.0 / n, loss.dtype))
    gradients = tape.gradient(scaled, model.trainable_variables)
    gradients = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
    optimizer.apply(gradients)
    finite = layers_finite(model, out.statistics)
    result = {"loss": tf.multiply(scaled, tf.cast(n, scaled.dtype)), "scaled_loss": scaled,
              "correct": model.correct(out.logits, y), "finite": finite}
    if trace:
      result["trace"] = dict(zip(TRACE_KEYS, ([s.mean for s in out.statistics],
                                              [s.variance for s in out.statistics],
                                              *before, *moving_statistics(model))))
    return result

  return _per_replica(replica_step, strategy, mode, relax_batch)


def make_eval_step(model, strategy: tf.distribute.Strategy, *, mode: str,
                   relax_batch: bool = False) -> Callable:
  """``step(x, y) -> {"loss": [N], "correct": [N]}``: Keras's ``evaluate`` under the strategy,
  each replica in the inference branch with *its own* copy of the moving statistics, its loss
  scaled by 1/N and back (as ``test_step`` reports it)."""

  def replica_step(x, y):
    n = tf.distribute.get_replica_context().num_replicas_in_sync
    logits = model(x, training=False).logits
    loss = model.loss(logits, y)
    scaled = tf.multiply(loss, tf.cast(1.0 / n, loss.dtype))
    return {"loss": tf.multiply(scaled, tf.cast(n, scaled.dtype)),
            "correct": model.correct(logits, y)}

  return _per_replica(replica_step, strategy, mode, relax_batch)


def _per_replica(replica_step: Callable, strategy: tf.distribute.Strategy, mode: str,
                 relax_batch: bool = False) -> Callable:
  """``replica_step`` on every replica's shard, its outputs all-gathered (outside XLA) so that
  each worker holds every replica's (``[N, ...]``, replica order), as Keras's metrics read their
  SUM-on-read totals across workers."""
  inner = replica_step if mode == "eager" else tf.function(replica_step,
                                                           jit_compile=(mode == "xla"))

  def gather(out):
    context = tf.distribute.get_replica_context()
    stack = lambda t: context.all_gather(t[None], axis=0)
    return tf.nest.map_structure(
        lambda t: tf.cast(stack(tf.cast(t, tf.int32)), tf.bool) if t.dtype == tf.bool
        else stack(t), out)

  def shard(x, y):
    """This replica's contiguous part of the global batch (:func:`shard_bounds`), cut inside
    the graph so that its size stays unknown when the batch's is."""
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

  # separate runs: a synchronisation inside a nested tf.function must be the whole replica fn
  def run(x, y):
    shards = strategy.run(shard, args=(x, y))
    return strategy.run(gather, args=(strategy.run(inner, args=shards),))

  if mode == "eager":
    compiled = run
  elif relax_batch:  # every batch size through one graph, as Keras's relaxed element spec
    compiled = _traced_for(run, lambda shape: [None, *shape[1:]])
  else:
    compiled = tf.function(run)

  def step(images, labels) -> dict:
    out = compiled(tf.convert_to_tensor(images), tf.convert_to_tensor(labels))
    return tf.nest.map_structure(
        lambda value: np.asarray(strategy.experimental_local_results(value)[0]), out)

  return step


def make_train_branch_step(model, strategy: tf.distribute.Strategy, *, mode: str,
                           relax_batch: bool = False) -> Callable:
  """``step(x, y) -> {"loss": [N], "correct": [N]}``: the training branch on each replica's
  shard (BN with the shard's own moments, no update), as fit's forward pass normalises."""

  def replica_step(x, y):
    n = tf.distribute.get_replica_context().num_replicas_in_sync
    logits = model(x, training=True, statistics=BATCH).logits
    loss = model.loss(logits, y)
    scaled = tf.multiply(loss, tf.cast(1.0 / n, loss.dtype))
    return {"loss": tf.multiply(scaled, tf.cast(n, scaled.dtype)),
            "correct": model.correct(logits, y)}

  return _per_replica(replica_step, strategy, mode, relax_batch)


def evaluate(model, strategy: tf.distribute.Strategy, images: np.ndarray, labels: np.ndarray, *,
             batch_size: int, mode: str) -> tuple[float, float]:
  """``model.evaluate`` under the strategy (each shard normalised with its replica's copy):
  loss and metric, averaged as :class:`bnraw.core.loop.MeanTracker`."""
  relax = relaxed_batch(len(images), batch_size)
  return mean_over_batches(make_eval_step(model, strategy, mode=mode, relax_batch=relax),
                           images, labels,
                           batches(np.arange(len(images)), batch_size),
                           strategy.num_replicas_in_sync)


def mean_over_batches(step: Callable, images: np.ndarray, labels: np.ndarray,
                      chunks, n: int) -> tuple[float, float]:
  """``step`` (a per-replica loss and metric step) over the batches ``chunks`` (example
  indices), averaged as fit and evaluate average them under a strategy
  (:func:`bnraw.core.loop.mean_over_batches` on ``n`` replicas)."""
  def one_batch(batch):
    out = step(images[batch], labels[batch])
    return out["loss"], out["correct"]

  return loop_mean_over_batches(one_batch, chunks, replicas=n)


__all__ = ["CopyStore", "any_worker", "assign_copies", "configure_devices", "copies",
           "copy_spread", "evaluate", "gathered_copies", "make_eval_step",
           "make_train_branch_step", "make_train_step", "mean_over_batches", "moving_copies",
           "moving_variables", "multi_worker_strategy", "shard_bounds", "shard_sizes",
           "strategy_for"]
