"""The decomposition for a seed run on N replicas (``--replicas=N``): what replicas add to the
fit/evaluate gap.

Under ``MirroredStrategy`` every replica keeps its own copy of the moving statistics
(bnraw.core.replicas). A user then sees two evaluates: ``evaluate_distributed`` (``evaluate``
under the strategy: each shard normalised with its replica's copy) and ``evaluate_saved`` (one
device after save/load: Keras 3 saves replica 0's copy). The single-copy chain of the seed's
decomposition runs on replica 0's copy (so its ``evaluate`` is ``evaluate_saved``), and one more
part closes it::

    replica_divergence = evaluate_distributed - evaluate_saved

so the six parts sum exactly to ``evaluate_distributed - fit``. ``train_mode_final`` is the
training branch as fit ran it: each replica normalising its shard (global batch / N) with the
shard's own moments, so ``batch_vs_population`` holds the per-replica batch size.
``last_batch_stats`` is replica 0's last shard. PreciseBN aggregates over all shards (one
population statistic, which ``fix`` writes into every copy).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import tensorflow as tf

from bnraw import outputs
from bnraw.core import batching, loop, ops, replicas
from bnraw.diagnosis import decompose as dg
from bnraw.errors import UsageError
from bnraw.models.workload import Workload


def run(workload: Workload, *, out_dir: str, fix: Optional[str] = None,
        overwrite: bool = False, progress: bool = True,
        precise_bn_batches: Optional[int] = None) -> dict:
  """Trains the seed's workload on its replicas (raw), then the decomposition of this
  module's docstring (``precise_bn_batches``: PreciseBN's statistics from the data's first
  that many batches; None: all); writes ``diagnosis.json``; returns its dict."""
  if fix not in (None, "precise_bn"):
    raise UsageError("fix", f"must be precise_bn, got {fix!r}")
  from bnraw.diagnosis.precise_bn import precise_bn_data
  if workload.source != "seed":
    raise UsageError("replicas", "the replicated diagnosis runs the seed for now")
  data, model, train = workload.data_config, workload.model_config, workload.train
  n, strategy, mode = workload.replicas, workload.strategy, workload.replica_mode()
  outputs.prepare_out_dir(out_dir, overwrite=overwrite)
  raw, images, labels = workload.model, workload.images, workload.labels
  printer = None
  if progress:
    from bnraw.progress import EpochProgress
    printer = EpochProgress(train.epochs, label=f"raw x{n}",
                            steps_per_epoch=batching.steps_per_epoch(len(images), train.batch_size))
  last = []  # the last step's trace: every replica's batch statistics

  def keep_last(record):
    last[:] = [record.trace]

  history = loop.fit(raw, workload.optimizer, images, labels, batch_size=train.batch_size,
                     epochs=train.epochs, seed=train.seed, mode=mode, trace=True,
                     on_step=keep_last, on_epoch=printer, strategy=strategy,
                     sorted_shards=train.shards == "sorted")
  if history.status == "non_finite":
    raise history.error
  last_statistics = [ops.Moments(tf.constant(mean[0]), tf.constant(variance[0]))
                     for mean, variance in zip(last[0]["batch_mean"], last[0]["batch_variance"])]
  result = diagnose(raw, strategy, images, labels, history, last_statistics,
                    batch_size=train.batch_size, mode=mode, precise_bn_batches=precise_bn_batches)
  precise = result.pop("precise_statistics")
  title = (f"case {data.case}, width {model.width:g}, momentum {model.momentum:g}, global "
           f"batch {train.batch_size} over {n} replicas ({train.batch_size // n} each"
           + (", shards sorted by label" if train.shards == "sorted" else "") + "), "
           f"{train.epochs} epochs, raw ({mode})")
  out = {"config": workload.recorded(impl="raw", fix=fix),
         "impl": "raw", "title": title, "resolved": {"width": model.width, "mode": mode},
         "environment": outputs.environment(), **result,
         "precise_bn_data": precise_bn_data(len(images), train.batch_size, precise_bn_batches),
         "history": {"loss": history.loss, "accuracy": history.accuracy}}
  if fix == "precise_bn":  # one population statistic into every copy
    for layer, stats in zip(raw.batch_norms, precise):
      layer.set_moving_statistics(stats)
    loss, accuracy = loop.evaluate(raw, images, labels, batch_size=train.batch_size, mode=mode,
                                   strategy=strategy)
    out["fixed"] = {"method": "precise_bn", "evaluate": {"loss": loss, "accuracy": accuracy},
                    "saved": None}
  outputs.write_json(os.path.join(out_dir, "diagnosis.json"), out)
  return out


def diagnose(raw, strategy, images: np.ndarray, labels: np.ndarray,
             history: loop.History, last_statistics: list, *, batch_size: int,
             mode: str, precise_bn_batches: Optional[int] = None) -> dict:
  """The decomposition of a replicated run (module docstring), state left untouched;
  ``last_statistics``: replica 0's batch moments at the last step, per layer."""
  from bnraw.diagnosis.precise_bn import raw_population_statistics
  n = strategy.num_replicas_in_sync
  names = [layer.name for layer in raw.batch_norms]
  per_layer = lambda stats: dict(zip(names, stats))
  forward_loss = dg.forward_loss_fn(raw)  # one device: read outside a replica, replica 0's copy
  loss = lambda stats, order=None, what="loss": dg.raw_loss(raw, images, labels, stats,
                                                            batch_size, order, forward_loss, what)
  moving = [layer.moving for layer in raw.batch_norms]
  precise = raw_population_statistics(raw, images, batch_size, most=precise_bn_batches)
  gathered = replicas.moving_copies(strategy, raw)  # every replica's copies, one all-gather
  saved = loss(per_layer(moving))
  results = {
      "fit": (history.loss[-1], history.accuracy[-1]),
      "train_mode_final": loop.evaluate_batches(
          raw, images, labels, dg.batch_chunks(len(images), batch_size, history.permutations[-1]),
          batch_size=batch_size, mode=mode, strategy=strategy, training=True),
      "precise_bn": loss(per_layer(precise)),
      "last_batch_stats": loss(per_layer(last_statistics)),
      "no_bessel": saved,  # no Bessel factor with replicas (refused)
      "evaluate": saved,
      "evaluate_distributed": loop.evaluate(raw, images, labels, batch_size=batch_size,
                                            mode=mode, strategy=strategy),
      # tf_keras 2 keeps the statistics ON_READ with MEAN: it saves the mean of the copies
      # (measured: copies 0 and 5 save 2.5)
      "tf_keras_saved": loss(per_layer(mean_of_copies(gathered))),
  }
  losses = {key: value[0] for key, value in results.items()}
  attribution = dg.attribution(losses)
  attribution["replica_divergence"] = losses["evaluate_distributed"] - losses["evaluate"]
  copies = {name: {"moving_mean_max_rel_spread": replicas.copy_spread(mean),
                   "moving_variance_max_rel_spread": replicas.copy_spread(variance)}
            for name, (mean, variance) in zip(names, gathered)}
  return {
      "losses": {**losses, "evaluate_saved": losses["evaluate"]},
      "attribution": attribution,
      "per_layer": dg.per_layer_split(lambda stats, what: loss(stats, what=what)[0], names,
                                      moving, precise, start=losses["evaluate"]),
      "accuracy": {key: value[1] for key, value in results.items()},
      "replicas": {"count": n, "per_replica_batch": batch_size // n,
                   "saved_copy": "replica 0 (Keras 3 saves the copy read outside a replica)",
                   "tf_keras_saved": "the mean of the copies (ON_READ, MEAN aggregation)",
                   "copies": copies},
      "precise_statistics": precise,
  }


def mean_of_copies(gathered: list) -> list:
  """Per BN layer the mean over the replicas of their copies of the moving statistics
  (``gathered``: :func:`bnraw.core.replicas.moving_copies`), as tf_keras 2's ON_READ/MEAN
  variables read outside a replica (what its saved model holds)."""
  return [ops.Moments(tf.constant(mean.sum(axis=0) / np.float32(len(mean))),
                      tf.constant(variance.sum(axis=0) / np.float32(len(variance))))
          for mean, variance in gathered]


__all__ = ["diagnose", "mean_of_copies", "run"]
