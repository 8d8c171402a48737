"""Runs the raw path and real Keras ``model.fit`` in lockstep; writes compare.json.

  python scripts/compare.py --width=1/16 --epochs=20 --out_dir=runs/compare

Prints a per-step table (relative differences of loss, moving statistics, weight update and
weights) and the first step where a gated metric exceeds its tolerance.
"""

from absl import flags

from bnraw import cli

cli.define_common_flags(out_dir="runs/compare")
flags.FLAGS.set_default("epochs", 20)
flags.DEFINE_enum("reference", "keras3", ["keras3", "tf_keras"], "Keras 3 (keras), or Keras 2 "
                  "(the optional tf_keras package; its fused BN implies --bessel on conv layers).")
flags.DEFINE_bool("synced", True, "Reset the raw side to Keras's state before every step "
                  "(--nosynced: both run free from the same start).")
flags.DEFINE_float("perturb", 0.0, "With --nosynced: multiply the raw initial weights by "
                   "1 +- this, to measure how fast a tiny difference grows.")
flags.register_validator("perturb", lambda v: 0 <= v < 1, message="must be in [0, 1)")
FLAGS = flags.FLAGS


def main(argv):
  cli.reject_extra_args(argv)
  if FLAGS.reference == "tf_keras":
    import importlib.util
    if importlib.util.find_spec("tf_keras") is None:
      raise cli.UsageError("reference", "tf_keras is not installed (pip install tf_keras)")
  import os
  from bnraw import compare, io
  data, model, train = cli.configs()
  result = compare.run(data, model, train, reference=FLAGS.reference, synced=FLAGS.synced,
                       perturbation=FLAGS.perturb)
  result["config"] = cli.flag_values(["reference", "synced", "perturb"])
  io.prepare_out_dir(FLAGS.out_dir)
  io.write_json(os.path.join(FLAGS.out_dir, "compare.json"), result)
  print(compare.format_table(result["steps"]))
  print(compare.summary_lines(result))
  print(f"wrote {FLAGS.out_dir}/compare.json")


def console():
  cli.run(main)


if __name__ == "__main__":
  console()
