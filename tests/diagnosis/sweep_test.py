"""The sweep: each run is the standalone diagnosis, resumable, summarised in closed form."""

import json
import os
import tempfile

import tensorflow as tf

from bnraw import diagnosis
from bnraw.config import DataConfig, ModelConfig, TrainConfig
from bnraw.diagnosis import sweep
from bnraw.errors import UsageError
from bnraw.models.workload import from_seed

MODEL = ModelConfig(width=1 / 64, momentum=0.9)
TRAIN = TrainConfig(batch_size=256, epochs=2, mode="function")


class SweepTest(tf.test.TestCase):

  def test_runs_equal_standalone_diagnoses_and_resume_keeps_them(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "sweep")
      first = sweep.run(DataConfig(), MODEL, TRAIN, seeds=[3], cases=[1, 2], out_dir=out,
                        progress=False)
      self.assertLen(first["runs"], 2)
      with self.assertRaisesRegex(UsageError, "out_dir: .* holds an earlier run"):
        sweep.run(DataConfig(), MODEL, TRAIN, seeds=[3, 4], out_dir=out, progress=False)
      with self.assertRaisesRegex(UsageError, "resume: .* other train settings"):
        sweep.run(DataConfig(), MODEL, TrainConfig(batch_size=64, epochs=2, mode="function"),
                  seeds=[3, 4], cases=[1, 2], out_dir=out, resume=True, progress=False)
      # the second seed reuses the compiled step of the first, on re-initialised variables
      both = sweep.run(DataConfig(), MODEL, TRAIN, seeds=[3, 4], cases=[1, 2], out_dir=out,
                       resume=True, progress=False)
      self.assertEqual(both["runs"][:2], first["runs"])  # kept, not re-run (same timings)
      self.assertEqual([(r["case"], r["seed"]) for r in both["runs"]],
                       [(1, 3), (2, 3), (1, 4), (2, 4)])
      for case, seed in ((2, 4), (1, 3)):
        alone = diagnosis.run(from_seed(DataConfig(case=case), MODEL,
                                        TrainConfig(batch_size=256, epochs=2, mode="function",
                                                    seed=seed)),
                              out_dir=os.path.join(tmp, f"alone{case}{seed}"), progress=False)
        run, = [r for r in both["runs"] if (r["case"], r["seed"]) == (case, seed)]
        self.assertEqual(run["losses"], alone["losses"])
        self.assertEqual(run["attribution"], alone["attribution"])
      with open(os.path.join(out, sweep.SWEEP_FILE)) as f:
        saved = json.load(f)
      self.assertEqual(saved["runs"], json.loads(json.dumps(both["runs"])))

  def test_a_non_finite_run_is_recorded_and_the_sweep_goes_on(self):
    wild = TrainConfig(batch_size=256, epochs=3, mode="function", optimizer="sgd", lr=1e12)
    with tempfile.TemporaryDirectory() as tmp:
      result = sweep.run(DataConfig(), MODEL, wild, seeds=[0, 1], out_dir=tmp, progress=False)
    self.assertEqual([r["status"] for r in result["runs"]], ["non_finite", "non_finite"])
    self.assertRegex(result["runs"][0]["non_finite"]["where"], r"^(bn_[1-8]|the loss)$")
    self.assertEqual(result["summary"][0]["non_finite"], 2)

  def test_summary_closed_form(self):
    def fake(seed, evaluate, stale, ema):
      attribution = dict.fromkeys(sweep.PARTS, 0.0)
      attribution.update(stale_statistics=stale, ema_lag=ema, weight_update=-0.1)
      losses = {"fit": 1.0, "train_mode_final": 0.9, "precise_bn": 0.9, "evaluate": evaluate}
      return {"case": 2, "momentum": 0.9, "width": 0.0625, "seed": seed, "losses": losses,
              "attribution": attribution}
    runs = [fake(0, 1.2, 0.3, 0.0), fake(1, 0.95, 0.05, 0.5), fake(2, 2.0, 1.0, 0.1),
            fake(3, 0.5, 0.2, -0.6)]
    dead = fake(4, 5.5, 0.0, 0.0)  # chance level: no gap, no cause
    dead["attribution"]["weight_update"] = 0.0
    dead["losses"]["fit"] = 5.5
    summary, = sweep.summarize(runs + [{**dead, "status": "complete"},
                                       {**dead, "seed": 5, "status": "non_finite"}])
    self.assertEqual(summary["runs"], 5)
    self.assertEqual(summary["non_finite"], 1)
    self.assertEqual(summary["dominant_counts"]["none"], 1)
    self.assertEqual(summary["evaluate_above_fit"], 2)
    self.assertEqual(summary["dominant_counts"]["stale_statistics"], 2)
    self.assertEqual(summary["dominant_counts"]["ema_lag"], 2)
    stale = summary["statistics"]["stale_statistics"]  # 0, 0.05, 0.2, 0.3, 1.0
    self.assertAllClose([stale["q25"], stale["median"], stale["q75"]], [0.05, 0.2, 0.3])


if __name__ == "__main__":
  tf.test.main()
