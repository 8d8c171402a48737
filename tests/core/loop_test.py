"""The explicit loop: the trace is the state, runs are deterministic, fit's bookkeeping is
Keras's, the optimizers in closed form."""

import numpy as np
import tensorflow as tf

from bnraw.core import loop, ops
from bnraw.core.step import make_train_step, relaxed_batch, resolve_mode
from bnraw.config import ModelConfig
from bnraw.models.seed import seed_network
from tests.core.examples import random_examples
from bnraw.core.optim import Adam, SGD

CONFIG = ModelConfig(width=1 / 32)


def data(n=32, seed=0):
  return random_examples(n, seed)


class LoopTest(tf.test.TestCase):

  def test_trace_equals_model_variables_after_step(self):
    for mode in ("eager", "function", "xla"):
      net = seed_network(CONFIG, seed=1)
      opt = Adam(net.trainable_variables)
      x, y = data()
      step = make_train_step(net, opt, mode=mode, trace=True)
      for _ in range(2):
        before = [layer.moving_mean.numpy().copy() for layer in net.batch_norms]
        out = step(tf.constant(x), tf.constant(y))
        for i, layer in enumerate(net.batch_norms):
          self.assertAllEqual(out["trace"]["moving_mean_before"][i], before[i])
          self.assertAllEqual(out["trace"]["moving_mean_after"][i], layer.moving_mean)
          self.assertAllEqual(out["trace"]["moving_variance_after"][i], layer.moving_variance)

  def test_adam_first_step_closed_form(self):
    w = tf.Variable([1.0, -2.0])
    opt = Adam([w], lr=0.1)
    g = np.array([0.5, -3.0], np.float32)
    opt.apply([tf.constant(g)])
    # t = 1: m = 0.1 g, v = 0.001 g^2, alpha = lr sqrt(0.001) / 0.1 -> step = lr * g/|g| (eps aside)
    self.assertAllClose(w, [1.0 - 0.1, -2.0 + 0.1], atol=1e-5)
    self.assertEqual(int(opt.iterations), 1)

  def test_sgd_nesterov_closed_form(self):
    w = tf.Variable([1.0])
    opt = SGD([w], lr=0.1, momentum=0.9, nesterov=True)
    opt.apply([tf.constant([1.0])])  # m = -0.1; w += 0.9 m - 0.1 = -0.19
    self.assertAllClose(w, [0.81])
    opt.apply([tf.constant([1.0])])  # m = -0.19; w += -0.171 - 0.1
    self.assertAllClose(w, [0.81 - 0.271])

  def test_deterministic_history(self):
    x, y = data(64)

    def run():
      net = seed_network(CONFIG, seed=2)
      opt = Adam(net.trainable_variables)
      return loop.fit(net, opt, x, y, batch_size=24, epochs=2, seed=5, mode="function")

    a, b = run(), run()
    self.assertEqual(a.loss, b.loss)
    self.assertEqual(a.accuracy, b.accuracy)
    for p, q in zip(a.permutations, b.permutations):
      self.assertAllEqual(p, q)

  def test_partial_last_batch_and_epoch_mean(self):
    x, y = data(40)
    net = seed_network(CONFIG, seed=2)
    opt = Adam(net.trainable_variables)
    records = []
    history = loop.fit(net, opt, x, y, batch_size=16, epochs=1, seed=0, mode="function",
                       on_step=records.append)
    self.assertEqual([len(r.batch) for r in records], [16, 16, 8])
    self.assertEqual(sorted(np.concatenate([r.batch for r in records])), list(range(40)))
    weighted = sum(r.loss * len(r.batch) for r in records) / 40
    self.assertAllClose(history.loss[0], weighted, rtol=1e-6)
    self.assertEqual(int(opt.iterations), 3)

  def test_evaluate_is_inference_and_stateless(self):
    x, y = data(16)
    net = seed_network(CONFIG, seed=2)
    before = [v.numpy().copy() for v in net.variables]
    loss, accuracy = loop.evaluate(net, x, y, batch_size=16, mode="function")
    expected = net(tf.constant(x), training=False).logits
    self.assertAllClose(loss, ops.softmax_cross_entropy(expected, y), rtol=1e-6)
    for value, var in zip(before, net.variables):
      self.assertAllEqual(value, var)

  def test_steps_per_execution_is_bit_identical_to_one_step_per_call(self):
    # 40 examples: batches 16, 16, 8 (one chunk of 2, then the partial batch alone), the batch
    # dimension traced unknown; 64: four batches of 16 in one call, the batch size known.
    for examples, steps in ((40, 6), (64, 8)):
      with self.subTest(examples=examples):
        self.check_steps_per_execution(*data(examples), steps)

  def check_steps_per_execution(self, x, y, steps):
    def run(per_execution):
      net = seed_network(CONFIG, seed=3)
      opt = Adam(net.trainable_variables)
      records = []
      history = loop.fit(net, opt, x, y, batch_size=16, epochs=2, seed=1, mode="function",
                         trace=True, on_step=records.append, steps_per_execution=per_execution)
      return history, records, [v.numpy() for v in net.variables]

    (one, one_steps, one_vars), (many, many_steps, many_vars) = run(1), run(4)
    self.assertEqual(many.loss, one.loss)
    self.assertEqual([r.step for r in many_steps], list(range(steps)))  # every step, in order
    for a, b in zip(one_steps, many_steps):
      self.assertEqual(b.loss, a.loss)
      self.assertAllEqual(b.batch, a.batch)
      for key in a.trace:
        for p, q in zip(a.trace[key], b.trace[key]):
          self.assertAllEqual(q, p, msg=f"step {a.step} {key}")
    for a, b in zip(one_vars, many_vars):
      self.assertAllEqual(b, a)

  def test_steps_per_execution_stops_where_one_step_per_call_stops(self):
    x, y = data(64)

    def run(per_execution):
      net = seed_network(CONFIG, seed=3)
      opt = SGD(net.trainable_variables, lr=1e12)
      history = loop.fit(net, opt, x, y, batch_size=8, epochs=1, seed=1, mode="function",
                         steps_per_execution=per_execution)
      return history, [v.numpy() for v in net.variables], int(opt.iterations)

    (one, one_vars, one_iterations), (many, many_vars, many_iterations) = run(1), run(8)
    self.assertEqual(one.status, "non_finite")
    self.assertEqual((many.status, many.error.step, many.error.where),
                     ("non_finite", one.error.step, one.error.where))
    self.assertLess(one.error.step, 7)  # inside the one 8-step call: the loop stopped there
    self.assertEqual(many_iterations, one_iterations)
    for a, b in zip(one_vars, many_vars):
      self.assertAllEqual(b, a)

  def test_keras_relaxes_the_batch_dimension_when_the_batch_does_not_divide(self):
    self.assertFalse(relaxed_batch(256, 64))
    self.assertTrue(relaxed_batch(256, 48))
    self.assertTrue(relaxed_batch(40, 64))  # no full batch at all

  def test_auto_mode_on_cpu(self):
    # conftest hides any GPU, so this is a CPU-only process: Keras's jit_compile="auto" is off
    self.assertEqual(tf.config.list_physical_devices("GPU"), [])
    self.assertEqual(resolve_mode("auto"), "function")
    for mode in ("eager", "function", "xla"):
      self.assertEqual(resolve_mode(mode), mode)
    with self.assertRaisesRegex(ValueError, "unknown mode 'jit'"):
      resolve_mode("jit")


if __name__ == "__main__":
  tf.test.main()
