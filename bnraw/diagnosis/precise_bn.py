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
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from bnraw.core import ops
from bnraw.core.graph import switch_arguments, switched
from bnraw.core.batching import batches, read_batches
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
  """``(x, given, use_batch) -> Forward`` compiled for ``model``: BN layer j normalises with its
  batch moments where ``use_batch[j]``, else with ``given[j]`` (inference branch, no state
  change). The choice is an argument, so one trace serves every layer of PreciseBN."""
  return tf.function(
      lambda x, given, use_batch: model(x, training=False,
                                        statistics=switched(model, given, use_batch)),
      autograph=False)


def precise_chunks(examples: int, batch_size: int, most: Optional[int] = None) -> list:
  """The batches PreciseBN reads: the data's first ``most`` batches in order (None: all)."""
  chunks = batches(np.arange(examples), batch_size)
  if most is not None and most < 1:
    raise ValueError(f"PreciseBN needs at least one batch, got {most}")
  return chunks[:most] if most is not None else chunks


def precise_bn_data(examples: int, batch_size: int, most: Optional[int]) -> dict:
  """What PreciseBN read (``diagnosis.json``'s ``precise_bn_data``): its batches and examples,
  of the data's."""
  chunks = precise_chunks(examples, batch_size, most)
  return {"batches": len(chunks), "examples": int(sum(len(c) for c in chunks)),
          "of_examples": examples}


def raw_population_statistics(model, images: np.ndarray, batch_size: int,
                              forward=None, most: Optional[int] = None) -> list[ops.Moments]:
  """PreciseBN statistics of every BN layer of a raw model at its current weights, over the
  data's first ``most`` batches (None: all of it; ``forward``: a :func:`population_forward_fn`
  to reuse). A frozen layer keeps its moving statistics: they are what fit used."""
  chunks = precise_chunks(len(images), batch_size, most)
  forward = forward or population_forward_fn(model)
  layers = model.batch_norms
  found, _ = switch_arguments(model, None)  # layers not done yet: any value (the moving)
  every = lambda k: tf.constant([j >= k for j in range(len(layers))])  # layers k.. on BATCH
  if len(chunks) == 1:  # one batch is all it reads: the training branch computes exactly this
    return list(forward(tf.constant(images[chunks[0]]), found, every(0)).statistics)
  for k, layer in enumerate(layers):
    if not layer.trainable:  # frozen: fit normalised with its moving statistics, PreciseBN too
      continue
    parts = []
    for xb, _ in read_batches(images, None, chunks,
                              f"precise_bn: layer {k + 1}/{len(layers)} ({layer.name})"):
      out = forward(tf.constant(xb), found, every(k))
      parts.append((out.statistics[k].mean.numpy(), out.statistics[k].variance.numpy(),
                    float(out.counts[k])))
    found[k] = aggregate(parts)
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


def keras_population_statistics(model, x: np.ndarray, batch_size: int,
                                most: Optional[int] = None) -> list[ops.Moments]:
  """PreciseBN statistics of every BN layer of a Keras model at its current weights.

  One probe model maps the inputs to every BN layer's input and is compiled once; for layer k
  it runs in inference mode with layers 1..k-1 already holding their population statistics
  (layer k's input depends on nothing after it). The model's own moving statistics are
  restored afterwards. ``most``: over the data's first that many batches (None: all of it).
  A frozen layer (``trainable=False``: Keras 3 runs its inference branch
  inside ``fit``) keeps its moving statistics: they are what fit used, so PreciseBN, the
  per-layer split and the fix leave it alone.
  """
  import keras
  layers = keras_bn_layers(model)
  probe = keras.Model(model.inputs, [layer.input for layer in layers])
  probe_inputs = tf.function(lambda xb: tf.nest.flatten(probe(xb, training=False)),
                             autograph=False)  # (one output comes back bare: a list always)
  found: list[ops.Moments] = []
  chunks = precise_chunks(len(x), batch_size, most)
  with keras_statistics(layers, {}):  # restores every layer's moving statistics
    for k, layer in enumerate(layers):
      if not layer.trainable:
        found.append(ops.Moments(tf.constant(layer.moving_mean.numpy()),
                                 tf.constant(layer.moving_variance.numpy())))
        continue
      axis = layer.axis if layer.axis >= 0 else len(layer.input.shape) + layer.axis
      parts = []
      for xb, _ in read_batches(x, None, chunks,
                                f"precise_bn: layer {k + 1}/{len(layers)} ({layer.name})"):
        h = probe_inputs(tf.constant(xb))[k]
        reduce = [i for i in range(len(h.shape)) if i != axis]
        mean, variance = tf.nn.moments(h, reduce)
        n = float(np.prod([h.shape[i] for i in reduce]))
        parts.append((mean.numpy(), variance.numpy(), n))
      found.append(aggregate(parts))
      set_keras_moving_statistics(layer, found[-1])  # what layers after k normalise with
  return found
