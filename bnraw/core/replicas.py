"""Replicas' state: the devices a ``tf.distribute`` strategy runs on, and every replica's copy of
the variables whose copies differ (BN's moving statistics, mirrored with aggregation NONE: in a
replica context an assignment changes the local copy only; read outside one, a variable gives
replica 0's copy). The replicated *step* is :func:`bnraw.core.step.make_train_step` with a
strategy; its batching and epoch means are :mod:`bnraw.core.batching`'s.

Logical devices: N GPUs when there are that many, otherwise the CPU split into N logical devices
(:func:`configure_devices`, before TensorFlow initialises its devices).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf



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


__all__ = ["CopyStore", "any_worker", "assign_copies", "configure_devices", "copies",
           "copy_spread", "gathered_copies", "moving_copies", "moving_variables",
           "multi_worker_strategy", "strategy_for"]
