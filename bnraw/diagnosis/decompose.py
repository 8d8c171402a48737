"""The decomposition of ``evaluate - fit`` into named causes (docs/design.md, section 3).

All losses are on the full training set, at the final weights W_f unless said otherwise:

=================  ============================================================  ==========
``fit``            what fit printed for the last epoch (weights as they were then)  training
``train_mode_final``  batch statistics recomputed at W_f, no state change          training
``precise_bn``     population statistics recomputed at W_f (PreciseBN)             inference
``last_batch_stats``  the last training batch's statistics (collected at W_t)      inference
``no_bessel``      final moving statistics, Bessel factor removed                  inference
``evaluate``       final moving statistics                                         inference
=================  ============================================================  ==========

The attribution telescopes, so its five parts sum exactly to ``evaluate - fit``.

With loss scaling (mixed_float16) a skipped step still updated the moving statistics (they are
assigned in the forward pass) but not the weights. ``loss_scaling`` prices those statistics-only
updates: ``evaluate`` against the loss with the moving statistics replayed without them
(``evaluate_without_skipped_updates``); the difference is part of ``stale_statistics`` +
``ema_lag``, a look inside them rather than another term of the sum.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from bnraw.core import ops
from bnraw.core.graph import switch_arguments, switched
from bnraw.core.layers import BATCH
from bnraw.core.batching import batches, mean_over_batches
from bnraw.core.loop import StepRecord
from bnraw.models.keras_bridge import first_metric, keras_bn_layers, metric_of

LOSS_KEYS = ("fit", "train_mode_final", "precise_bn", "last_batch_stats", "no_bessel", "evaluate")
ATTRIBUTION = (  # key, later loss, earlier loss
    ("weight_update", "train_mode_final", "fit"),
    ("batch_vs_population", "precise_bn", "train_mode_final"),
    ("stale_statistics", "last_batch_stats", "precise_bn"),
    ("ema_lag", "no_bessel", "last_batch_stats"),
    ("bessel", "evaluate", "no_bessel"),
)


def attribution(losses: dict) -> dict:
  """The five telescoping differences (None where a loss is unknown)."""
  out = {}
  for key, later, earlier in ATTRIBUTION:
    a, b = losses.get(later), losses.get(earlier)
    out[key] = None if a is None or b is None else a - b
  return out


class StatisticsWatcher:
  """``on_step`` callback keeping what the decomposition needs from a traced run: the last
  batch's statistics; the moving variance replayed *without* the Bessel factor (the same
  float32 update, fed the biased batch variance); and, with loss scaling, the skipped steps
  and the moving statistics replayed without their updates (the training writer's update,
  Bessel factor included, on applied steps only).

  ``example``: one input example, to count each layer's values per channel for the Bessel
  factor's n (needed only once a step was skipped in a model with a Bessel layer)."""

  def __init__(self, model, example: Optional[np.ndarray] = None):
    self.model, self.example = model, example
    self.momentum = [layer.momentum for layer in model.batch_norms]
    self.no_bessel_variance = [layer.moving_variance.numpy() for layer in model.batch_norms]
    self.last: Optional[list[ops.Moments]] = None
    self.steps = 0
    self.skipped_steps = 0
    self.skipped_at: list[int] = []  # the skipped steps' numbers (0-based)
    self.without_skipped = [layer.moving for layer in model.batch_norms]
    self._bessel_counts: Optional[list] = None

  def __call__(self, record: StepRecord) -> None:
    trace = record.trace
    self.last = [ops.Moments(m, v) for m, v in zip(trace["batch_mean"], trace["batch_variance"])]
    self.no_bessel_variance = [  # a frozen layer's moving statistics never move
        ops.moving_average(tf.constant(moving), tf.constant(batch), m).numpy()
        if layer.trainable else moving
        for moving, batch, m, layer in zip(self.no_bessel_variance, trace["batch_variance"],
                                           self.momentum, self.model.batch_norms)]
    if record.skipped is None:
      return
    self.steps += 1
    if record.skipped:
      self.skipped_steps += 1
      self.skipped_at.append(record.step)
    elif not self.skipped_steps:  # nothing skipped yet: the replay is the real thing
      self.without_skipped = [ops.Moments(tf.constant(m), tf.constant(v)) for m, v in
                              zip(trace["moving_mean_after"], trace["moving_variance_after"])]
    else:
      self.without_skipped = [self._update(k, moving, batch, len(record.batch))
                              for k, (moving, batch) in enumerate(zip(self.without_skipped,
                                                                      self.last))]

  def bessel_counts(self) -> list:
    """Per BN layer, its values per channel for one example (Bessel layers; None for others)."""
    if self._bessel_counts is None:
      layers = self.model.batch_norms
      if not any(layer.bessel for layer in layers):
        self._bessel_counts = [None] * len(layers)
      else:
        if self.example is None:
          raise ValueError("StatisticsWatcher needs an example to replay Bessel layers")
        counts = self.model(tf.constant(self.example[:1]), training=False,
                            statistics=BATCH).counts
        self._bessel_counts = [float(c) if layer.bessel else None
                               for c, layer in zip(counts, layers)]
    return self._bessel_counts

  def _update(self, k: int, moving: ops.Moments, batch: ops.Moments, rows: int) -> ops.Moments:
    if not self.model.batch_norms[k].trainable:  # frozen: no update to replay
      return moving
    variance = tf.constant(batch.variance)
    if self.bessel_counts()[k] is not None:
      variance = ops.bessel_variance(variance, tf.constant(rows * self.bessel_counts()[k]))
    m = self.momentum[k]
    return ops.Moments(ops.moving_average(moving.mean, tf.constant(batch.mean), m),
                       ops.moving_average(moving.variance, variance, m))


def batch_chunks(n: int, batch_size: int, order: Optional[np.ndarray]) -> list[np.ndarray]:
  """The batches of ``order`` (default 0..n-1), each sorted by example index: a batch's
  statistics depend only on which examples it holds, and sorting makes the float reductions run
  in the same order as PreciseBN's, so a batch that is the whole dataset gives identical numbers."""
  order = np.arange(n) if order is None else order
  return [np.sort(chunk) for chunk in batches(order, batch_size)]


def forward_loss_fn(model):
  """``(x, y, given, use_batch) -> (loss, correct)`` compiled for ``model``: the inference
  branch with :func:`bnraw.core.graph.switch_arguments`'s statistics, so one trace serves every
  choice of statistics (reusable across runs that re-initialise the model)."""
  @tf.function(autograph=False)
  def forward_loss(x, y, given, use_batch):
    logits = model(x, training=False, statistics=switched(model, given, use_batch)).logits
    return model.loss(logits, y), model.correct(logits, y)
  return forward_loss


def raw_loss(model, images, labels, statistics, batch_size: int,
             order: Optional[np.ndarray] = None, forward_loss=None,
             what: str = "loss") -> tuple[float, float]:
  """Loss and accuracy over the dataset, BN layers normalising with ``statistics`` (a
  ``bnraw.core.graph.StatisticsChoice``: BATCH, or per layer name), batches taken in ``order``;
  Keras's epoch averaging."""
  forward_loss = forward_loss or forward_loss_fn(model)
  given, use_batch = switch_arguments(model, statistics)
  return mean_over_batches(
      lambda xb, yb: forward_loss(tf.constant(xb), tf.constant(yb), given, use_batch),
      batch_chunks(len(images), batch_size, order), (images, labels), what=what)


def per_layer_split(loss_with: callable, names: Sequence[str], moving: Sequence,
                    precise: Sequence, start: Optional[float] = None) -> list[dict]:
  """Swap moving -> precise statistics one layer at a time, first to last (cumulative);
  ``contribution[k] = L(k-1 swapped) - L(k swapped)`` where ``loss_with({name: statistics},
  what)`` is the loss with those statistics (``what`` names the pass); the parts sum to
  ``evaluate - precise_bn``. ``start``: the loss with every layer's moving statistics, where
  it is known already (``evaluate``: one pass over the data fewer)."""
  out, previous = [], (start if start is not None else
                       loss_with(dict(zip(names, moving)), "split: moving statistics"))
  for k, name in enumerate(names):
    current = loss_with(dict(zip(names, list(precise[:k + 1]) + list(moving[k + 1:]))),
                        f"split: layer {k + 1}/{len(names)} ({name})")
    out.append({"layer": name, "contribution": previous - current})
    previous = current
  return out


def diagnose_raw(model, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                 fit_loss: float, fit_accuracy: float, last_order: np.ndarray,
                 watcher: StatisticsWatcher, forward_loss=None, population_forward=None,
                 precise_bn_batches: Optional[int] = None) -> dict:
  """The full decomposition for a trained raw model (state left untouched); ``forward_loss``
  and ``population_forward``: compiled functions to reuse (:func:`forward_loss_fn`,
  ``precise_bn.population_forward_fn``); ``precise_bn_batches``: PreciseBN's statistics from
  the data's first that many batches (None: all)."""
  from bnraw.diagnosis.precise_bn import raw_population_statistics
  forward_loss = forward_loss or forward_loss_fn(model)
  names = [layer.name for layer in model.batch_norms]
  loss = lambda stats, order=None, what="loss": raw_loss(model, images, labels, stats,
                                                         batch_size, order, forward_loss, what)
  per_layer = lambda stats: dict(zip(names, stats))
  moving = [layer.moving for layer in model.batch_norms]
  precise = raw_population_statistics(model, images, batch_size, population_forward,
                                      precise_bn_batches)
  no_bessel = [ops.Moments(m.mean, tf.constant(v)) for m, v in
               zip(moving, watcher.no_bessel_variance)]
  results = {
      "fit": (fit_loss, fit_accuracy),
      "train_mode_final": loss(BATCH, last_order, "train_mode_final"),
      "precise_bn": loss(per_layer(precise), what="precise_bn"),
      "last_batch_stats": loss(per_layer(watcher.last), what="last_batch_stats"),
      "no_bessel": loss(per_layer(no_bessel), what="no_bessel"),
      "evaluate": loss(per_layer(moving), what="evaluate"),
  }
  losses = {key: results[key][0] for key in LOSS_KEYS}
  out = {
      "losses": losses,
      "attribution": attribution(losses),
      "per_layer": per_layer_split(lambda stats, what: loss(stats, what=what)[0], names,
                                   moving, precise, start=losses["evaluate"]),
      "accuracy": {key: results[key][1] for key in LOSS_KEYS},
      "precise_statistics": precise,
  }
  if watcher.steps:  # loss scaling
    without = (loss(per_layer(watcher.without_skipped)) if watcher.skipped_steps
               else results["evaluate"])
    out["loss_scaling"] = {
        "steps": watcher.steps, "skipped_steps": watcher.skipped_steps,
        "skipped_at": list(watcher.skipped_at),
        "evaluate_without_skipped_updates": without[0],
        "skipped_updates_cost": losses["evaluate"] - without[0]}
  return out


# -- Keras models ---------------------------------------------------------------------------------


def keras_forward_loss_fn(model, *, training: bool):
  """``(x, y) -> (loss, y_pred)`` compiled for a Keras model (the compiled loss as fit and
  evaluate compute it): the BN statistics are the model's variables, read when it runs, so one
  trace serves every swap of statistics."""
  @tf.function(autograph=False)
  def forward_loss(xb, yb):
    y_pred = model(xb, training=training)
    return model.compute_loss(x=xb, y=yb, y_pred=y_pred, training=False), y_pred
  return forward_loss


def keras_loss(model, x, y, batch_size: int, *, training: bool,
               order: Optional[np.ndarray] = None, forward_loss=None,
               what: str = "loss") -> tuple[float, Optional[float]]:
  """Loss (the model's compiled loss, as fit/evaluate compute it, averaged over batches by
  size) and its first compiled metric (:func:`metric_of`; None without one), accumulated over
  every batch as evaluate accumulates it (so AUC or precision are whole-data values too).
  ``training=True`` runs the training branch and then restores every BN layer's moving
  statistics, so no state changes. ``forward_loss``: a :func:`keras_forward_loss_fn` of the
  same ``training`` to reuse."""
  from bnraw.diagnosis.precise_bn import keras_statistics
  forward_loss = forward_loss or keras_forward_loss_fn(model, training=training)
  found = []

  def one_batch(xb, yb):
    yb = tf.constant(yb)
    loss, y_pred = forward_loss(tf.constant(xb), yb)
    if not found:
      found.append(first_metric(model, yb, y_pred))  # a fresh metric: its state starts empty
    if found[0] is not None:
      found[0].update_state(yb, y_pred)
    return loss, 0.0

  restore = (keras_statistics(keras_bn_layers(model), {}) if training  # its updates undone
             else contextlib.nullcontext())
  with restore:
    loss, _ = mean_over_batches(one_batch, batch_chunks(len(x), batch_size, order), (x, y),
                                what=what)
  return loss, (float(found[0].result()) if found and found[0] is not None else None)


def diagnose_keras(model, x, y: np.ndarray, *, batch_size: int,
                   fit_loss: Optional[float] = None, fit_accuracy: Optional[float] = None,
                   last_order: Optional[np.ndarray] = None,
                   last_batch_statistics: Optional[Sequence] = None,
                   bessel_applied: bool = False,
                   precise_bn_batches: Optional[int] = None) -> dict:
  """The decomposition for a Keras model on ``x`` (an array, or data read batch by batch:
  ``bnraw.models.data``); keys that need a training history are None unless
  given (``fit_*``, ``last_batch_statistics``). Keras 3 applies no Bessel factor, so
  ``no_bessel`` is ``evaluate`` unless ``bessel_applied``. ``precise_bn_batches``: PreciseBN's
  statistics from the data's first that many batches (None: all)."""
  from bnraw.diagnosis.precise_bn import (keras_population_statistics,
                                          keras_statistics)
  layers = keras_bn_layers(model)
  names = [layer.name for layer in layers]
  precise = keras_population_statistics(model, x, batch_size, precise_bn_batches)
  inference = keras_forward_loss_fn(model, training=False)  # one trace for every swap

  def inference_with(statistics, what):
    with keras_statistics(layers, statistics):
      return keras_loss(model, x, y, batch_size, training=False, forward_loss=inference,
                        what=what)

  evaluate = inference_with({}, "evaluate")
  results = {
      "fit": (fit_loss, fit_accuracy),
      "train_mode_final": keras_loss(model, x, y, batch_size, training=True, order=last_order,
                                     what="train_mode_final"),
      "precise_bn": inference_with(dict(zip(names, precise)), "precise_bn"),
      "last_batch_stats": (inference_with(dict(zip(names, last_batch_statistics)),
                                          "last_batch_stats")
                           if last_batch_statistics else (None, None)),
      "no_bessel": (None, None) if bessel_applied else evaluate,
      "evaluate": evaluate,
  }
  losses = {key: results[key][0] for key in LOSS_KEYS}
  moving = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in layers]
  out = {
      "losses": losses,
      "attribution": attribution(losses),
      "per_layer": per_layer_split(lambda stats, what: inference_with(stats, what)[0], names,
                                   moving, precise, start=losses["evaluate"]),
      "accuracy": {key: results[key][1] for key in LOSS_KEYS},
      "precise_statistics": precise,
  }
  out["moving_statistics_total"] = losses["evaluate"] - losses["precise_bn"]
  sample = slice(0, min(batch_size, len(x)))
  out["metric"] = metric_of(model, tf.constant(y[sample]), model(x[sample], training=False))
  return out
