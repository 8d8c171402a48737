"""The scripts end to end, and every bad input: one line, exit status 2, nothing written."""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--width=1/64", "--mode=function"]


def run_script(name, *args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *args],
                        capture_output=True, text=True, env=env, timeout=300)


class TrainScriptTest(tf.test.TestCase, parameterized.TestCase):

  def test_train_writes_summary(self):
    with tempfile.TemporaryDirectory() as out:
      result = run_script("train.py", *TINY, "--epochs=2", "--batch_size=128", f"--out_dir={out}",
                          "--noprogress")
      self.assertEqual(result.returncode, 0, result.stderr)
      with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
      self.assertEqual(summary["config"]["train"]["epochs"], 2)
      self.assertEqual(summary["config"]["model"]["width"], 1 / 64)  # typed, as the library's
      self.assertLen(summary["history"]["loss"], 2)
      self.assertLen(summary["history"]["accuracy"], 2)
      self.assertTrue(np.isfinite(summary["evaluate"]["loss"]))
      self.assertGreater(summary["parameters"], 0)
      self.assertNotIn("epoch", result.stderr)  # --noprogress: no epoch lines (on by default)
      self.assertEqual(sorted(os.listdir(out)), ["checkpoints", "run_state.json", "summary.json"])
      self.assertTrue(summary["complete"])

  def test_diagnose_prints_report_and_writes_contract(self):
    with tempfile.TemporaryDirectory() as out:
      result = run_script("diagnose.py", "--width=1/64", "--mode=auto", "--epochs=3",
                          "--momentum=0", "--fix=precise_bn", f"--out_dir={out}")
      self.assertEqual(result.returncode, 0, result.stderr)
      self.assertRegex(result.stderr, r"auto mode: (function|xla) \(function [0-9.]+ ms/step, "
                       r"xla [0-9.]+ ms/step; [0-9.]+ s to measure\)")
      self.assertIn("epoch 3/3", result.stderr)  # progress lines by default
      for needle in ("fit printed", "evaluate gives", "stale_statistics", "dominant cause:",
                     "fix:", "fixed model: evaluate loss"):
        self.assertIn(needle, result.stdout)
      with open(os.path.join(out, "diagnosis.json")) as f:
        d = json.load(f)
      for key in ("losses", "attribution", "per_layer", "accuracy"):
        self.assertIn(key, d)
      self.assertEqual(d["resolved"]["mode"], d["autotune"]["choice"])
      self.assertEqual(set(d["accuracy"]), {"fit", "train_mode_final", "precise_bn",
                                            "last_batch_stats", "no_bessel", "evaluate"})

  def test_compare_writes_contract(self):
    with tempfile.TemporaryDirectory() as out:
      result = run_script("compare.py", *TINY, "--epochs=2", f"--out_dir={out}")
      self.assertEqual(result.returncode, 0, result.stderr)
      self.assertIn("loss rel", result.stdout)
      with open(os.path.join(out, "compare.json")) as f:
        c = json.load(f)
      self.assertEqual(c["reference"], "keras3")
      self.assertTrue(c["synced"])
      self.assertIsNone(c["first_divergent_step"])
      self.assertLen(c["steps"], 2)
      self.assertEqual(set(c["steps"][0]) >= {
          "step", "loss_raw", "loss_keras", "loss_rel_diff", "moving_mean_max_rel_diff",
          "moving_variance_max_rel_diff", "update_rel_l2_diff", "weights_max_rel_diff"}, True)
      self.assertEqual(set(c["evaluate"]) >= {"raw", "keras"}, True)

  def test_sweep_prints_the_summary(self):
    with tempfile.TemporaryDirectory() as out:
      result = run_script("sweep.py", *TINY, "--epochs=1", "--seeds=0-1", "--momenta=0,0.9",
                          f"--out_dir={out}")
      self.assertEqual(result.returncode, 0, result.stderr)
      self.assertIn("run 4/4", result.stderr)
      for momentum in ("0", "0.9"):
        self.assertIn(f"case 2, momentum {momentum}, width 1/64: 2 seeds", result.stdout)
      with open(os.path.join(out, "sweep.json")) as f:
        swept = json.load(f)
      self.assertLen(swept["runs"], 4)
      self.assertEqual(swept["modes"], ["function"])

  def test_user_model_failure_is_one_line(self):
    with tempfile.TemporaryDirectory() as tmp:
      corrupt, data = os.path.join(tmp, "m.keras"), os.path.join(tmp, "d.npz")
      with open(corrupt, "w") as f:
        f.write("not a model")
      np.savez(data, x=np.zeros((2, 3)), y=np.zeros(2))
      result = run_script("diagnose.py", f"--keras_model={corrupt}", f"--data={data}",
                          f"--out_dir={tmp}/out")
      self.assertEqual(result.returncode, 2, result.stderr)
      line, = result.stderr.strip().splitlines()
      self.assertIn(f"--keras_model: {corrupt} is not a valid .keras file", line)
      self.assertFalse(os.path.exists(f"{tmp}/out"))

  def test_diagnose_flag_pairs(self):
    result = run_script("diagnose.py", "--keras_model=m.keras")
    self.assertEqual(result.returncode, 2)
    self.assertIn("--keras_model and --data go together", result.stderr)

  @parameterized.named_parameters(
      ("negative_width", ["--width=-1"], "--width"),
      ("zero_width", ["--width=0"], "--width"),
      ("bad_width", ["--width=wide"], "--width"),
      ("momentum_high", ["--momentum=1.5"], "--momentum"),
      ("momentum_low", ["--momentum=-0.1"], "--momentum"),
      ("epsilon", ["--epsilon=0"], "--epsilon"),
      ("batch_zero", ["--batch_size=0"], "--batch_size"),
      ("batch_too_big", ["--batch_size=257"], "--batch_size"),
      ("epochs", ["--epochs=0"], "--epochs"),
      ("mode", ["--mode=fast"], "--mode"),
      ("case", ["--case=3"], "--case"),
      ("optimizer", ["--optimizer=rmsprop"], "--optimizer"),
      ("block", ["--block=20:40"], "--block"),
      ("bessel_batch_of_one", ["--bessel", "--batch_size=5"], "--bessel"),
      ("dtype_policy", ["--dtype_policy=float64"], "--dtype_policy"),
      ("loss_scale_zero", ["--dtype_policy=mixed_float16", "--loss_scale=0"], "--loss_scale"),
      ("stray_argument", ["extra"], "unexpected arguments"),
  )
  def test_bad_flag(self, args, needle):
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "out")
      result = run_script("train.py", *args, f"--out_dir={out}")
      self.assertEqual(result.returncode, 2, result.stderr)
      lines = result.stderr.strip().splitlines()
      self.assertLen(lines, 1, result.stderr)
      self.assertIn(needle, lines[0])
      self.assertNotIn("Traceback", result.stderr)
      self.assertFalse(os.path.exists(out))

  @parameterized.named_parameters(
      ("diagnose_keras_trace", "diagnose.py", ["--impl=keras", "--trace"], "--impl=raw"),
      ("diagnose_keras_multi_step", "diagnose.py", ["--impl=keras", "--steps_per_execution=2"],
       "--steps_per_execution > 1 needs --impl=raw"),
      ("train_zero_steps_per_execution", "train.py", ["--steps_per_execution=0"],
       "--steps_per_execution=0: 0 is not a positive integer"),
      ("profile_keras_auto_alone", "profile_xla.py", ["--raw_modes=function", "--keras_jit=auto"],
       "keras_jit: auto follows the raw auto mode's choice"),
      ("compare_has_no_trace", "compare.py", ["--trace"], "Unknown command line flag 'trace'"),
      ("image_size_not_two_numbers", "diagnose.py",
       ["--keras_model=m.keras", "--data=d", "--image_size=64"], "expected HEIGHT,WIDTH"),
      ("image_size_without_data", "train.py", ["--image_size=8,8"],
       "--image_size sets the size a --data folder"),
      ("precise_bn_batches_zero", "diagnose.py", ["--precise_bn_batches=0"],
       "--precise_bn_batches"),
      ("perturb_synced", "compare.py", ["--perturb=1e-6"], "--perturb needs --nosynced"),
      ("seed_flag_with_keras_model", "diagnose.py",
       ["--keras_model=m.keras", "--data=d.npz", "--momentum=0"], "--momentum: describes"),
      ("every_with_keras_model", "diagnose.py",
       ["--keras_model=m.keras", "--data=d.npz", "--every=2"], "--every: describes"),
      ("block_with_case_1", "train.py", ["--case=1", "--block=3:9"], "--block: case 1"),
      ("scope_without_bessel", "train.py", ["--bessel_scope=conv"], "--bessel_scope: only"),
      ("nesterov_with_adam", "diagnose.py", ["--nonesterov"], "--nesterov: only applies"),
      ("above_without_where", "inspect_trace.py", ["--run_dir=x", "--above=3"], "--above: "),
      ("step_with_where", "inspect_trace.py",
       ["--run_dir=x", "--where=mean_gap", "--above=1", "--step=2"], "--step: "),
      ("hlo_without_xla", "profile_xla.py", ["--raw_modes=function", "--hlo_dir=h"],
       "--hlo_dir: needs xla"),
      ("sweep_seed_and_seeds", "sweep.py", ["--seeds=0-3", "--seed=2"], "--seed: --seeds"),
      ("sweep_image_case_1", "sweep.py", ["--cases=1", "--block=3:9"], "--block: case 1"),
      ("sweep_bad_seeds", "sweep.py", ["--seeds=3-x"], "--seeds: expected e.g. 0-9"),
      ("resume_and_overwrite", "train.py", ["--resume", "--overwrite"], "--overwrite: --resume"),
      ("tf_keras_sets_bessel", "compare.py", ["--reference=tf_keras", "--bessel"],
       "--bessel: --reference=tf_keras sets it"),
      ("loss_scale_without_float16", "train.py", ["--dtype_policy=mixed_bfloat16",
                                                  "--loss_scale=1024"],
       "--loss_scale: only applies with --dtype_policy=mixed_float16"),
      ("compare_l2_multi_step", "compare.py", ["--l2=1e-4", "--steps_per_execution=2"],
       "--l2: with --steps_per_execution > 1 cannot be compared"),
      ("tf_keras_l2", "compare.py", ["--reference=tf_keras", "--l2=1e-4"],
       "--l2: compares against Keras 3 only"),
      ("tf_keras_mixed", "compare.py", ["--reference=tf_keras", "--dtype_policy=mixed_float16"],
       "--dtype_policy: mixed precision compares against Keras 3 only"),
  )
  def test_meaningless_flags_are_refused_before_any_work(self, script, args, needle):
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "out")
      has_out_dir = script != "inspect_trace.py"
      result = run_script(script, *args, *([f"--out_dir={out}"] if has_out_dir else []))
      self.assertEqual(result.returncode, 2, result.stderr)
      lines = result.stderr.strip().splitlines()
      self.assertLen(lines, 1, result.stderr)
      self.assertIn(needle, lines[0])
      self.assertFalse(os.path.exists(out))

  def test_bad_inputs_refused_before_any_work(self):
    with tempfile.TemporaryDirectory() as tmp:
      not_image = os.path.join(tmp, "x.png")
      with open(not_image, "w") as f:
        f.write("text")
      blocker = os.path.join(tmp, "file")
      open(blocker, "w").close()
      earlier = os.path.join(tmp, "earlier")
      os.makedirs(os.path.join(earlier, "checkpoints"))
      open(os.path.join(earlier, "summary.json"), "w").close()
      cases = [([f"--image={tmp}/missing.jpg"], "--image: no such file"),
               ([f"--image={not_image}"], "--image: not an image"),
               ([f"--out_dir={blocker}/sub"], "--out_dir"),
               ([f"--out_dir={blocker}"], "--out_dir"),
               ([f"--out_dir={earlier}"], f"--out_dir: {earlier} holds an earlier run "
                "(summary.json, checkpoints); choose another folder, or overwrite it")]
      for args, needle in cases:
        out = os.path.join(tmp, "out")
        result = run_script("train.py", *TINY, "--epochs=1", f"--out_dir={out}", *args)
        self.assertEqual(result.returncode, 2, result.stderr)
        line, = result.stderr.strip().splitlines()
        self.assertEqual(line.split("error: ")[-1][:len(needle)], needle, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertFalse(os.path.exists(out))


if __name__ == "__main__":
  tf.test.main()
