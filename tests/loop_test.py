"""The explicit loop: modes agree, runs are deterministic, fit's bookkeeping is Keras's."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from bnraw import loop
from bnraw.config import ModelConfig
from bnraw.model import SeedNet
from bnraw.optim import Adam, SGD, make_optimizer

CONFIG = ModelConfig(width=1 / 32)


def data(n=32, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.uniform(0, 1, (n, 29, 29, 3)).astype(np.float32),
          rng.permutation(256)[:n].astype(np.int32))


def one_step(mode, optimizer):
  """One step from the same initial state: (outputs, weight change of every trainable)."""
  net = SeedNet(CONFIG, seed=1)
  before = [v.numpy() for v in net.trainable_variables]
  opt = make_optimizer(optimizer, net.trainable_variables, 1e-3)
  x, y = data()
  out = loop.make_train_step(net, opt, mode=mode, trace=True)(tf.constant(x), tf.constant(y))
  update = np.concatenate([(v.numpy() - b).ravel()
                           for v, b in zip(net.trainable_variables, before)])
  return out, update


def max_rel(a, b):
  return np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max()


# Measured at width 1/32 on random images (BUILD.md, "How the modes differ"): tf.function runs the
# same kernels as eager; XLA reduces in another order, moments differ by ~1e-4 relative, and BN's
# backward pass through small-variance channels turns that into ~1% gradient differences, which
# Adam's per-element normalisation passes on as noise-level steps.
TOLERANCE = {  # mode: (loss rel, BN statistics max-norm rel, update rel L2 for adam / sgd)
    "function": (1e-6, 1e-6, {"adam": 1e-4, "sgd": 1e-4}),
    "xla": (1e-5, 1e-3, {"adam": 0.2, "sgd": 0.05}),
}


class LoopTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(optimizer=["adam", "sgd"], mode=["function", "xla"])
  def test_modes_agree_with_eager(self, optimizer, mode):
    ref_out, ref_update = one_step("eager", optimizer)
    out, update = one_step(mode, optimizer)
    loss_tol, stats_tol, update_tol = TOLERANCE[mode]
    self.assertLessEqual(abs(float(out["loss"]) / float(ref_out["loss"]) - 1), loss_tol)
    for key in ("batch_mean", "batch_variance", "moving_mean_after", "moving_variance_after"):
      for a, b in zip(out["trace"][key], ref_out["trace"][key]):
        self.assertLessEqual(max_rel(a, b), stats_tol, msg=key)
    rel_l2 = np.linalg.norm(update - ref_update) / np.linalg.norm(ref_update)
    self.assertLessEqual(rel_l2, update_tol[optimizer])

  def test_trace_equals_model_variables_after_step(self):
    for mode in ("eager", "function", "xla"):
      net = SeedNet(CONFIG, seed=1)
      opt = Adam(net.trainable_variables)
      x, y = data()
      step = loop.make_train_step(net, opt, mode=mode, trace=True)
      for _ in range(2):
        before = [layer.moving_mean.numpy().copy() for layer in net.bns]
        out = step(tf.constant(x), tf.constant(y))
        for i, layer in enumerate(net.bns):
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
      net = SeedNet(CONFIG, seed=2)
      opt = Adam(net.trainable_variables)
      return loop.fit(net, opt, x, y, batch_size=24, epochs=2, seed=5, mode="function")

    a, b = run(), run()
    self.assertEqual(a.loss, b.loss)
    self.assertEqual(a.accuracy, b.accuracy)
    for p, q in zip(a.permutations, b.permutations):
      self.assertAllEqual(p, q)

  def test_partial_last_batch_and_epoch_mean(self):
    x, y = data(40)
    net = SeedNet(CONFIG, seed=2)
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
    net = SeedNet(CONFIG, seed=2)
    before = [v.numpy().copy() for v in net.variables]
    loss, accuracy = loop.evaluate(net, x, y, batch_size=16, mode="function")
    expected = net(tf.constant(x), training=False).logits
    from bnraw import ops
    self.assertAllClose(loss, ops.softmax_cross_entropy(expected, y), rtol=1e-6)
    for value, var in zip(before, net.variables):
      self.assertAllEqual(value, var)

  def test_auto_mode(self):
    self.assertEqual(loop.resolve_mode("auto"), "xla" if loop.has_gpu() else "function")
    with self.assertRaises(ValueError):
      loop.resolve_mode("jit")


if __name__ == "__main__":
  tf.test.main()
