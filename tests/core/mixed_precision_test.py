"""Mixed precision in the raw core: BN's float32 island, the loss scale's closed form, and a
skipped step that moves the BN statistics and nothing else."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from bnraw.config import DataConfig, ModelConfig, TrainConfig
from bnraw.core import loop, optim
from bnraw.core.layers import BatchNorm
from bnraw.core.step import make_train_step
from bnraw.models.seed import build
from bnraw.tracing.store import TraceRecorder
from tests.core.examples import random_examples


class BatchNormUpcastTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters("float16", "bfloat16")
  def test_statistics_in_float32_output_in_the_compute_dtype(self, dtype):
    # Moments taken in float16 would be off by ~1e-3 relative; Keras upcasts first.
    rng = np.random.default_rng(0)
    x = tf.cast(rng.normal(3.0, 2.0, (8, 5, 5, 4)).astype(np.float32), dtype)
    layer = BatchNorm("bn", 4, momentum=0.0, epsilon=1e-3)
    out = layer(x, training=True)
    self.assertEqual(out.y.dtype, tf.as_dtype(dtype))
    self.assertEqual(layer.moving_mean.dtype, tf.float32)
    exact = tf.cast(x, tf.float64).numpy().reshape(-1, 4)
    self.assertAllClose(out.statistics.mean, exact.mean(0), rtol=1e-6)
    self.assertAllClose(out.statistics.variance, exact.var(0), rtol=1e-5)
    self.assertAllClose(layer.moving_mean, exact.mean(0), rtol=1e-6)  # momentum 0


class LossScaleTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(False, True)
  def test_closed_form(self, compiled):
    w = tf.Variable([1.0, 2.0])
    scaler = optim.LossScale(optim.SGD([w], lr=0.5, momentum=0.0), initial_scale=8.0,
                             growth_steps=2)
    apply = tf.function(scaler.apply) if compiled else scaler.apply
    # finite: w -= lr * g / scale, counter 0 -> 1
    self.assertFalse(apply([tf.constant([8.0, 16.0])]))
    self.assertAllEqual(w, [0.5, 1.0])
    self.assertEqual(int(scaler.step_counter), 1)
    # finite again: growth_steps in a row, so the scale doubles and the counter restarts
    self.assertFalse(apply([tf.constant([8.0, 8.0])]))
    self.assertAllEqual(w, [0.0, 0.5])
    self.assertEqual((float(scaler.dynamic_scale), int(scaler.step_counter)), (16.0, 0))
    # not finite: skipped, nothing moves, the scale halves
    self.assertTrue(apply([tf.constant([np.inf, 1.0])]))
    self.assertAllEqual(w, [0.0, 0.5])
    self.assertEqual((float(scaler.dynamic_scale), int(scaler.step_counter)), (8.0, 0))
    self.assertEqual((int(scaler.iterations), int(scaler.skipped_steps)), (2, 1))
    self.assertEqual(optim.steps_run(scaler), 3)


class SkippedStepTest(tf.test.TestCase):

  def test_a_skipped_step_moves_the_statistics_and_nothing_else(self):
    model = ModelConfig(width=1 / 64, dtype_policy="mixed_float16")
    parts = build(DataConfig(), model, TrainConfig(loss_scale=1e30))
    images, labels = random_examples(16)
    before = [v.numpy() for v in parts.model.trainable_variables]
    slots = [v.numpy() for group in parts.optimizer.slots for v in group]
    out = make_train_step(parts.model, parts.optimizer, mode="eager", trace=True)(
        tf.constant(images), tf.constant(labels))
    self.assertTrue(out["skipped"])
    self.assertEqual(out["loss_scale"], np.float32(1e30))
    self.assertTrue(np.isfinite(out["loss"]))  # the loss is fine; its scaled gradients are not
    for a, b in zip(before, parts.model.trainable_variables):
      self.assertAllEqual(a, b)
    for a, b in zip(slots, [v for group in parts.optimizer.slots for v in group]):
      self.assertAllEqual(a, b)
    for layer, mean in zip(parts.model.batch_norms, out["trace"]["batch_mean"]):
      # from 0: moving = 0 * m + batch * (1 - m), in float32
      self.assertAllEqual(layer.moving_mean, mean * np.float32(1 - 0.9))
    self.assertEqual((int(parts.optimizer.iterations), optim.steps_run(parts.optimizer)), (0, 1))
    self.assertEqual(parts.optimizer.dynamic_scale.numpy(), np.float32(1e30) * np.float32(0.5))

  def test_fit_counts_skipped_steps_and_the_trace_records_them(self):
    model = ModelConfig(width=1 / 64, dtype_policy="mixed_float16")
    parts = build(DataConfig(), model, TrainConfig())
    images, labels = random_examples(64)
    recorder = TraceRecorder([l.name for l in parts.model.batch_norms], model.epsilon)
    history = loop.fit(parts.model, parts.optimizer, images, labels, batch_size=16, epochs=2,
                       seed=0, mode="function", trace=True, on_step=recorder,
                       steps_per_execution=2)
    arrays = recorder.arrays()
    scales = arrays["loss_scale"]
    skipped = arrays["skipped"].astype(bool)
    self.assertEqual(list(np.nonzero(skipped)[0]), history.skipped)
    self.assertTrue(0 < len(history.skipped) < 8, history.skipped)  # both kinds of step
    self.assertEqual(scales[0], 2.0 ** 15)
    # each skip halves the scale for the next step; an applied step keeps it (growth: 2000)
    self.assertAllEqual(scales[1:], scales[:-1] * np.where(skipped[:-1], 0.5, 1.0))
    self.assertEqual(int(parts.optimizer.iterations), 8 - len(history.skipped))


if __name__ == "__main__":
  tf.test.main()
