"""The raw optimizers against Keras 3's, bit for bit: the same start, the same gradients, and
after every step the same variables, slots and iteration count (both sides in a tf.function,
Keras through ``apply_gradients`` as fit calls it). Also the twin's refusals."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from bnraw.core import optim
from bnraw.errors import UsageError
from bnraw.models.keras_bridge import optimizer_slots
from bnraw.models.twin_optimizer import raw_optimizer

O = keras.optimizers
CASES = (
    ("adam", lambda: O.Adam(learning_rate=0.01)),
    ("adam_amsgrad_clipnorm", lambda: O.Adam(learning_rate=0.01, amsgrad=True, clipnorm=0.5)),
    ("adam_global_clipnorm_decay",
     lambda: O.Adam(learning_rate=0.01, global_clipnorm=1.0, weight_decay=0.05)),
    ("adamw", lambda: O.AdamW(learning_rate=0.01)),
    ("sgd", lambda: O.SGD(learning_rate=0.1)),
    ("sgd_momentum_clipvalue", lambda: O.SGD(learning_rate=0.1, momentum=0.9, clipvalue=0.3)),
    ("sgd_nesterov_decay",
     lambda: O.SGD(learning_rate=0.1, momentum=0.8, nesterov=True, weight_decay=0.05)),
    ("rmsprop", lambda: O.RMSprop(learning_rate=0.01)),
    ("rmsprop_momentum_global_clipnorm",
     lambda: O.RMSprop(learning_rate=0.01, momentum=0.5, global_clipnorm=0.8)),
    ("rmsprop_centered_clipnorm_decay",
     lambda: O.RMSprop(learning_rate=0.01, centered=True, clipnorm=1.0, weight_decay=0.01)),
    ("rmsprop_centered_momentum", lambda: O.RMSprop(learning_rate=0.01, momentum=0.9,
                                                    centered=True, rho=0.8)),
    ("loss_scale_adamw", lambda: O.LossScaleOptimizer(O.AdamW(learning_rate=0.01, clipnorm=0.7),
                                                      initial_scale=4.0, dynamic_growth_steps=2)),
)
SHAPES = ((3, 4), (4,), (2, 3))


def values(rng, scale=1.0):
  return [(rng.normal(size=shape) * scale).astype(np.float32) for shape in SHAPES]


class OptimKerasTest(tf.test.TestCase, parameterized.TestCase):

  def assert_same(self, raw_vars, raw_opt, keras_vars, keras_opt, step):
    for i, (a, b) in enumerate(zip(raw_vars, keras_vars)):
      self.assertTrue(np.array_equal(a.numpy(), b.numpy()), f"step {step}: variable {i}")
    self.assertEqual([len(group) for group in raw_opt.slots],
                     [len(group) for group in optimizer_slots(keras_opt)])
    for g, (group_a, group_b) in enumerate(zip(raw_opt.slots, optimizer_slots(keras_opt))):
      for i, (a, b) in enumerate(zip(group_a, group_b)):
        self.assertTrue(np.array_equal(a.numpy(), b.numpy()), f"step {step}: slot {g}.{i}")
    self.assertEqual(int(raw_opt.iterations.numpy()), int(keras_opt.iterations.numpy()))
    if isinstance(raw_opt, optim.LossScale):
      self.assertEqual(float(raw_opt.dynamic_scale.numpy()),
                       float(keras_opt.dynamic_scale.numpy()))
      self.assertEqual(int(raw_opt.step_counter.numpy()), int(keras_opt.step_counter.numpy()))

  @parameterized.named_parameters(*CASES)
  def test_bit_identical_to_keras(self, make):
    rng = np.random.default_rng(0)
    start = values(rng)
    keras_vars = [keras.Variable(v) for v in start]
    keras_opt = make()
    keras_opt.build(keras_vars)
    raw_vars = [tf.Variable(v) for v in start]
    raw_opt = raw_optimizer(keras_opt, raw_vars)
    # Both steps return a value, as fit's train function does: TF's graph optimizer (grappler)
    # moves constants, e.g. (v - a^2) + eps into (eps - a^2) + v, only in a function with outputs.
    keras_apply = tf.function(lambda grads: keras_opt.apply_gradients(zip(grads, keras_vars)))

    @tf.function
    def raw_apply(grads):
      raw_opt.apply(grads)
      return raw_opt.iterations
    for step in range(3):
      grads = [tf.constant(g) for g in values(rng, scale=2.0)]
      if step == 1 and isinstance(raw_opt, optim.LossScale):  # a skipped step
        grads[1] = tf.constant(np.full(SHAPES[1], np.inf, np.float32))
      keras_apply(grads)
      raw_apply(grads)
      self.assert_same(raw_vars, raw_opt, keras_vars, keras_opt, step)

  def test_twin_settings(self):
    keras_vars = [keras.Variable(np.ones((2,), np.float32))]
    keras_opt = O.LossScaleOptimizer(O.RMSprop(learning_rate=0.02, rho=0.8, momentum=0.5,
                                               centered=True, clipvalue=0.1))
    keras_opt.build(keras_vars)
    keras_opt.dynamic_scale.assign(512.0)
    twin = raw_optimizer(keras_opt, [tf.Variable(np.ones((2,), np.float32))])
    self.assertIsInstance(twin, optim.LossScale)
    self.assertEqual((float(twin.dynamic_scale.numpy()), twin.growth_steps), (512.0, 2000))
    inner = twin.inner
    self.assertIsInstance(inner, optim.RMSprop)
    self.assertEqual((inner.lr, inner.rho, inner.momentum, inner.centered, inner.clipvalue),
                     (np.float32(0.02), 0.8, 0.5, True, 0.1))
    self.assertEqual(optim.AdamW([tf.Variable(1.0)]).weight_decay, 0.004)

  @parameterized.named_parameters(
      ("other_class", lambda: O.Adagrad(), "optimizer Adagrad is not supported"),
      ("schedule", lambda: O.Adam(learning_rate=O.schedules.ExponentialDecay(0.1, 10, 0.9)),
       "optimizer Adam: a learning-rate schedule (ExponentialDecay) is not supported"),
      ("ema", lambda: O.SGD(use_ema=True), "optimizer SGD: use_ema=True is not supported"),
  )
  def test_refusals(self, make, message):
    with self.assertRaises(UsageError) as caught:
      raw_optimizer(make(), [tf.Variable(1.0)])
    self.assertEqual(caught.exception.subject, "keras_model")
    self.assertIn(message, str(caught.exception))
    self.assertIn("supported: Adam, AdamW, SGD, RMSprop", str(caught.exception))


if __name__ == "__main__":
  tf.test.main()
