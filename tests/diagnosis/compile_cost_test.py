"""The diagnosis compiles once per batch shape, not once per BN layer: PreciseBN's
layer-by-layer passes and the per-layer split pass their statistics as arguments
(:class:`bnraw.core.layers.Switch`), and give the bits of a forward compiled for each choice."""

import numpy as np
import pytest
import tensorflow as tf

from bnraw.config import TrainConfig
from bnraw.core.batching import batches
from bnraw.core.layers import BATCH
from bnraw.diagnosis import decompose, precise_bn, tool
from bnraw.models.workload import from_keras_file
from tests.models import zoo

TRAIN = TrainConfig(batch_size=zoo.BATCH_SIZE, epochs=1, mode="function")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  directory = tmp_path_factory.mktemp("zoo")
  return lambda name: zoo.save(name, str(directory))


def per_layer_reference(model, images, batch_size):
  """PreciseBN the direct way: for layer k a forward compiled for its own choice (layers before
  k: their population statistics, k and after: BATCH), a fresh trace per layer."""
  found = []
  chunks = batches(np.arange(len(images)), batch_size)
  for k, layer in enumerate(model.batch_norms):
    if not layer.trainable:
      found.append(layer.moving)
      continue
    choice = {**{l.name: s for l, s in zip(model.batch_norms, found)},
              **{l.name: BATCH for l in model.batch_norms[k:]}}
    forward = tf.function(lambda x: model(x, training=False, statistics=choice),
                          autograph=False)
    parts = [(out.statistics[k].mean.numpy(), out.statistics[k].variance.numpy(),
              float(out.counts[k]))
             for out in (forward(tf.constant(images[chunk])) for chunk in chunks)]
    found.append(precise_bn.aggregate(parts))
  return found


@pytest.mark.parametrize("name", ["frozen_bn", "hard_swish_se", "dense_blocks"])
def test_precise_bn_traces_once_per_shape_with_the_per_layer_forwards_bits(saved, name):
  workload = from_keras_file(*saved(name), TRAIN)
  model, images = workload.model, workload.images
  forward = precise_bn.population_forward_fn(model)
  got = precise_bn.raw_population_statistics(model, images, zoo.BATCH_SIZE, forward)
  want = per_layer_reference(model, images, zoo.BATCH_SIZE)
  assert len(got) == len(model.batch_norms) >= 2
  for layer, a, b in zip(model.batch_norms, got, want):
    np.testing.assert_array_equal(a.mean, b.mean, err_msg=layer.name)
    np.testing.assert_array_equal(a.variance, b.variance, err_msg=layer.name)
  assert forward.experimental_get_tracing_count() == 2  # batches of 16 and the last of 8


def test_the_whole_diagnosis_traces_each_forward_once_per_shape(saved):
  """Training, the six losses, PreciseBN and the per-layer split of a model with 13 BN
  layers."""
  workload = from_keras_file(*saved("dense_blocks"), TRAIN)
  assert len(workload.batch_norms) == 13
  compiled = tool.compile_raw(workload.model, workload.optimizer, workload.images, "function",
                              zoo.BATCH_SIZE)
  result, _ = tool.diagnose_raw_training(workload.model, workload.optimizer, workload.images,
                                         workload.labels, TRAIN, "function", compiled=compiled)
  assert len(result["per_layer"]) == len(workload.batch_norms)
  assert compiled.forward_loss.experimental_get_tracing_count() == 2
  assert compiled.population_forward.experimental_get_tracing_count() == 2
  # the losses through the shared forward are those of a forward compiled for each choice
  model, images, labels = workload.model, workload.images, workload.labels
  moving = {layer.name: layer.moving for layer in model.batch_norms}
  for statistics, key in ((moving, "evaluate"), (BATCH, None)):
    direct = tf.function(lambda x, y, s=statistics: _loss(model, x, y, s), autograph=False)
    want = decompose.mean_over_batches(
        lambda xb, yb: direct(tf.constant(xb), tf.constant(yb)),
        decompose.batch_chunks(len(images), zoo.BATCH_SIZE, None), (images, labels))
    got = decompose.raw_loss(model, images, labels, statistics, zoo.BATCH_SIZE,
                             forward_loss=compiled.forward_loss)
    assert got == want
    if key:
      assert result["losses"][key] == want[0]
  assert compiled.forward_loss.experimental_get_tracing_count() == 2


def _loss(model, x, y, statistics):
  logits = model(x, training=False, statistics=statistics).logits
  return model.loss(logits, y), model.correct(logits, y)
