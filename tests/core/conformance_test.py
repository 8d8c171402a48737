"""Every raw layer, and the whole training step, agree across eager, tf.function and XLA.

tf.function runs the same kernels as eager, so every layer agrees bit for bit; a whole step agrees
to float noise (graph-mode gradient aggregation sums in its own order). XLA fuses and reduces in its
own order (docs/parity.md, "How the modes differ numerically"): measured at width 1/32 on random
images, BN moments differ by ~1e-4 relative, and BN's backward pass through small-variance
channels turns that into ~1% gradient differences, which Adam's per-element normalisation passes
on as noise-level steps. Those are the documented XLA tolerances below.
"""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from bnraw.config import ModelConfig
from bnraw.core import step as steps
from bnraw.core.catalog import Conv2D, Dense, Flatten, ReLU
from bnraw.core.layers import BATCH, BatchNorm
from bnraw.models.seed import glorot_uniform
from bnraw.core.optim import make_optimizer
from bnraw.models.seed import seed_network

MODES = ("eager", "function", "xla")
LAYER_XLA_RTOL = 1e-4  # one layer's output under XLA, relative to its max
TOLERANCE = {  # mode: (loss rel, BN statistics max-norm rel, update rel L2 for adam / sgd)
    "function": (1e-6, 1e-6, {"adam": 1e-4, "sgd": 1e-4}),
    "xla": (1e-5, 1e-3, {"adam": 0.2, "sgd": 0.05}),
}


def max_rel(a, b):
  """``max|a - b| / max|b|``; the plain difference where b is all zero (a zero bias)."""
  diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
  scale = np.abs(np.asarray(b, np.float64)).max()
  return diff / scale if scale else diff


def kernel(shape):
  return glorot_uniform(shape, (0, 1))


def bias(channels):
  return np.linspace(-0.5, 0.5, channels).astype(np.float32)


def layer_cases():
  """(name, make layer, input shape, call keywords): the seed's layer kinds and every BN
  branch."""
  bn = lambda: BatchNorm("bn", 6, momentum=0.9, epsilon=1e-3)
  return [
      ("conv", lambda: Conv2D("conv", kernel([3, 3, 4, 6]), bias(6)), (5, 7, 7, 4), {}),
      ("conv_as_matmul", lambda: Conv2D("conv", kernel([3, 3, 4, 6]), bias(6), as_matmul=True),
       (5, 3, 3, 4), {}),
      ("dense", lambda: Dense("dense", kernel([4, 6]), bias(6)), (5, 4), {}),
      ("relu", lambda: ReLU("relu"), (5, 4), {}),
      ("flatten", lambda: Flatten("flatten"), (5, 2, 2, 3), {}),
      ("bn_training", bn, (5, 3, 3, 6), {"training": True}),
      ("bn_inference", bn, (5, 3, 3, 6), {"training": False}),
      ("bn_batch", bn, (5, 6), {"training": False, "statistics": BATCH}),
  ]


class LayerConformanceTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(*[(name, name) for name, *_ in layer_cases()])
  def test_modes_agree(self, case):
    _, make, shape, kwargs = next(c for c in layer_cases() if c[0] == case)
    x = tf.constant(np.random.default_rng(0).standard_normal(shape).astype(np.float32) + 0.5)
    kwargs = {"training": True, **kwargs}
    results = {}
    for mode in MODES:
      layer = make()  # fresh state each time: a BN update must happen once per mode
      call = steps.compile_fn(lambda t, layer=layer: layer(t, **kwargs), mode)
      out = call(x)
      y = out.y if isinstance(layer, BatchNorm) else out
      state = [v.numpy() for v in layer.variables]
      results[mode] = (y.numpy(), state)
    y_eager, state_eager = results["eager"]
    self.assertAllEqual(results["function"][0], y_eager)
    for a, b in zip(results["function"][1], state_eager):
      self.assertAllEqual(a, b)
    y_xla, state_xla = results["xla"]
    self.assertLessEqual(max_rel(y_xla, y_eager), LAYER_XLA_RTOL)
    for a, b in zip(state_xla, state_eager):
      self.assertLessEqual(max_rel(a, b), LAYER_XLA_RTOL)


def one_step(mode, optimizer):
  """One step from the same initial state: (outputs, weight change of every trainable)."""
  net = seed_network(ModelConfig(width=1 / 32), seed=1)
  before = [v.numpy() for v in net.trainable_variables]
  opt = make_optimizer(optimizer, net.trainable_variables, 1e-3)
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (32, 29, 29, 3)).astype(np.float32)
  y = rng.permutation(256)[:32].astype(np.int32)
  out = steps.make_train_step(net, opt, mode=mode, trace=True)(tf.constant(x), tf.constant(y))
  update = np.concatenate([(v.numpy() - b).ravel()
                           for v, b in zip(net.trainable_variables, before)])
  return out, update


class StepConformanceTest(tf.test.TestCase, parameterized.TestCase):

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


if __name__ == "__main__":
  tf.test.main()
