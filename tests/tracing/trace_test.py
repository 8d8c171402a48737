"""The step trace: contents, npz round trip, summaries, the inspect script and the debug hook."""

import io
import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf

from bnraw import training
from bnraw.core.loop import fit
from bnraw.core.step import make_train_step
from bnraw.models import seed
from bnraw.config import DataConfig, ModelConfig, TrainConfig
from bnraw.cli.flags import parse_break_at
from bnraw.tracing.debugger import BreakAt
from bnraw.errors import UsageError
from bnraw.tracing.store import Trace, TraceRecorder, summarize
from bnraw.models.workload import from_seed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = ModelConfig(width=1 / 32)
TRAIN = TrainConfig(batch_size=128, epochs=1, mode="function")


class TraceTest(tf.test.TestCase):

  def test_recorded_trace_matches_variables_and_round_trips(self):
    parts = seed.build(DataConfig(), MODEL, TRAIN)
    recorder = TraceRecorder([layer.name for layer in parts.model.batch_norms], MODEL.epsilon)
    snapshots = []

    def on_step(record):
      recorder(record)
      snapshots.append([(l.moving_mean.numpy(), l.moving_variance.numpy())
                        for l in parts.model.batch_norms])

    fit(parts.model, parts.optimizer, parts.data.images, parts.data.labels,
             batch_size=128, epochs=1, seed=0, mode="function", trace=True, on_step=on_step)
    with tempfile.TemporaryDirectory() as tmp:
      recorder.save(os.path.join(tmp, "trace.npz"))
      trace = Trace.load(tmp)
    self.assertAllEqual(trace.steps, [0, 1])
    for step in (0, 1):
      for i, name in enumerate(trace.layers):
        at = trace.at(name, step)
        self.assertEqual(at.branch, "training")
        self.assertAllEqual(at.values["moving_mean_after"], snapshots[step][i][0])
        self.assertAllEqual(at.values["moving_variance_after"], snapshots[step][i][1])
        if step == 1:  # the update chains: after(0) == before(1)
          self.assertAllEqual(at.values["moving_mean_before"], snapshots[0][i][0])
        # Keras's update, in closed form, from the traced values
        expected = (0.9 * at.values["moving_mean_before"].astype(np.float64)
                    + 0.1 * at.values["batch_mean"])
        self.assertAllClose(at.values["moving_mean_after"], expected, rtol=1e-5, atol=1e-7)
    self.assertEqual(trace.series("bn_1", "batch_mean").shape, (2, 2))
    with self.assertRaisesRegex(KeyError, "not in trace"):
      trace.at("bn_1", 5)

  def test_summaries_closed_form(self):
    values = {"batch_mean": np.array([[1.0, 2.0]]), "moving_mean_before": np.array([[0.0, 2.5]]),
              "batch_variance": np.array([[0.01, 4.0]]),
              "moving_variance_before": np.array([[1.0, 1.0]])}
    s = summarize(values, epsilon=0.0)
    self.assertAllClose(s["mean_gap"], [1.0])
    self.assertAllClose(s["variance_gap"], [3.0])
    self.assertAllClose(s["min_batch_variance"], [0.01])
    self.assertAllClose(s["max_amplification"], [10.0])
    trace = Trace({"layers": np.array(["bn_1"]), "step": np.array([3, 4, 5]),
                   "bn_1/max_amplification": np.array([1.0, 20.0, 30.0])})
    self.assertEqual(trace.first_step_where("bn_1", "max_amplification", 10), 4)
    self.assertIsNone(trace.first_step_where("bn_1", "max_amplification", 50))


class DebugHookTest(tf.test.TestCase):

  def test_break_at_sees_the_traced_runs_values(self):
    # the steps before the break run in the run's own mode (function), so at the break the
    # batch and moving statistics are the ones a traced run recorded for that step
    seen = []

    def action(layer, moving, batch):
      seen.append((layer.name, layer.moving_mean.numpy().copy(), moving, batch))

    one_epoch = TrainConfig(batch_size=128, epochs=1, mode="function")  # steps 0 and 1
    # float16 loss scaling skips step 0 here: step numbers count it (Keras's iterations does
    # not), so the break lands at the step the trace calls 1
    model = ModelConfig(width=1 / 64, dtype_policy="mixed_float16")
    with tempfile.TemporaryDirectory() as traced, tempfile.TemporaryDirectory() as stopped:
      training.run(from_seed(DataConfig(), model, one_epoch), out_dir=traced, trace=True, progress=False)
      training.run(from_seed(DataConfig(), model, one_epoch), out_dir=stopped, progress=False,
                   break_at=("bn_3", 1), break_action=action)
      trace = Trace.load(traced)
      self.assertTrue(trace.arrays["skipped"][0])
      at = trace.at("bn_3", 1).values
    self.assertLen(seen, 1)
    name, variable_now, moving, batch = seen[0]
    self.assertEqual(name, "bn_3")
    self.assertAllEqual(variable_now, moving.mean)  # stopped *before* the assignment
    self.assertAllClose(moving.mean, at["moving_mean_before"], rtol=1e-6, atol=1e-7)
    self.assertAllClose(moving.variance, at["moving_variance_before"], rtol=1e-6)
    self.assertAllClose(batch.mean, at["batch_mean"], rtol=1e-6, atol=1e-7)
    self.assertAllClose(batch.variance, at["batch_variance"], rtol=1e-6)

  def test_pdb_opens_in_the_writers_frame(self):
    frames = []

    class FakePdb:
      def set_trace(self, frame):
        frames.append(frame)

    with tempfile.TemporaryDirectory() as tmp, mock.patch("pdb.Pdb", FakePdb), \
        mock.patch("sys.stdout", io.StringIO()):
      training.run(from_seed(DataConfig(), MODEL, TRAIN), out_dir=tmp, progress=False,
                   break_at=("bn_2", 1))
    frame, = frames
    self.assertEqual(frame.f_code.co_name, "_update_moving_statistics")
    self.assertLessEqual({"layer", "moving", "batch"}, set(frame.f_locals))
    self.assertEqual(frame.f_locals["layer"].name, "bn_2")

  def test_parse_and_bad_layer(self):
    self.assertEqual(parse_break_at("bn_2:7"), ("bn_2", 7))
    with self.assertRaisesRegex(UsageError, "break_at"):
      parse_break_at("bn_2")
    with tempfile.TemporaryDirectory() as tmp:
      with self.assertRaisesRegex(UsageError, "no BN layer 'bn_9'"):
        training.run(from_seed(DataConfig(), MODEL, TRAIN), out_dir=os.path.join(tmp, "o"),
                     progress=False, break_at=("bn_9", 0))
      self.assertFalse(os.path.exists(os.path.join(tmp, "o")))
      with self.assertRaisesRegex(UsageError, r"step 2 is not in this run \(steps 0..1\)"):
        training.run(from_seed(DataConfig(), MODEL, TRAIN), out_dir=os.path.join(tmp, "o"),
                     progress=False, break_at=("bn_1", 2))
      self.assertFalse(os.path.exists(os.path.join(tmp, "o")))

  def test_hook_needs_eager(self):
    parts = seed.build(DataConfig(), MODEL, TRAIN)
    hook = BreakAt("bn_1", 0, lambda: int(parts.optimizer.iterations.numpy()), lambda *a: None)
    with self.assertRaisesRegex(ValueError, "eager"):
      make_train_step(parts.model, parts.optimizer, mode="function", trace=False, hook=hook)


def read_events(log_dir):
  """``{tag: {step: value}}`` from the TensorBoard event files in ``log_dir`` (scalars as floats;
  histograms, text, images as their tensors)."""
  found = {}
  for name in os.listdir(log_dir):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(log_dir, name)):
      for value in event.summary.value:
        if value.HasField("simple_value"):  # scalars written as plain protobuf events
          found.setdefault(value.tag, {})[event.step] = value.simple_value
          continue
        array = tf.make_ndarray(value.tensor)
        numeric = array.dtype.kind in "fiu" and not array.ndim
        found.setdefault(value.tag, {})[event.step] = float(array) if numeric else array
  return found


class InspectScriptTest(tf.test.TestCase):

  def test_inspect_a_traced_run(self):
    env = dict(os.environ, PYTHONPATH=ROOT)
    script = lambda name: os.path.join(ROOT, "scripts", name)
    with tempfile.TemporaryDirectory() as out:
      train = subprocess.run([sys.executable, script("train.py"), "--width=1/64", "--epochs=2",
                              "--batch_size=128", "--mode=function", "--trace",
                              "--histogram_every=2", "--dtype_policy=mixed_float16",
                              f"--out_dir={out}"], capture_output=True, text=True, env=env)
      self.assertEqual(train.returncode, 0, train.stderr)
      events = read_events(os.path.join(out, "tensorboard"))
      trace = Trace.load(out)
      with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
      steps = list(range(4))  # 2 epochs of 2 batches
      for layer in trace.layers:
        for key in ("mean_gap", "variance_gap", "min_batch_variance", "max_amplification"):
          self.assertAllClose([events[f"{layer}/{key}"][k] for k in steps],
                              trace.series(layer, key), rtol=1e-6, msg=f"{layer}/{key}")
        for key in ("batch_mean", "batch_variance", "moving_mean_after", "moving_variance_after"):
          self.assertEqual(sorted(events[f"{layer}/{key}"]), [0, 2])  # --histogram_every=2
      self.assertAllClose([events["train/loss"][k] for k in steps], trace.arrays["loss"])
      # float16 loss scaling: the scale and the skipped flag per step, in both places
      self.assertEqual(trace.arrays["loss_scale"][0], 2.0 ** 15)
      for key in ("loss_scale", "skipped"):
        self.assertAllClose([events[f"train/{key}"][k] for k in steps], trace.arrays[key])
      skipped = int(trace.arrays["skipped"].sum())
      self.assertGreater(skipped, 0)
      self.assertEqual(summary["loss_scaling"]["skipped_steps"], skipped)
      self.assertIn(f"loss scaling: {skipped} of 4 steps skipped", train.stdout)
      self.assertAllClose(events["evaluate/loss"][4], summary["evaluate"]["loss"])
      shown = subprocess.run([sys.executable, script("inspect_trace.py"), f"--run_dir={out}",
                              "--layer=bn_2", "--step=3"], capture_output=True, text=True,
                             env=env)
      self.assertEqual(shown.returncode, 0, shown.stderr)
      self.assertIn("bn_2 at step 3 (epoch 2), branch: training", shown.stdout)
      self.assertIn("implied momentum 0.9", shown.stdout)
      self.assertIn(f"loss scale {trace.arrays['loss_scale'][3]:g}: ", shown.stdout)
      trace = Trace.load(out)
      self.assertIn(f"{trace.at('bn_2', 3).values['batch_mean'][0]:+.6g}", shown.stdout)
      where = subprocess.run([sys.executable, script("inspect_trace.py"), f"--run_dir={out}",
                              "--where=max_amplification", "--above=0"],
                             capture_output=True, text=True, env=env)
      self.assertIn("bn_8: max_amplification > 0 first at step 0", where.stdout)
      bad = subprocess.run([sys.executable, script("inspect_trace.py"), f"--run_dir={out}",
                            "--layer=bn_2", "--step=99"], capture_output=True, text=True, env=env)
      self.assertEqual(bad.returncode, 2)
      self.assertIn("--step: 99 is not in the trace", bad.stderr)


if __name__ == "__main__":
  tf.test.main()
