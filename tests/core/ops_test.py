"""Each op against its closed form (numpy) and against the matching Keras 3 layer."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from bnraw.core import catalog, ops


def numpy_conv_valid(x, kernel, bias):
  n, h, w, _ = x.shape
  kh, kw, _, cout = kernel.shape
  out = np.zeros((n, h - kh + 1, w - kw + 1, cout), np.float64)
  for i in range(h - kh + 1):
    for j in range(w - kw + 1):
      patch = x[:, i:i + kh, j:j + kw, :].astype(np.float64)
      out[:, i, j, :] = np.tensordot(patch, kernel.astype(np.float64), axes=([1, 2, 3], [0, 1, 2]))
  return out + bias


class OpsTest(tf.test.TestCase, parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.rng = np.random.default_rng(0)

  def randn(self, *shape):
    return self.rng.standard_normal(shape).astype(np.float32)

  def test_conv2d_closed_form_and_keras(self):
    x, kernel, bias = self.randn(2, 9, 8, 3), self.randn(5, 5, 3, 4), self.randn(4)
    got = catalog.Conv2D("c", kernel, bias)(x, training=False).numpy()
    self.assertEqual(got.shape, (2, 5, 4, 4))
    self.assertAllClose(got, numpy_conv_valid(x, kernel, bias), atol=1e-4, rtol=1e-5)
    layer = keras.layers.Conv2D(4, 5, padding="valid")
    layer.build(x.shape)
    layer.set_weights([kernel, bias])
    self.assertAllEqual(got, layer(x).numpy())

  def test_dense_closed_form_and_keras(self):
    x, kernel, bias = self.randn(5, 7), self.randn(7, 3), self.randn(3)
    got = catalog.Dense("d", kernel, bias)(x, training=False).numpy()
    self.assertAllClose(got, x.astype(np.float64) @ kernel + bias, atol=1e-5)
    layer = keras.layers.Dense(3)
    layer.build(x.shape)
    layer.set_weights([kernel, bias])
    self.assertAllEqual(got, layer(x).numpy())

  def test_conv_as_one_matmul_is_the_same_sum(self):
    x, kernel, bias = self.randn(3, 4, 4, 5), self.randn(4, 4, 5, 6), self.randn(6)
    want = numpy_conv_valid(x, kernel, bias)
    got = catalog.Conv2D("c", kernel, bias, as_matmul=True)(x, training=False).numpy()
    self.assertEqual(got.shape, (3, 1, 1, 6))
    self.assertAllClose(got, want, atol=1e-4, rtol=1e-5)

  def test_add_takes_bias_add_for_a_bias_shaped_operand_as_keras_does(self):
    x = tf.constant(self.randn(2, 3, 4))
    for shape, op in (((4,), "BiasAdd"), ((1, 1, 4), "BiasAdd"), ((3, 1), "BiasAdd"),
                      ((1,), "AddV2"), ((2, 3, 4), "AddV2")):
      operand = tf.constant(self.randn(*shape))
      graph = tf.function(ops.add).get_concrete_function(x, operand).graph
      self.assertIn(op, {o.type for o in graph.get_operations()}, shape)
      self.assertAllClose(ops.add(x, operand), x.numpy() + operand.numpy(), atol=1e-6)

  @parameterized.parameters(((6, 4, 4, 3),), ((10, 5),))
  def test_moments_are_biased_over_all_but_last_axis(self, shape):
    x = self.randn(*shape) * 3 + 1
    mean, variance = ops.moments(tf.constant(x))
    flat = x.reshape(-1, shape[-1]).astype(np.float64)
    self.assertAllClose(mean, flat.mean(0), atol=1e-5)
    self.assertAllClose(variance, flat.var(0, ddof=0), rtol=1e-5)
    self.assertEqual(float(ops.elements_per_channel(tf.constant(x))), flat.shape[0])

  def test_normalize_closed_form(self):
    x = self.randn(8, 3)
    mean, variance = self.randn(3), np.abs(self.randn(3)) + 0.1
    gamma, beta = self.randn(3), self.randn(3)
    got = ops.normalize(x, ops.Moments(mean, variance), gamma, beta, 1e-3)
    expected = gamma * (x - mean) / np.sqrt(variance + 1e-3) + beta
    self.assertAllClose(got, expected, atol=1e-5)

  @parameterized.parameters(0.9, 0.0, 0.99)
  def test_moving_average_one_and_two_updates(self, m):
    b1, b2 = self.randn(4), self.randn(4)
    one = ops.moving_average(np.zeros(4, np.float32), b1, m)
    self.assertAllClose(one, (1 - m) * b1, atol=1e-7)
    two = ops.moving_average(one, b2, m)
    self.assertAllClose(two, m * (1 - m) * b1 + (1 - m) * b2, atol=1e-6)
    if m == 0:  # momentum 0: the moving value is exactly the last batch's
      self.assertAllEqual(two, b2)

  def test_bessel_variance(self):
    self.assertAllClose(ops.bessel_variance(np.float32(2.0), np.float32(5.0)), 2.5)

  def test_cross_entropy_closed_form_and_keras(self):
    logits, labels = self.randn(6, 5), np.array([0, 4, 2, 2, 1, 3], np.int32)
    got = float(ops.softmax_cross_entropy(logits, labels))
    shifted = logits - logits.max(1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    self.assertAllClose(got, -log_softmax[np.arange(6), labels].mean(), rtol=1e-6)
    # Keras: softmax output layer + categorical cross-entropy recovers the logits.
    probs = keras.layers.Activation("softmax")(tf.constant(logits))
    keras_loss = keras.losses.CategoricalCrossentropy()(np.eye(5, dtype=np.float32)[labels], probs)
    self.assertEqual(got, float(keras_loss))

  def test_argmax_hits(self):
    logits = np.array([[0.1, 2.0], [3.0, 0.0], [0.0, 1.0]], np.float32)
    self.assertAllEqual(ops.argmax_hits(logits, np.array([1, 1, 1], np.int32)),
                        [True, False, True])

  def test_l2_penalty(self):
    self.assertAllClose(ops.l2_penalty(np.full(3, 2.0, np.float32), 0.5), 0.5 * 12)


if __name__ == "__main__":
  tf.test.main()
