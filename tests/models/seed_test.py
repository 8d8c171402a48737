"""The seed network's variables, branches and moving-statistics updates."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from bnraw.config import ModelConfig
from bnraw.core.layers import BATCH
from bnraw.models.seed import seed_network

TINY = ModelConfig(width=1 / 64)


def batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return tf.constant(rng.uniform(0, 1, (n, 29, 29, 3)).astype(np.float32))


class SeedNetTest(tf.test.TestCase, parameterized.TestCase):

  def test_parameter_count_full_width(self):
    # Keras-style count (moving statistics included), from the created variables.
    self.assertEqual(seed_network(ModelConfig(width=1.0)).count_parameters(), 116_488_320)

  def test_width_multiplier_scales_hidden_channels(self):
    convs = lambda net: [net.layer(f"conv_{i}").kernel.shape[-1] for i in range(1, 8)]
    net = seed_network(ModelConfig(width=1 / 16))
    self.assertEqual(convs(net), [4, 8, 16, 32, 64, 128, 256])
    self.assertEqual(net.layer("dense_8").kernel.shape, (256, 64))
    self.assertEqual(net.layer("dense_9").kernel.shape, (64, 256))
    self.assertEqual(convs(seed_network(ModelConfig(width=1 / 1000))), [1, 1, 1, 1, 1, 2, 4])

  def test_keras_names_and_initial_values(self):
    net = seed_network(TINY)
    names = [v.name.split(":")[0] for v in net.variables]
    self.assertEqual(names[:6], ["conv_1/kernel", "conv_1/bias", "bn_1/gamma", "bn_1/beta",
                                 "bn_1/moving_mean", "bn_1/moving_variance"])
    self.assertEqual(names[-2:], ["dense_9/kernel", "dense_9/bias"])
    bn = net.batch_norms[0]
    self.assertAllEqual(bn.gamma, np.ones(1))
    self.assertAllEqual(bn.moving_variance, np.ones(1))
    self.assertAllEqual(bn.moving_mean, np.zeros(1))
    kernel = net.layer("conv_2").kernel.numpy()  # glorot: |k| <= sqrt(6 / (fan_in + fan_out))
    limit = np.sqrt(6 / (7 * 7 * kernel.shape[2] + 7 * 7 * kernel.shape[3]))
    self.assertLessEqual(np.abs(kernel).max(), limit)
    self.assertGreater(np.abs(kernel).max(), 0.5 * limit)

  def test_same_seed_same_weights(self):
    a, b, c = seed_network(TINY, seed=3), seed_network(TINY, seed=3), seed_network(TINY, seed=4)
    kernel = lambda net: net.layer("dense_8").kernel
    self.assertAllEqual(kernel(a), kernel(b))
    self.assertNotAllClose(kernel(a), kernel(c))

  def test_inference_branch_leaves_state_untouched(self):
    net = seed_network(TINY)
    before = [v.numpy().copy() for v in net.variables]
    net(batch(), training=False)
    for value, var in zip(before, net.variables):
      self.assertAllEqual(value, var)

  @parameterized.parameters(0.9, 0.0)
  def test_training_branch_updates_moving_statistics_in_closed_form(self, momentum):
    net = seed_network(ModelConfig(width=1 / 64, momentum=momentum))
    first = net(batch(seed=1), training=True)
    for layer, stats in zip(net.batch_norms, first.statistics):
      self.assertAllClose(layer.moving_mean, (1 - momentum) * stats.mean.numpy(), atol=1e-7)
      self.assertAllClose(layer.moving_variance,
                          momentum * 1.0 + (1 - momentum) * stats.variance.numpy(), rtol=1e-6)
    second = net(batch(seed=2), training=True)
    for layer, s1, s2 in zip(net.batch_norms, first.statistics, second.statistics):
      expected = momentum * (1 - momentum) * s1.mean.numpy() + (1 - momentum) * s2.mean.numpy()
      self.assertAllClose(layer.moving_mean, expected, atol=1e-6)
      if momentum == 0:
        self.assertAllEqual(layer.moving_variance, s2.variance)

  def test_momentum_zero_inference_equals_training_output(self):
    # Keras's momentum-0 test: after one training call, inference on the same batch matches.
    net = seed_network(ModelConfig(width=1 / 64, momentum=0.0))
    x = batch()
    training_logits = net(x, training=True).logits
    self.assertAllClose(net(x, training=False).logits, training_logits, rtol=1e-4, atol=1e-4)

  def test_bessel_feeds_unbiased_variance_into_moving_variance(self):
    net = seed_network(ModelConfig(width=1 / 64, momentum=0.0, bessel=True))
    out = net(batch(n=8), training=True)
    n_conv1 = 8 * 23 * 23
    self.assertAllClose(net.batch_norms[0].moving_variance,
                        out.statistics[0].variance.numpy() * n_conv1 / (n_conv1 - 1), rtol=1e-6)
    self.assertAllClose(net.batch_norms[-1].moving_variance,
                        out.statistics[-1].variance.numpy() * 8 / 7, rtol=1e-6)

  def test_given_statistics_are_used_and_change_nothing(self):
    net = seed_network(TINY)
    x = batch()
    names = [layer.name for layer in net.batch_norms]
    batch_out = net(x, training=False, statistics=BATCH)
    again = net(x, training=False, statistics=dict(zip(names, batch_out.statistics)))
    self.assertAllClose(again.logits, batch_out.logits, atol=1e-5)
    # BATCH in the inference branch normalises exactly as the training branch does
    self.assertAllEqual(batch_out.logits, net(x, training=True).logits)
    fresh = seed_network(TINY)
    fresh(x, training=True, statistics=BATCH)  # an override never updates, in either branch
    self.assertAllEqual(fresh.batch_norms[0].moving_mean, np.zeros(1))
    with self.assertRaisesRegex(KeyError, "bn_9"):
      net(x, training=False, statistics={"bn_9": BATCH})


if __name__ == "__main__":
  tf.test.main()
