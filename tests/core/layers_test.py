"""The raw layers against Keras's, branch by branch; BN's state changes in closed form."""

import inspect

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from bnraw.core import ops
from bnraw.core.catalog import Conv2D, Dense, Flatten, ReLU
from bnraw.core.layers import BATCH, BatchNorm, Switch
from bnraw.models.seed import glorot_uniform


def bn_weights(rng, channels=3):
  weights = [rng.standard_normal(channels).astype(np.float32) for _ in range(3)]
  weights.append((np.abs(rng.standard_normal(channels)) + 0.5).astype(np.float32))
  return weights  # gamma, beta, moving_mean, moving_variance


def raw_bn(weights, **kwargs):
  raw = BatchNorm("bn", len(weights[0]), epsilon=1e-5, **kwargs)
  for var, value in zip(raw.variables, weights):
    var.assign(value)
  return raw


class BatchNormAgainstKerasTest(tf.test.TestCase, parameterized.TestCase):
  """keras.layers.BatchNormalization and the raw layer, same weights: bit for bit."""

  @parameterized.product(training=[True, False], momentum=[0.9, 0.0], trainable=[True, False],
                         shape=[(8, 5, 5, 3), (8, 3)])
  def test_matches_keras(self, training, momentum, trainable, shape):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    weights = bn_weights(rng)
    keras_bn = keras.layers.BatchNormalization(momentum=momentum, epsilon=1e-5)
    keras_bn.build(shape)
    keras_bn.set_weights(weights)
    keras_bn.trainable = trainable  # Keras 3: a frozen BN runs its inference branch in fit
    raw = raw_bn(weights, momentum=momentum, trainable=trainable)
    expected = keras_bn(x, training=training).numpy()
    out = raw(tf.constant(x), training=training)
    self.assertAllEqual(out.y, expected)
    self.assertAllEqual(raw.moving_mean, keras_bn.moving_mean.numpy())
    self.assertAllEqual(raw.moving_variance, keras_bn.moving_variance.numpy())
    if not (training and trainable):  # the inference branch changes nothing
      self.assertAllEqual(raw.moving_mean, weights[2])
      self.assertAllEqual(raw.moving_variance, weights[3])
      self.assertAllEqual(out.statistics.mean, weights[2])
    self.assertEqual(len(raw.trainable_variables), 2 if trainable else 0)

  def test_moving_update_closed_form_and_bessel(self):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 2, 2, 3)).astype(np.float64)
    mean, variance = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    n = 4 * 2 * 2
    for bessel, fed in ((False, variance), (True, variance * n / (n - 1))):
      raw = BatchNorm("bn", 3, momentum=0.75, epsilon=1e-3, bessel=bessel)
      raw(tf.constant(x, tf.float32), training=True)
      self.assertAllClose(raw.moving_mean, 0.25 * mean, rtol=1e-5, atol=1e-6)
      self.assertAllClose(raw.moving_variance, 0.75 + 0.25 * fed, rtol=1e-5)

  def test_batch_override_normalises_like_training_and_writes_nothing(self):
    rng = np.random.default_rng(3)
    x = tf.constant(rng.standard_normal((6, 4)).astype(np.float32))
    weights = bn_weights(rng, 4)
    trained, probe = raw_bn(weights, momentum=0.9), raw_bn(weights, momentum=0.9)
    expected = trained(x, training=True).y
    for training in (True, False):
      self.assertAllEqual(probe(x, training=training, statistics=BATCH).y, expected)
    given = ops.Moments(tf.constant(weights[2] + 1), tf.constant(weights[3] * 2))
    y = probe(x, training=True, statistics=given).y
    self.assertAllClose(y, weights[0] * (x - given.mean) / np.sqrt(given.variance + 1e-5)
                        + weights[1], rtol=1e-5, atol=1e-5)
    self.assertAllEqual(probe.moving_mean, weights[2])
    self.assertAllEqual(probe.moving_variance, weights[3])
    with self.assertRaisesRegex(ValueError, "BATCH"):
      probe(x, training=False, statistics="moving")

  def test_switch_is_batch_or_given_chosen_at_run_time(self):
    rng = np.random.default_rng(4)
    x = tf.constant(rng.standard_normal((5, 3, 4)).astype(np.float32))
    weights = bn_weights(rng, 4)
    given = ops.Moments(tf.constant(weights[2] - 1), tf.constant(weights[3] * 3))
    for trainable in (True, False):  # frozen: BATCH is its moving statistics
      layer = raw_bn(weights, momentum=0.9, trainable=trainable)
      switched = tf.function(
          lambda x, use, m, layer=layer: layer(x, training=False, statistics=Switch(use, m)),
          autograph=False)
      direct = tf.function(lambda x, s, layer=layer: layer(x, training=False, statistics=s),
                           autograph=False)
      for use, want in ((True, direct(x, BATCH)), (False, direct(x, given)),
                        (True, direct(x, BATCH))):
        got = switched(x, tf.constant(use), given)
        self.assertAllEqual(got.y, want.y)  # bit for bit, either way
        self.assertAllEqual(got.statistics.mean, want.statistics.mean)
        self.assertAllEqual(got.statistics.variance, want.statistics.variance)
      self.assertEqual(switched.experimental_get_tracing_count(), 1)
      self.assertAllEqual(layer.moving_mean, weights[2])  # nothing written
      self.assertAllEqual(layer.moving_variance, weights[3])

  def test_named_setter(self):
    raw = BatchNorm("bn_1", 2, momentum=0.9, epsilon=1e-3)
    raw.set_moving_statistics(ops.Moments(np.array([1.0, 2.0]), np.array([3.0, 4.0])))
    self.assertAllEqual(raw.moving_mean, [1.0, 2.0])
    self.assertAllEqual(raw.moving_variance, [3.0, 4.0])
    with self.assertRaisesRegex(ValueError, "bn_1"):
      raw.set_moving_statistics(ops.Moments(np.zeros(3), np.ones(3)))

  def test_hook_sees_state_before_the_update(self):
    raw = BatchNorm("bn", 2, momentum=0.5, epsilon=1e-3)
    seen = []
    hook = lambda layer, moving, batch: seen.append((layer.moving_mean.numpy().copy(),
                                                     moving.mean.numpy(), batch.mean.numpy()))
    raw(tf.constant([[1.0, 2.0], [3.0, 6.0]]), training=True, hook=hook)
    (variable, moving, batch), = seen
    self.assertAllEqual(variable, [0.0, 0.0])
    self.assertAllEqual(moving, [0.0, 0.0])
    self.assertAllEqual(batch, [2.0, 4.0])
    self.assertAllEqual(raw.moving_mean, [1.0, 2.0])


class LinearLayersAgainstKerasTest(tf.test.TestCase):

  def test_conv_dense_relu_flatten(self):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    conv = Conv2D("conv_1", glorot_uniform([3, 3, 3, 5], (0, 1)), np.zeros(5, np.float32))
    keras_conv = keras.layers.Conv2D(5, 3)
    keras_conv.build(x.shape)
    keras_conv.set_weights([conv.kernel.numpy(), rng.standard_normal(5).astype(np.float32)])
    conv.bias.assign(keras_conv.bias)
    h = conv(x, training=True)
    self.assertAllEqual(h, keras_conv(x))
    self.assertAllEqual(ReLU("r")(h, training=True), keras.layers.ReLU()(h))
    flat = Flatten("f")(h, training=False)
    self.assertAllEqual(flat, keras.layers.Flatten()(h))
    dense = Dense("dense_1", glorot_uniform([flat.shape[-1], 4], (0, 2)),
                  np.zeros(4, np.float32))
    keras_dense = keras.layers.Dense(4)
    keras_dense.build(flat.shape)
    keras_dense.set_weights([v.numpy() for v in dense.variables])
    self.assertAllEqual(dense(flat, training=True), keras_dense(flat))
    self.assertEqual([v.name.split(":")[0] for v in conv.variables + dense.variables],
                     ["conv_1/kernel", "conv_1/bias", "dense_1/kernel", "dense_1/bias"])


class TrainingIsRequiredTest(tf.test.TestCase):

  def test_every_call_takes_training_keyword_only_without_default(self):
    from bnraw.core.graph import Model
    for cls in (BatchNorm, Conv2D, Dense, ReLU, Flatten, Model):
      parameter = inspect.signature(cls.__call__).parameters["training"]
      self.assertEqual(parameter.kind, inspect.Parameter.KEYWORD_ONLY, cls.__name__)
      self.assertIs(parameter.default, inspect.Parameter.empty, cls.__name__)
    with self.assertRaisesRegex(TypeError, "training"):
      BatchNorm("bn", 2, momentum=0.9, epsilon=1e-3)(tf.zeros((2, 2)))


if __name__ == "__main__":
  tf.test.main()
