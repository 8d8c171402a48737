"""PreciseBN: population statistics of every BN layer, recomputed at the current weights.

Layer by layer, first to last: layer k's input is produced by layers 1..k-1 already normalising
with *their* population statistics, and layer k's statistics are aggregated over the whole
dataset in batches (each batch b with n_b values per channel)::

    mean     = sum_b n_b * mean_b / sum_b n_b
    variance = sum_b n_b * (variance_b + (mean_b - mean)^2) / sum_b n_b

(mean of variances plus variance of means: the exact biased population variance). The weights
and the moving statistics are not touched. Works for :class:`bnraw.model.SeedNet` and for any
Keras model with BatchNormalization layers anywhere in its graph.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import tensorflow as tf

from bnraw import ops
from bnraw.loop import batches


def aggregate(parts: Sequence[tuple[np.ndarray, np.ndarray, float]]) -> ops.Moments:
  """Population moments from per-batch ``(mean, variance, n)`` (float64 accumulation)."""
  means = np.stack([np.asarray(m, np.float64) for m, _, _ in parts])
  variances = np.stack([np.asarray(v, np.float64) for _, v, _ in parts])
  weights = np.asarray([n for _, _, n in parts], np.float64)[:, None]
  total = weights.sum()
  mean = (weights * means).sum(0) / total
  variance = (weights * (variances + (means - mean) ** 2)).sum(0) / total
  return ops.Moments(tf.constant(mean, tf.float32), tf.constant(variance, tf.float32))


def raw_population_statistics(model, images: np.ndarray, batch_size: int) -> list[ops.Moments]:
  """PreciseBN statistics of every BN layer of a :class:`SeedNet` at its current weights."""
  chunks = batches(np.arange(len(images)), batch_size)
  forward = tf.function(lambda x, stats: model.forward(x, stats))
  if len(chunks) == 1:  # one batch = the dataset: the training branch computes exactly this
    return list(forward(tf.constant(images), [None] * len(model.bns)).statistics)
  found: list[ops.Moments] = []
  for k in range(len(model.bns)):
    parts = []
    for chunk in chunks:
      out = forward(tf.constant(images[chunk]), found + [None] * (len(model.bns) - k))
      parts.append((out.statistics[k].mean.numpy(), out.statistics[k].variance.numpy(),
                    float(out.counts[k])))
    found.append(aggregate(parts))
  return found


# -- Keras models ---------------------------------------------------------------------------------


def keras_bn_layers(model) -> list:
  """Every BatchNormalization layer in ``model`` (nested models included), in graph order."""
  found = []
  for layer in model.layers:
    if hasattr(layer, "layers"):
      found += keras_bn_layers(layer)
    elif type(layer).__name__ in ("BatchNormalization", "SyncBatchNormalization"):
      found.append(layer)
  return found


@contextlib.contextmanager
def keras_statistics(layers: Sequence, statistics: Sequence):
  """Temporarily sets each layer's moving mean/variance; restores them on exit."""
  saved = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in layers]
  try:
    for layer, stats in zip(layers, statistics):
      if stats is not None:
        layer.moving_mean.assign(np.asarray(stats[0], np.float32))
        layer.moving_variance.assign(np.asarray(stats[1], np.float32))
    yield
  finally:
    for layer, (mean, variance) in zip(layers, saved):
      layer.moving_mean.assign(mean)
      layer.moving_variance.assign(variance)


def keras_population_statistics(model, x: np.ndarray, batch_size: int) -> list[ops.Moments]:
  """PreciseBN statistics of every BN layer of a Keras model at its current weights.

  For layer k, a sub-model maps the inputs to that layer's input; it runs in inference mode with
  layers 1..k-1 already holding their population statistics. The model's own moving statistics
  are restored afterwards.
  """
  import keras
  layers = keras_bn_layers(model)
  found: list[ops.Moments] = []
  chunks = batches(np.arange(len(x)), batch_size)
  for k, layer in enumerate(layers):
    probe = keras.Model(model.inputs, layer.input)
    run = tf.function(lambda xb, probe=probe: probe(xb, training=False))
    axis = layer.axis if layer.axis >= 0 else len(layer.input.shape) + layer.axis
    parts = []
    with keras_statistics(layers[:k], found):
      for chunk in chunks:
        h = run(tf.constant(x[chunk]))
        reduce = [i for i in range(len(h.shape)) if i != axis]
        mean, variance = tf.nn.moments(h, reduce)
        n = float(np.prod([h.shape[i] for i in reduce]))
        parts.append((mean.numpy(), variance.numpy(), n))
    found.append(aggregate(parts))
  return found
