"""Long runs that lose nothing: resume equivalence, SIGINT, the NaN guard, mismatched resumes."""

import json
import os
import signal
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf

from bnraw import training
from bnraw.config import DataConfig, ModelConfig, TrainConfig
from bnraw.core.loop import NonFiniteError
from bnraw.errors import UsageError
from bnraw.tracing.store import Trace
from bnraw.models.workload import from_seed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = ModelConfig(width=1 / 32)
TRAIN = TrainConfig(batch_size=96, epochs=3, mode="function")  # 3 steps per epoch


def interrupt_at(step):
  """An on_step callback that delivers SIGINT to this process after ``step``."""
  def on_step(record):
    if record.step == step:
      os.kill(os.getpid(), signal.SIGINT)
  return on_step


class ResumeTest(tf.test.TestCase):

  def test_interrupted_and_resumed_equals_uninterrupted(self):
    # Under mixed_float16, so the loss scale, its counter and the skipped steps (Keras's 2**15
    # overflows the first steps' gradients here) must come back from the checkpoint too.
    model = ModelConfig(width=1 / 64, dtype_policy="mixed_float16")
    with tempfile.TemporaryDirectory() as whole, tempfile.TemporaryDirectory() as parts:
      reference = training.run(from_seed(DataConfig(), model, TRAIN), out_dir=whole, trace=True,
                               progress=False)
      self.assertBetween(reference["loss_scaling"]["skipped_steps"], 1, 8)
      for stop_step in (4, 6):  # mid-epoch, then end of an epoch
        first = training.run(from_seed(DataConfig(), model, TRAIN), out_dir=parts, trace=True,
                             progress=False, on_step=interrupt_at(stop_step),
                             resume=stop_step == 6)
        self.assertEqual(first["status"], "interrupted")
        self.assertFalse(first["complete"])
        self.assertEqual(first["steps_done"], stop_step + 1)
        self.assertEqual(first["signal"], signal.SIGINT)
      resumed = training.run(from_seed(DataConfig(), model, TRAIN), out_dir=parts, trace=True,
                             progress=False, resume=True)
      self.assertEqual(resumed["status"], "complete")
      self.assertEqual(resumed["loss_scaling"], reference["loss_scaling"])
      self.assertEqual(resumed["steps_done"], 9)  # skipped steps count as steps
      self.assertEqual(resumed["history"], reference["history"])  # bit-identical, float32 means
      self.assertEqual(resumed["evaluate"], reference["evaluate"])
      a, b = Trace.load(whole), Trace.load(parts)
      self.assertAllEqual(b.steps, np.arange(9))  # no gaps, no duplicates
      for key, value in a.arrays.items():
        self.assertAllEqual(b.arrays[key], value, msg=key)

  def test_auto_mode_is_measured_once_and_kept_on_resume(self):
    auto = TrainConfig(batch_size=96, epochs=3, mode="auto", steps_per_execution=2)
    with tempfile.TemporaryDirectory() as whole, tempfile.TemporaryDirectory() as parts:
      first = training.run(from_seed(DataConfig(), MODEL, auto), out_dir=parts, progress=False,
                           on_step=interrupt_at(3))  # steps 3 and 4 are one call: stops after 4
      self.assertEqual(first["steps_done"], 5)
      chosen = first["resolved"]["mode"]
      self.assertEqual(first["autotune"]["choice"], chosen)
      self.assertEqual(set(first["autotune"]["candidates"]), {"function", "xla"})
      resumed = training.run(from_seed(DataConfig(), MODEL, auto), out_dir=parts, progress=False,
                             resume=True)
      self.assertEqual(resumed["resolved"]["mode"], chosen)
      self.assertTrue(resumed["autotune"]["reused"])
      # the uninterrupted run in the chosen mode, one step per call: the same run, bit for bit
      explicit = TrainConfig(batch_size=96, epochs=3, mode=chosen)
      reference = training.run(from_seed(DataConfig(), MODEL, explicit), out_dir=whole, progress=False)
      self.assertIsNone(reference["autotune"])
      self.assertEqual(resumed["history"], reference["history"])
      self.assertEqual(resumed["evaluate"], reference["evaluate"])

  def test_checkpoint_every_and_longer_resume(self):
    with tempfile.TemporaryDirectory() as out:
      training.run(from_seed(DataConfig(), MODEL, TRAIN), out_dir=out, progress=False,
                   checkpoint_every=1)
      with open(os.path.join(out, "run_state.json")) as f:
        state = json.load(f)
      self.assertEqual(state["status"], "complete")
      self.assertEqual(state["state"]["epoch"], 3)
      longer = TrainConfig(batch_size=96, epochs=5, mode="function")
      more = training.run(from_seed(DataConfig(), MODEL, longer), out_dir=out, progress=False,
                          resume=True)
      self.assertLen(more["history"]["loss"], 5)
      self.assertEqual(more["steps_done"], 15)

  def test_a_run_from_before_a_setting_existed_resumes(self):
    from bnraw import config as configs
    from bnraw.training.checkpoint import check_config
    now = configs.record(DataConfig(), MODEL, TRAIN, trace=False)
    before = json.loads(json.dumps(now))
    del before["model"]["dtype_policy"], before["train"]["loss_scale"]  # made before they were
    check_config(before, now)  # missing settings take their defaults: float32, no scaling
    mixed = configs.record(DataConfig(), ModelConfig(width=1 / 32, dtype_policy="mixed_float16"),
                           TRAIN, trace=False)
    with self.assertRaisesRegex(UsageError, "model.dtype_policy"):
      check_config(before, mixed)

  def test_mismatched_resume_is_refused(self):
    with tempfile.TemporaryDirectory() as out:
      training.run(from_seed(DataConfig(), MODEL, TRAIN), out_dir=out, progress=False)
      fewer = TrainConfig(batch_size=96, epochs=2, mode="function")
      with self.assertRaisesRegex(UsageError, r"^epochs: the run has done 3 epochs already"):
        training.run(from_seed(DataConfig(), MODEL, fewer), out_dir=out, progress=False, resume=True)
      other = TrainConfig(batch_size=96, epochs=3, mode="function", lr=0.01)
      with self.assertRaisesRegex(UsageError, r"^resume: .*train\.lr \(run: 0.001, now: 0.01\)"):
        training.run(from_seed(DataConfig(), MODEL, other), out_dir=out, progress=False, resume=True)
      with self.assertRaisesRegex(UsageError, "nothing to resume"):
        training.run(from_seed(DataConfig(), MODEL, TRAIN), out_dir=os.path.join(out, "new"),
                     progress=False, resume=True)

  def test_non_finite_is_caught_with_step_and_layer(self):
    with tempfile.TemporaryDirectory() as out:
      wild = TrainConfig(batch_size=96, epochs=3, mode="xla", optimizer="sgd", lr=1e12)
      with self.assertRaises(NonFiniteError) as caught:
        training.run(from_seed(DataConfig(), MODEL, wild), out_dir=out, trace=True, progress=False)
      with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
      self.assertEqual(summary["status"], "non_finite")
      self.assertEqual(caught.exception.step, summary["non_finite"]["step"])
      bad = summary["non_finite"]
      self.assertGreater(bad["step"], 0)
      self.assertRegex(bad["where"], r"^(bn_[1-8]|the loss)$")
      trace = Trace.load(out)
      self.assertAllEqual(trace.steps, np.arange(bad["step"]))  # everything before it, kept
      self.assertTrue(np.isfinite(trace.arrays["loss"]).all())
      self.assertFalse(os.path.exists(os.path.join(out, "run_state.json")))  # no NaN checkpoint


class SignalScriptTest(tf.test.TestCase):
  """The command line and the library record the same typed settings, so a run started by one
  resumes through the other and repeats the uninterrupted run bit for bit."""

  ARGS = ["--width=1/32", "--mode=function", "--batch_size=128"]
  TRAIN = TrainConfig(batch_size=128, epochs=3, mode="function")

  def reference(self, out, epochs):
    train = TrainConfig(batch_size=128, epochs=epochs, mode="function")
    return training.run(from_seed(DataConfig(), MODEL, train), out_dir=out, progress=False)

  def script(self, *args, **kwargs):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return [sys.executable, os.path.join(ROOT, "scripts", "train.py"), *self.ARGS, *args], env

  def test_sigint_to_cli_run_resumes_through_the_library_and_that_through_the_cli(self):
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as whole:
      args, env = self.script("--epochs=400", f"--out_dir={out}")
      child = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
      lines = []
      for line in child.stderr:  # non-tty progress: a line at epoch 1, then every 20
        lines.append(line)
        if line.startswith("epoch 1/400"):
          child.send_signal(signal.SIGINT)
          break
      rest = child.communicate(timeout=120)[1]
      self.assertEqual(child.returncode, 128 + signal.SIGINT, "".join(lines) + rest)
      self.assertIn("--resume", rest)
      self.assertNotIn("Traceback", rest)
      with open(os.path.join(out, "summary.json")) as f:
        self.assertEqual(json.load(f)["status"], "interrupted")
      with open(os.path.join(out, "run_state.json")) as f:  # the signal lands a step or more
        epochs = json.load(f)["state"]["epoch"] + 2  # after the line: finish the next epoch
      resumed = training.resume(out, epochs=epochs, progress=False)
      self.assertEqual(resumed["status"], "complete")
      # the library's run goes on through the command line, one epoch more
      args, env = self.script(f"--epochs={epochs + 1}", f"--out_dir={out}", "--resume")
      done = subprocess.run(args, capture_output=True, text=True, env=env)
      self.assertEqual(done.returncode, 0, done.stderr)
      with open(os.path.join(out, "summary.json")) as f:
        longer = json.load(f)
      reference = self.reference(whole, epochs + 1)
      self.assertEqual(resumed["config"], dict(reference["config"], train=dict(
          reference["config"]["train"], epochs=epochs)))
      self.assertEqual(longer["config"], reference["config"])
      self.assertEqual(resumed["history"]["loss"], reference["history"]["loss"][:epochs])
      self.assertEqual(longer["history"], reference["history"])
      self.assertEqual(longer["evaluate"], reference["evaluate"])

  def test_non_finite_exit_status(self):
    env = dict(os.environ, PYTHONPATH=ROOT)
    with tempfile.TemporaryDirectory() as out:
      result = subprocess.run(
          [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--width=1/32",
           "--mode=function", "--epochs=3", "--optimizer=sgd", "--lr=1e12", f"--out_dir={out}"],
          capture_output=True, text=True, env=env)
      self.assertEqual(result.returncode, 3, result.stderr)
      self.assertRegex(result.stderr, r"non-finite value at step \d+, first in (bn_\d|the loss)")


if __name__ == "__main__":
  tf.test.main()
