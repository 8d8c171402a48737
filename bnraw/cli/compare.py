"""Runs the raw path and real Keras ``model.fit`` in lockstep; writes compare.json.

  bnraw-compare --width=1/16 --epochs=20 --out_dir=runs/compare
  bnraw-compare --keras_model=model.keras --data=train.npz --epochs=2 --out_dir=runs/mine

With --keras_model: that model's raw twin against that model's own fit, from its saved weights
and optimizer state.

Prints a per-step table (relative differences of loss, moving statistics, weight update and
weights) and the first step where a gated metric exceeds its tolerance.
"""

from absl import flags

from bnraw.cli import app
from bnraw.cli import flags as common

common.define_common_flags(out_dir="runs/compare", trace=False)
flags.FLAGS.set_default("epochs", 20)
flags.DEFINE_enum("reference", "keras3", ["keras3", "tf_keras"], "Keras 3 (keras), or Keras 2 "
                  "(the optional tf_keras package; its fused BN implies --bessel on conv layers).")
flags.DEFINE_bool("synced", True, "Reset the raw side to Keras's state before every step "
                  "(--nosynced: both run free from the same start).")
flags.DEFINE_float("perturb", 0.0, "With --nosynced: multiply the raw initial weights by "
                   "1 +- this, to measure how fast a tiny difference grows.")
flags.register_validator("perturb", lambda v: 0 <= v < 1, message="must be in [0, 1)")
flags.register_multi_flags_validator(
    ["perturb", "synced"], lambda f: not (f["perturb"] and f["synced"]),
    message="--perturb needs --nosynced (a synced step starts from Keras's state)")
common.define_keras_model_flags("Compare")
FLAGS = flags.FLAGS


def check(argv):
  common.reject_extra_args(argv)
  if FLAGS.keras_model:
    common.refuse_present(("reference", "perturb"), "compares a --keras_model with its own "
                          "Keras 3 fit, synced or free-running")
    common.check_keras_model_setup(replicas=True)
    return
  common.check_seed_setup(replicas=True)
  from bnraw.models.keras_bridge import check_comparable
  _, model, train = common.configs(resolve=False)
  check_comparable(model, train, FLAGS.reference)
  if FLAGS.reference == "tf_keras":
    common.refuse_present(("bessel", "bessel_scope"), "--reference=tf_keras sets it (its fused "
                          "conv BN is Bessel-corrected, its dense BN is not)")


def main(argv):
  from bnraw import parity
  reference = "keras3" if FLAGS.keras_model else FLAGS.reference
  parity.check(reference, FLAGS.synced, FLAGS.perturb)
  result = parity.run(common.workload(reference), out_dir=FLAGS.out_dir, synced=FLAGS.synced,
                      perturbation=FLAGS.perturb, overwrite=FLAGS.overwrite)
  print(parity.report(result))
  print(f"wrote {FLAGS.out_dir}/compare.json")


def console():
  app.run(main, check)


if __name__ == "__main__":
  console()
