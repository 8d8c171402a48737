"""PreciseBN: population statistics of every BN layer, recomputed at the current weights.

Layer by layer, first to last: layer k's input is produced by layers 1..k-1 already normalising
with *their* population statistics, and layer k's statistics are aggregated over the whole
dataset in batches (each batch b with n_b values per channel)::

    mean     = sum_b n_b * mean_b / sum_b n_b
    variance = sum_b n_b * (variance_b + (mean_b - mean)^2) / sum_b n_b

(mean of variances plus variance of means: the exact biased population variance). The weights
and the moving statistics are not touched. Works for a raw :class:`bnraw.core.graph.Model` and
for a Keras model whose BatchNormalization layers sit at its top level.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import tensorflow as tf

from bnraw.core import ops
from bnraw.core.layers import BATCH
from bnraw.core.batching import batches
from bnraw.models.keras_bridge import keras_bn_layers, set_keras_moving_statistics


def aggregate(parts: Sequence[tuple[np.ndarray, np.ndarray, float]]) -> ops.Moments:
  """Population moments from per-batch ``(mean, variance, n)`` (float64 accumulation)."""
  means = np.stack([np.asarray(m, np.float64) for m, _, _ in parts])
  variances = np.stack([np.asarray(v, np.float64) for _, v, _ in parts])
  weights = np.asarray([n for _, _, n in parts], np.float64)[:, None]
  total = weights.sum()
  mean = (weights * means).sum(0) / total
  variance = (weights * (variances + (means - mean) ** 2)).sum(0) / total
  return ops.Moments(tf.constant(mean, tf.float32), tf.constant(variance, tf.float32))


def population_forward_fn(model):
  """``(x, statistics) -> Forward`` compiled for ``model`` (inference branch, overrides)."""
  return tf.function(lambda x, stats: model(x, training=False, statistics=stats),
                     autograph=False)


def raw_population_statistics(model, images: np.ndarray, batch_size: int,
                              forward=None) -> list[ops.Moments]:
  """PreciseBN statistics of every BN layer of a raw model at its current weights
  (``forward``: a :func:`population_forward_fn` to reuse). A frozen layer keeps its moving
  statistics: they are what fit used."""
  chunks = batches(np.arange(len(images)), batch_size)
  forward = forward or population_forward_fn(model)
  if len(chunks) == 1:  # one batch = the dataset: the training branch computes exactly this
    return list(forward(tf.constant(images), BATCH).statistics)
  names = [layer.name for layer in model.batch_norms]
  found: list[ops.Moments] = []
  for k, name in enumerate(names):
    layer = model.batch_norms[k]
    if not layer.trainable:  # frozen: fit normalised with its moving statistics, PreciseBN too
      found.append(layer.moving)
      continue
    parts = []
    chosen = {**dict(zip(names, found)), **{later: BATCH for later in names[k:]}}
    for chunk in chunks:
      out = forward(tf.constant(images[chunk]), chosen)
      parts.append((out.statistics[k].mean.numpy(), out.statistics[k].variance.numpy(),
                    float(out.counts[k])))
    found.append(aggregate(parts))
  return found


# -- Keras models ---------------------------------------------------------------------------------


@contextlib.contextmanager
def keras_statistics(layers: Sequence, statistics: dict):
  """Temporarily sets the moving statistics of the layers named in ``statistics``; restores
  every layer's on exit."""
  saved = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in layers]
  try:
    for layer in layers:
      if layer.name in statistics:
        set_keras_moving_statistics(layer, statistics[layer.name])
    yield
  finally:
    for layer, stats in zip(layers, saved):
      set_keras_moving_statistics(layer, stats)


def keras_population_statistics(model, x: np.ndarray, batch_size: int) -> list[ops.Moments]:
  """PreciseBN statistics of every BN layer of a Keras model at its current weights.

  For layer k, a sub-model maps the inputs to that layer's input; it runs in inference mode with
  layers 1..k-1 already holding their population statistics. The model's own moving statistics
  are restored afterwards. A frozen layer (``trainable=False``: Keras 3 runs its inference branch
  inside ``fit``) keeps its moving statistics: they are what fit used, so PreciseBN, the
  per-layer split and the fix leave it alone.
  """
  import keras
  layers = keras_bn_layers(model)
  found: list[ops.Moments] = []
  chunks = batches(np.arange(len(x)), batch_size)
  for k, layer in enumerate(layers):
    if not layer.trainable:
      found.append(ops.Moments(tf.constant(layer.moving_mean.numpy()),
                               tf.constant(layer.moving_variance.numpy())))
      continue
    probe = keras.Model(model.inputs, layer.input)
    probe_input = tf.function(lambda xb, probe=probe: probe(xb, training=False),
                              autograph=False)
    axis = layer.axis if layer.axis >= 0 else len(layer.input.shape) + layer.axis
    parts = []
    with keras_statistics(layers, {l.name: stats for l, stats in zip(layers, found)}):
      for chunk in chunks:
        h = probe_input(tf.constant(x[chunk]))
        reduce = [i for i in range(len(h.shape)) if i != axis]
        mean, variance = tf.nn.moments(h, reduce)
        n = float(np.prod([h.shape[i] for i in reduce]))
        parts.append((mean.numpy(), variance.numpy(), n))
    found.append(aggregate(parts))
  return found
