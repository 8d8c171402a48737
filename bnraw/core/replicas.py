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
  ``sum(totals) / sum(counts)`` (:class:`ReplicaMeans`).

Logical devices: N GPUs when there are that many, otherwise the CPU split into N logical devices
(:func:`configure_devices`, before TensorFlow initialises its devices).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from bnraw.core.step import layers_finite


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


def shard_bounds(batch: int, n: int) -> list[tuple[int, int]]:
  """Each replica's contiguous ``[start, stop)`` of a global batch of ``batch`` examples, as
  Keras's distributed dataset cuts it (measured): ``ceil(batch / n)`` to each replica in turn,
  the rest to the next, none after (10 over 4: 3, 3, 3, 1; 3 over 4: 1, 1, 1, 0)."""
  per = -(-batch // n)
  return [(min(r * per, batch), min((r + 1) * per, batch)) for r in range(n)]


def distribute(strategy: tf.distribute.Strategy, array: np.ndarray):
  """``array`` (one global batch) as per-replica values, contiguous shards in replica order."""
  bounds = shard_bounds(len(array), strategy.num_replicas_in_sync)
  return strategy.experimental_distribute_values_from_function(
      lambda context: tf.constant(array[slice(*bounds[context.replica_id_in_sync_group])]))


def local(strategy: tf.distribute.Strategy, value) -> list:
  """Each replica's part of a per-replica value, in replica order, as numpy."""
  return [np.asarray(v) for v in strategy.experimental_local_results(value)]


def copies(variable) -> list[np.ndarray]:
  """Every replica's copy of a (mirrored) variable, in replica order; one for a plain one."""
  parts = getattr(variable, "values", None)
  if parts is None or callable(parts):
    return [np.array(variable.numpy())]
  return [np.array(part.numpy()) for part in parts]


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


def make_train_step(model, optimizer, strategy: tf.distribute.Strategy, *,
                    mode: str) -> Callable:
  """``step(x, y) -> {"loss": [N], "correct": [N], "finite": [N, L]}`` (numpy, per replica) for
  one global batch: the replicated step of this module's docstring, compiled as ``mode``
  (function or xla; XLA inside each replica's function, as Keras's jit would)."""
  if mode not in ("function", "xla", "eager"):
    raise ValueError(f"mode must be eager, function or xla, got {mode!r}")

  def replica_step(x, y):
    context = tf.distribute.get_replica_context()
    n = context.num_replicas_in_sync
    with tf.GradientTape() as tape:
      out = model(x, training=True)
      loss = model.loss(out.logits, y)
      scaled = tf.multiply(loss, tf.cast(1.0 / n, loss.dtype))
    gradients = tape.gradient(scaled, model.trainable_variables)
    gradients = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
    optimizer.apply(gradients)
    finite = layers_finite(model, out.statistics)
    return {"loss": tf.multiply(scaled, tf.cast(n, scaled.dtype)), "scaled_loss": scaled,
            "correct": model.correct(out.logits, y), "finite": finite,
            "batch_mean": [s.mean for s in out.statistics],
            "batch_variance": [s.variance for s in out.statistics]}

  return _per_replica(replica_step, strategy, mode)


def make_eval_step(model, strategy: tf.distribute.Strategy, *, mode: str) -> Callable:
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

  return _per_replica(replica_step, strategy, mode)


def _per_replica(replica_step: Callable, strategy: tf.distribute.Strategy,
                 mode: str) -> Callable:
  inner = replica_step if mode == "eager" else tf.function(replica_step,
                                                           jit_compile=(mode == "xla"))
  run = lambda x, y: strategy.run(inner, args=(x, y))
  compiled = run if mode == "eager" else tf.function(run)

  def step(images: np.ndarray, labels: np.ndarray) -> dict:
    out = compiled(distribute(strategy, images), distribute(strategy, labels))
    return tf.nest.map_structure(lambda value: np.stack(local(strategy, value)), out)

  return step


def make_train_branch_step(model, strategy: tf.distribute.Strategy, *, mode: str) -> Callable:
  """``step(x, y) -> {"loss": [N], "correct": [N]}``: the training branch on each replica's
  shard (BN with the shard's own moments, no update), as fit's forward pass normalises."""
  from bnraw.core.layers import BATCH

  def replica_step(x, y):
    n = tf.distribute.get_replica_context().num_replicas_in_sync
    logits = model(x, training=True, statistics=BATCH).logits
    loss = model.loss(logits, y)
    scaled = tf.multiply(loss, tf.cast(1.0 / n, loss.dtype))
    return {"loss": tf.multiply(scaled, tf.cast(n, scaled.dtype)),
            "correct": model.correct(logits, y)}

  return _per_replica(replica_step, strategy, mode)


class History:
  """What a replicated :func:`fit` leaves: per epoch what fit printed, the batch orders, and
  each replica's batch statistics at the last step (``[replica][layer]`` Moments)."""

  def __init__(self):
    self.loss, self.accuracy, self.permutations = [], [], []
    self.last_statistics = None


def fit(model, optimizer, strategy: tf.distribute.Strategy, images: np.ndarray,
        labels: np.ndarray, *, batch_size: int, epochs: int, seed: int, mode: str,
        on_epoch: Optional[Callable] = None, sorted_shards: bool = False) -> History:
  """``model.fit`` under the strategy: the same shuffling as :func:`bnraw.core.loop.fit`
  (``default_rng(seed)``, a permutation per epoch; ``sorted_shards``: each batch sorted by
  label, :func:`bnraw.core.loop.sorted_within_batches`), one replicated step per global batch,
  the epoch means as :class:`ReplicaMeans`. A non-finite step raises ``FloatingPointError``."""
  from bnraw.core.loop import batches, epoch_orders, sorted_within_batches
  from bnraw.core.ops import Moments
  step = make_train_step(model, optimizer, strategy, mode=mode)
  n = strategy.num_replicas_in_sync
  history = History()
  orders = epoch_orders(seed, len(images))
  for epoch in range(epochs):
    order = next(orders)
    if sorted_shards:
      order = sorted_within_batches(order, labels, batch_size)
    history.permutations.append(order)
    losses, metrics = ReplicaMeans(n), ReplicaMeans(n)
    for batch in batches(order, batch_size):
      out = step(images[batch], labels[batch])
      if not (np.all(out["finite"]) and np.all(np.isfinite(out["loss"]))):
        raise FloatingPointError(f"non-finite value in epoch {epoch}")
      sizes = shard_sizes(len(batch), n)
      losses.update(out["loss"], sizes)
      metrics.add(out["correct"], sizes)
      history.last_statistics = [
          [Moments(tf.constant(m[r]), tf.constant(v[r]))
           for m, v in zip(out["batch_mean"], out["batch_variance"])] for r in range(n)]
    history.loss.append(losses.result())
    history.accuracy.append(metrics.result())
    if on_epoch is not None:
      on_epoch(epoch, history)
  return history


def evaluate(model, strategy: tf.distribute.Strategy, images: np.ndarray, labels: np.ndarray, *,
             batch_size: int, mode: str) -> tuple[float, float]:
  """``model.evaluate`` under the strategy (each shard normalised with its replica's copy):
  loss and metric, averaged as :class:`ReplicaMeans`."""
  from bnraw.core.loop import batches
  return mean_over_batches(make_eval_step(model, strategy, mode=mode), images, labels,
                           batches(np.arange(len(images)), batch_size),
                           strategy.num_replicas_in_sync)


def shard_sizes(batch: int, n: int) -> list[int]:
  """Each replica's number of examples of a global batch (:func:`shard_bounds`)."""
  return [stop - start for start, stop in shard_bounds(batch, n)]


def mean_over_batches(step: Callable, images: np.ndarray, labels: np.ndarray,
                      chunks, n: int) -> tuple[float, float]:
  """``step`` (a per-replica loss and metric step) over the batches ``chunks`` (example
  indices), its loss and metric averaged as fit and evaluate average them under a strategy
  (:class:`ReplicaMeans`)."""
  losses, metrics = ReplicaMeans(n), ReplicaMeans(n)
  for batch in chunks:
    out = step(images[batch], labels[batch])
    sizes = shard_sizes(len(batch), n)
    losses.update(out["loss"], sizes)
    metrics.add(out["correct"], sizes)
  return losses.result(), metrics.result()


class ReplicaMeans:
  """``fit``'s epoch mean under a strategy: one float32 (total, count) per replica, each adding
  its own ``value * shard size``; the result is ``sum(totals) / sum(counts)``."""

  def __init__(self, n: int):
    self.totals = [np.float32(0)] * n
    self.counts = [np.float32(0)] * n

  def update(self, values: Sequence[float], sizes: Sequence[int]) -> None:
    for r, (value, size) in enumerate(zip(values, sizes)):
      self.totals[r] = np.float32(self.totals[r] + np.float32(value) * np.float32(size))
      self.counts[r] = np.float32(self.counts[r] + np.float32(size))

  def add(self, sums: Sequence[float], sizes: Sequence[int]) -> None:
    for r, (total, size) in enumerate(zip(sums, sizes)):
      self.totals[r] = np.float32(self.totals[r] + np.float32(total))
      self.counts[r] = np.float32(self.counts[r] + np.float32(size))

  def result(self) -> float:
    total = np.float32(0)
    for t in self.totals:
      total = np.float32(total + t)
    count = np.float32(sum(self.counts))
    return float(total / count) if count else 0.0


__all__ = ["ReplicaMeans", "assign_copies", "configure_devices", "copies", "distribute", "local",
           "evaluate", "fit", "History", "make_eval_step", "make_train_branch_step",
           "make_train_step", "mean_over_batches", "shard_bounds", "shard_sizes",
           "strategy_for"]
