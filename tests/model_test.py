"""The seed network's variables, branches and moving-statistics updates."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from bnraw.config import ModelConfig
from bnraw.model import SeedNet

TINY = ModelConfig(width=1 / 64)


def batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return tf.constant(rng.uniform(0, 1, (n, 29, 29, 3)).astype(np.float32))


class SeedNetTest(tf.test.TestCase, parameterized.TestCase):

  def test_parameter_count_full_width(self):
    # Keras-style count (moving statistics included), from the created variables.
    self.assertEqual(SeedNet(ModelConfig(width=1.0)).count_parameters(), 116_488_320)

  def test_width_multiplier_scales_hidden_channels(self):
    net = SeedNet(ModelConfig(width=1 / 16))
    self.assertEqual([c.kernel.shape[-1] for c in net.convs], [4, 8, 16, 32, 64, 128, 256])
    self.assertEqual(net.dense_8.kernel.shape, (256, 64))
    self.assertEqual(net.dense_9.kernel.shape, (64, 256))
    tiny = SeedNet(ModelConfig(width=1 / 1000))
    self.assertEqual([c.kernel.shape[-1] for c in tiny.convs], [1, 1, 1, 1, 1, 2, 4])

  def test_keras_names_and_initial_values(self):
    net = SeedNet(TINY)
    names = [v.name.split(":")[0] for v in net.variables]
    self.assertEqual(names[:6], ["conv_1/kernel", "conv_1/bias", "bn_1/gamma", "bn_1/beta",
                                 "bn_1/moving_mean", "bn_1/moving_variance"])
    self.assertEqual(names[-2:], ["dense_9/kernel", "dense_9/bias"])
    bn = net.bns[0]
    self.assertAllEqual(bn.gamma, np.ones(1))
    self.assertAllEqual(bn.moving_variance, np.ones(1))
    self.assertAllEqual(bn.moving_mean, np.zeros(1))
    kernel = net.convs[1].kernel.numpy()  # glorot: |k| <= sqrt(6 / (fan_in + fan_out))
    limit = np.sqrt(6 / (7 * 7 * kernel.shape[2] + 7 * 7 * kernel.shape[3]))
    self.assertLessEqual(np.abs(kernel).max(), limit)
    self.assertGreater(np.abs(kernel).max(), 0.5 * limit)

  def test_same_seed_same_weights(self):
    a, b, c = SeedNet(TINY, seed=3), SeedNet(TINY, seed=3), SeedNet(TINY, seed=4)
    self.assertAllEqual(a.dense_8.kernel, b.dense_8.kernel)
    self.assertNotAllClose(a.dense_8.kernel, c.dense_8.kernel)

  def test_inference_branch_leaves_state_untouched(self):
    net = SeedNet(TINY)
    before = [v.numpy().copy() for v in net.variables]
    net(batch(), training=False)
    for value, var in zip(before, net.variables):
      self.assertAllEqual(value, var)

  @parameterized.parameters(0.9, 0.0)
  def test_training_branch_updates_moving_statistics_in_closed_form(self, momentum):
    net = SeedNet(ModelConfig(width=1 / 64, momentum=momentum))
    first = net(batch(seed=1), training=True)
    for layer, stats in zip(net.bns, first.statistics):
      self.assertAllClose(layer.moving_mean, (1 - momentum) * stats.mean.numpy(), atol=1e-7)
      self.assertAllClose(layer.moving_variance,
                          momentum * 1.0 + (1 - momentum) * stats.variance.numpy(), rtol=1e-6)
    second = net(batch(seed=2), training=True)
    for layer, s1, s2 in zip(net.bns, first.statistics, second.statistics):
      expected = momentum * (1 - momentum) * s1.mean.numpy() + (1 - momentum) * s2.mean.numpy()
      self.assertAllClose(layer.moving_mean, expected, atol=1e-6)
      if momentum == 0:
        self.assertAllEqual(layer.moving_variance, s2.variance)

  def test_momentum_zero_inference_equals_training_output(self):
    # Keras's momentum-0 test: after one training call, inference on the same batch matches.
    net = SeedNet(ModelConfig(width=1 / 64, momentum=0.0))
    x = batch()
    training_logits = net(x, training=True).logits
    self.assertAllClose(net(x, training=False).logits, training_logits, rtol=1e-4, atol=1e-4)

  def test_bessel_feeds_unbiased_variance_into_moving_variance(self):
    net = SeedNet(ModelConfig(width=1 / 64, momentum=0.0, bessel=True))
    out = net(batch(n=8), training=True)
    n_conv1 = 8 * 23 * 23
    self.assertAllClose(net.bns[0].moving_variance,
                        out.statistics[0].variance.numpy() * n_conv1 / (n_conv1 - 1), rtol=1e-6)
    self.assertAllClose(net.bns[-1].moving_variance,
                        out.statistics[-1].variance.numpy() * 8 / 7, rtol=1e-6)

  def test_forward_with_given_statistics_is_pure(self):
    net = SeedNet(TINY)
    x = batch()
    train_out = net.forward(x, [None] * 8)
    again = net.forward(x, train_out.statistics)
    self.assertAllClose(again.logits, train_out.logits, atol=1e-5)
    self.assertAllEqual(net.bns[0].moving_mean, np.zeros(1))


if __name__ == "__main__":
  tf.test.main()
