"""FLOP counts against a hand calculation, and a tiny profile run's profile.json."""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import tensorflow as tf

from bnraw.config import ModelConfig
from bnraw.core.layers import BatchNorm
from bnraw.models.seed import seed_network
from bnraw.profiling import bench, op_stats
from bnraw.profiling.bench import forward_flops, train_step_flops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FlopsTest(tf.test.TestCase):

  def test_width_1_16_by_hand(self):
    # (output side, kernel, in, out) of each conv at width 1/16, then the two dense layers.
    convs = [(23, 7, 3, 4), (17, 7, 4, 8), (13, 5, 8, 16), (9, 5, 16, 32), (5, 5, 32, 64),
             (3, 3, 64, 128), (1, 3, 128, 256)]
    per_image = sum(2 * s * s * k * k * i * o for s, k, i, o in convs)
    per_image += 2 * 256 * 64 + 2 * 64 * 256
    self.assertEqual(forward_flops(ModelConfig(width=1 / 16), 1), per_image)
    self.assertEqual(train_step_flops(ModelConfig(width=1 / 16), 256), 3 * 256 * per_image)
    self.assertAllClose(train_step_flops(ModelConfig(width=1 / 16), 256) / 1e9, 7.1, rtol=0.01)

  def test_full_width_by_hand(self):
    convs = [(23, 7, 3, 64), (17, 7, 64, 128), (13, 5, 128, 256), (9, 5, 256, 512),
             (5, 5, 512, 1024), (3, 3, 1024, 2048), (1, 3, 2048, 4096)]
    per_image = sum(2 * s * s * k * k * i * o for s, k, i, o in convs)
    per_image += 2 * 4096 * 1024 + 2 * 1024 * 256
    self.assertEqual(forward_flops(ModelConfig(width=1.0), 1), per_image)
    # docs/design.md: about 1.69 TFLOP per training step of 256 images.
    self.assertAllClose(train_step_flops(ModelConfig(width=1.0), 256) / 1e12, 1.69, rtol=0.01)


  def test_against_tensorflows_own_flop_statistics(self):
    # TF registers a FLOP count per Conv2D/MatMul node (the statistics its profiler sums): an
    # independent count of the graph the raw forward pass really builds.
    from tensorflow.python.framework import ops as tf_ops
    for width, batch in ((1 / 16, 32), (1 / 64, 3)):
      config = ModelConfig(width=width)
      net = seed_network(config)
      forward = tf.function(lambda x, net=net: net(x, training=True).logits,
                            autograph=False)
      graph = forward.get_concrete_function(tf.TensorSpec([batch, 29, 29, 3])).graph
      counted = sum(tf_ops.get_stats_for_node_def(graph, op.node_def, "flops").value
                    for op in graph.get_operations() if op.type in ("Conv2D", "MatMul"))
      self.assertEqual(forward_flops(config, batch), counted)


class OpStatsTest(tf.test.TestCase):

  def test_bn_shares_by_name_scope(self):
    ops = [{"operation": name, "type": "T", "occurrences": 1, "self_time_us": t} for name, t in (
        ("m/bn_3/moments/mean", 10.0), ("m/bn_3/batchnorm/mul_1", 5.0),
        ("m/bn_3_moving_update/mul", 1.0), ("gradient_tape/m/bn_3/moments/sub", 4.0),
        ("m/bn_30/moments/mean", 7.0),  # another layer: a name prefix, not a substring
        ("bn_3/moments/mean", 7.0),  # another model's
        ("gradient_tape/m/conv_1/Conv2DBackpropFilter", 66.0))]
    summary = op_stats.summarize(ops, ["bn_3"], top=2, model="m")
    self.assertEqual(summary["self_time_us"], 100.0)
    self.assertAllClose(summary["bn_layers"]["bn_3"], {
        "statistics": 0.10, "normalization": 0.05, "moving_update": 0.01, "backward": 0.04,
        "total": 0.2})
    self.assertEqual([op["operation"] for op in summary["top_ops"]],
                     ["gradient_tape/m/conv_1/Conv2DBackpropFilter", "m/bn_3/moments/mean"])


  @unittest.skipIf(importlib.util.find_spec("xprof") is None, "XProf is an optional extra")
  def test_a_real_capture_attributes_bn_ops_by_name(self):
    from bnraw.core.optim import Adam
    from bnraw.core.step import make_train_step
    from bnraw.profiling.bench import capture_profile
    net = seed_network(ModelConfig(width=1 / 64))
    step = make_train_step(net, Adam(net.trainable_variables), mode="function", trace=False)
    x, y = tf.zeros((16, 29, 29, 3)) + 0.5, tf.range(16)
    run = lambda: float(step(x, y)["loss"])
    run()
    with tempfile.TemporaryDirectory() as capture:
      capture_profile(run, capture, steps=2)
      summary = op_stats.summarize(op_stats.framework_op_stats(capture), ["bn_3"],
                                   model=net.name)
    shares = summary["bn_layers"]["bn_3"]
    for part in ("statistics", "normalization", "moving_update", "backward"):
      self.assertGreater(shares[part], 0.0, msg=part)
    self.assertLess(shares["total"], 0.5)


class BreakdownTest(tf.test.TestCase):

  def test_each_variant_takes_away_its_block_and_no_more(self):
    from bnraw.core.optim import Adam
    from bnraw.profiling import breakdown
    net = seed_network(ModelConfig(width=1 / 64), seed=3)
    optimizer = Adam(net.trainable_variables)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0, 1, (16, 29, 29, 3)).astype(np.float32))
    y = tf.constant(np.arange(16, dtype=np.int32))
    net(x, training=True)  # moving statistics away from their initial 0 and 1
    steps = breakdown.variant_steps(net, optimizer, "function")
    before = [v.numpy() for v in net.variables]
    batch = float(net.loss(net(x, training=True, statistics="batch").logits, y))
    inference = float(net.loss(net(x, training=False).logits, y))
    losses = {v: float(steps[v](x, y)) for v in breakdown.VARIANTS[2:]}
    for value, variable in zip(before, net.variables):  # nothing trains, nothing moves
      self.assertAllEqual(variable, value)
    losses["no_optimizer"] = float(steps["no_optimizer"](x, y))  # moves the statistics only
    for value, variable in zip(before, net.variables):
      if variable.trainable:
        self.assertAllEqual(variable, value)
    self.assertNotAllEqual(net.batch_norms[0].moving_mean, before[2])
    self.assertAllClose(losses["no_optimizer"], batch, rtol=1e-5)
    self.assertAllClose(losses["no_moving_update"], batch, rtol=1e-5)
    self.assertAllClose(losses["fixed_statistics"], inference, rtol=1e-5)
    h = x
    for layer in net.layers:
      if not isinstance(layer, BatchNorm):
        h = layer(h, training=True)
    self.assertAllClose(losses["no_bn"], float(net.loss(h, y)), rtol=1e-5)
    self.assertAllClose(float(steps["step"](x, y)["loss"]), batch, rtol=1e-5)
    self.assertEqual(int(optimizer.iterations), 1)  # the real step, and it alone, trains


class RatiosTest(tf.test.TestCase):

  def test_auto_cost_and_steps_per_execution_by_hand(self):
    def row(impl, mode, seconds, k=1, **extra):
      return {"impl": impl, "mode": mode, "width": 0.25, "traced": False, "fast_conv": False,
              "steps_per_execution": k, "step_s_median": seconds, "peak_fraction": 0.5, **extra}
    autotune = {"choice": "xla", "seconds": 20.0,
                "candidates": {"function": {"compile_s": 3.0, "step_ms": 1100.0},
                               "xla": {"compile_s": 8.0, "step_ms": 1000.0}}}
    result = {"results": [
        row("raw", "function", 1.0), row("raw", "xla", 1.1), row("raw", "function", 0.5, k=4),
        row("raw", "auto", 1.2, chosen="xla", autotune=autotune),
        row("keras", "fit", 2.0), row("keras", "fit", 1.5, k=4)]}
    entry, = bench.ratios(result)
    self.assertEqual((entry["best_exact_raw"], entry["best_keras"]), ("function", "fit"))
    self.assertAllClose(entry["exact_raw_over_keras"], 0.5)  # the k=4 and auto rows stay out
    auto = entry["auto"]
    self.assertEqual((auto["chosen"], auto["best_explicit"]), ("xla", "function"))
    self.assertAllClose(auto["step_over_best"], 1.2)
    self.assertAllClose(auto["extra_s"], 12.0)  # 20 s measuring - xla's own 8 s compile
    # 500 steps of the chosen mode's own row (1.1 s) plus the extra, over 500 of the best (1 s)
    self.assertAllClose(auto["run_500_steps_over_best"], (12.0 + 550.0) / 500.0)
    self.assertEqual(entry["steps_per_execution_over_one"],
                     {"raw function k=4": 0.5, "keras fit k=4": 0.75})


  def test_each_policy_against_its_own_keras_and_float32_by_hand(self):
    def row(impl, mode, seconds, policy):
      return {"impl": impl, "mode": mode, "width": 0.25, "traced": False, "fast_conv": False,
              "steps_per_execution": 1, "step_s_median": seconds, "peak_fraction": 0.5,
              "dtype_policy": policy}
    result = {"results": [
        row("raw", "function", 1.0, "float32"), row("raw", "xla", 3.0, "mixed_bfloat16"),
        row("raw", "function", 2.0, "mixed_bfloat16"), row("keras", "fit", 2.0, "float32"),
        row("keras", "fit", 3.5, "mixed_bfloat16"), row("keras", "fit_xla", 3.0,
                                                          "mixed_bfloat16")]}
    plain, mixed = bench.ratios(result)
    self.assertEqual((plain["dtype_policy"], mixed["dtype_policy"]),
                     ("float32", "mixed_bfloat16"))
    self.assertAllClose(plain["exact_raw_over_keras"], 0.5)
    self.assertEqual((mixed["best_exact_raw"], mixed["best_keras"]), ("function", "fit_xla"))
    self.assertAllClose(mixed["exact_raw_over_keras"], 2.0 / 3.0)
    self.assertAllClose(mixed["over_float32"], {"exact_raw": 2.0, "keras": 1.5})
    self.assertNotIn("over_float32", plain)


class ProfileScriptTest(tf.test.TestCase):

  def test_tiny_profile_run(self):
    env = dict(os.environ, PYTHONPATH=ROOT)
    with tempfile.TemporaryDirectory() as out:
      result = subprocess.run(
          [sys.executable, os.path.join(ROOT, "scripts", "profile_xla.py"), "--widths=1/64",
           "--batch_size=32", "--steps=2", "--warmup=0", "--rounds=1",
           "--raw_modes=function", "--keras_jit=false", "--steps_per_execution=1",
           "--dtype_policy=float32,mixed_bfloat16", "--nobreakdown", f"--out_dir={out}",
           f"--profile_dir={out}/trace"], capture_output=True, text=True, env=env, timeout=600)
      self.assertEqual(result.returncode, 0, result.stderr)
      with open(os.path.join(out, "profile.json")) as f:
        profile = json.load(f)
      self.assertGreater(profile["matmul_peak_gflops"], 0)
      self.assertIn("device", profile)
      rows = profile["results"]
      # (the auto rows' arithmetic is checked by hand in RatiosTest: measuring costs compiles)
      one_policy = [("raw", "function", False, False, 1), ("raw", "function", True, False, 1),
                    ("keras", "fit", False, False, 1)]
      self.assertEqual([(r["impl"], r["mode"], r["fast_conv"], r["traced"],
                         r["steps_per_execution"]) for r in rows], one_policy * 2)
      self.assertEqual([r["dtype_policy"] for r in rows], ["float32"] * 3 + ["mixed_bfloat16"] * 3)
      self.assertEqual([e["dtype_policy"] for e in profile["ratios"]],
                       ["float32", "mixed_bfloat16"])
      self.assertIn("over_float32", profile["ratios"][1])
      self.assertNotIn("breakdown", profile)
      for row in rows:
        for key in ("width", "batch_size", "compile_s", "step_s_median", "images_per_s",
                    "gflops", "peak_fraction"):
          self.assertGreater(row[key], 0, msg=key)
        self.assertAllClose(row["images_per_s"], 32 / row["step_s_median"], rtol=1e-6)
        self.assertLessEqual(row["peak_fraction"], 1.5)  # a sane share of the measured ceiling
      self.assertIn("raw_over_keras", profile["ratios"][0])
      self.assertIn("best raw", result.stdout)
      if importlib.util.find_spec("xprof") is None:  # the optional extra
        self.assertIsNone(profile["op_stats"])
      else:  # the float32 function step's ops keep their names: BN shows per layer
        table, = profile["op_stats"]
        self.assertEqual(table["mode"], "function")
        self.assertTrue(table["top_ops"])
        self.assertIsNotNone(table["bn_layers"]["bn_3"])

  def test_hlo_before_and_after_optimisation(self):
    step = tf.function(lambda x, y: tf.reduce_sum(tf.matmul(x, y)), jit_compile=True)
    x = tf.ones((4, 4))
    with tempfile.TemporaryDirectory() as out:
      bench.write_hlo(step, x, x, out, "tiny")
      self.assertEqual(sorted(os.listdir(out)), ["tiny.hlo.txt", "tiny.optimized_hlo.txt"])
      with open(os.path.join(out, "tiny.hlo.txt")) as f:
        self.assertIn("dot(", f.read())


if __name__ == "__main__":
  tf.test.main()
