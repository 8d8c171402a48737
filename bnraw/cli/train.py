"""Trains the seed network with the raw path; writes summary.json (and trace.npz with --trace).

  bnraw-train --case=2 --epochs=500 --out_dir=runs/train
  bnraw-train --keras_model=model.keras --data=train.npz --epochs=5 --out_dir=runs/mine

On many workers (TF_CONFIG; bnraw-launch starts local ones) every worker runs this same command
with --replicas = the workers' devices in all; the chief alone writes --out_dir.

With --keras_model: that model's raw twin trains from its saved weights and optimizer state, with
its compiled optimizer and loss, and the trained model is written as trained.keras.

Prints a progress line per epoch, then what fit printed last and what evaluate gives.
"""

import sys

from absl import flags

from bnraw import cluster as clusters
from bnraw.cli import app
from bnraw.cli import flags as common
from bnraw.errors import UsageError

common.define_common_flags(out_dir="runs/train", trace=True)
flags.DEFINE_string("break_at", None, "LAYER:STEP, e.g. bn_3:41: stop in the Python debugger "
                    "inside that layer's moving-average update at that step (that step runs "
                    "eagerly, the others in --mode).")
flags.DEFINE_integer("checkpoint_every", 0, "Also checkpoint every K epochs (0: only at the end "
                     "and on interruption).", lower_bound=0)
flags.DEFINE_bool("resume", False, "Continue the run in --out_dir from its last checkpoint (the "
                  "settings must match; --epochs may grow).")
common.define_keras_model_flags("Train")
FLAGS = flags.FLAGS


def check(argv):
  common.reject_extra_args(argv)
  if FLAGS.keras_model:
    common.check_keras_model_setup(resume=FLAGS.resume, replicas=True)
  else:
    common.check_seed_setup(resume=FLAGS.resume, replicas=True, multi_worker=True)
  if FLAGS.break_at:
    common.parse_break_at(FLAGS.break_at)
    if FLAGS.replicas > 1:
      raise UsageError("break_at", "stops one device's step; runs with --replicas=1")


def main(argv):
  from bnraw import training
  break_at = common.parse_break_at(FLAGS.break_at) if FLAGS.break_at else None
  summary = training.run(common.workload(), out_dir=FLAGS.out_dir, trace=FLAGS.trace,
                         break_at=break_at, checkpoint_every=FLAGS.checkpoint_every,
                         resume=FLAGS.resume, overwrite=FLAGS.overwrite,
                         histogram_every=FLAGS.histogram_every, progress=FLAGS.progress)
  if summary["status"] == "interrupted":
    print(f"interrupted after step {summary['steps_done'] - 1}; checkpoint and summary.json "
          f"(marked incomplete) are in {FLAGS.out_dir}. Resume with the same flags plus "
          f"--resume: {' '.join(a for a in sys.argv if a != '--resume')} --resume",
          file=sys.stderr)
    return app.exit_status_for_signal(summary["signal"])
  print(training.report(summary))
  cluster = clusters.from_environment()
  if clusters.is_chief(cluster):
    print(f"wrote {FLAGS.out_dir}/summary.json")
  else:
    print(f"{cluster.name(cluster.task_type, cluster.task_index)} done; the chief wrote "
          f"{FLAGS.out_dir}/summary.json")


def console():
  app.run(main, check)


if __name__ == "__main__":
  console()
