"""Why does evaluate disagree with fit? Trains the seed setup and splits the gap into causes.

  bnraw-diagnose --case=2 --momentum=0.9 --out_dir=runs/diagnose

Prints the gap, a table of six losses, the attribution to five named causes, the per-layer split,
the dominant cause and its fix; writes diagnosis.json and the same into TensorBoard
(OUT_DIR/tensorboard: curves, the report, the per-layer chart, amplification histograms). For your own trained Keras model:

  bnraw-diagnose --keras_model=model.keras --data=train.npz --out_dir=runs/mine
  bnraw-diagnose --keras_model=model.keras --data=train.npz --epochs=3 --out_dir=runs/mine

Without --epochs the saved model is diagnosed as it is (no history: evaluate, train_mode_final,
precise_bn); --epochs=K continues training it K epochs with its raw twin (its own optimizer and
loss, bit-identical to its fit) and gives the full five-way split.
"""

from absl import flags

from bnraw.cli import app
from bnraw.cli import flags as common

common.define_common_flags(out_dir="runs/diagnose", trace=True)
flags.DEFINE_enum("impl", "raw", ["raw", "keras"], "Train with the raw path or with real Keras "
                  "fit (same initial weights and batch order).")
flags.DEFINE_enum("fix", None, ["precise_bn"], "Apply a fix and report its evaluate: precise_bn "
                  "writes population statistics into the moving statistics and saves the model.")
flags.DEFINE_integer("every", 0, "Also compute the decomposition every K epochs (0: only at the "
                     "end); with --trace it goes to TensorBoard too.", lower_bound=0)
flags.DEFINE_integer("precise_bn_batches", None, "PreciseBN's statistics from the data's first K "
                     "batches (default: all of it; 1e3-1e4 examples are usually enough).",
                     lower_bound=1)
flags.DEFINE_bool("tensorboard", True, "Write the diagnosis to TensorBoard in --out_dir/"
                  "tensorboard: curves, the report, the per-layer chart, amplification histograms.")
common.define_keras_model_flags("Diagnose")
flags.register_multi_flags_validator(
    ["trace", "impl"], lambda f: not (f["trace"] and f["impl"] != "raw"),
    message="--trace records the raw step's statistics: it needs --impl=raw")
flags.register_multi_flags_validator(
    ["steps_per_execution", "impl"],
    lambda f: not (f["steps_per_execution"] > 1 and f["impl"] == "keras"),
    message="--steps_per_execution > 1 needs --impl=raw (Keras's diagnosis reads the model "
    "before each epoch's last step, which a multi-step execution hides)")
FLAGS = flags.FLAGS


def check(argv):
  common.reject_extra_args(argv)
  if FLAGS.keras_model:
    common.refuse_present(("impl", "trace", "every", "histogram_every"),
                          "describes the seed setup; it has no meaning with --keras_model")
    if not _twin_epochs():
      common.refuse_present(("seed", "mode", "steps_per_execution"), "only applies with "
                            "--epochs > 0 (training the model's raw twin)")
    common.check_keras_model_setup()
  else:
    common.check_seed_setup(replicas=True)
    if FLAGS.replicas > 1:
      common.refuse_present(("impl", "trace", "every", "histogram_every", "tensorboard"),
                            "with --replicas the diagnosis is the raw run's, at its end, for now")


def _twin_epochs() -> int:
  """--epochs with --keras_model: 0 (the default there) diagnoses the saved model as it is."""
  return FLAGS.epochs if FLAGS["epochs"].present else 0


def main(argv):
  from bnraw import diagnosis
  if FLAGS.keras_model and not _twin_epochs():  # the saved model as it is: no training
    result = diagnosis.run_saved(FLAGS.keras_model, FLAGS.data,
                                 batch_size=(FLAGS.batch_size if FLAGS["batch_size"].present
                                             else None), out_dir=FLAGS.out_dir, fix=FLAGS.fix,
                                 overwrite=FLAGS.overwrite, tensorboard=FLAGS.tensorboard,
                                 image_size=common.image_size(),
                                 precise_bn_batches=FLAGS.precise_bn_batches)
  else:
    result = diagnosis.run(common.workload(), out_dir=FLAGS.out_dir, impl=FLAGS.impl,
                           trace=FLAGS.trace, fix=FLAGS.fix, every=FLAGS.every,
                           overwrite=FLAGS.overwrite, histogram_every=FLAGS.histogram_every,
                           tensorboard=FLAGS.tensorboard, progress=FLAGS.progress,
                           precise_bn_batches=FLAGS.precise_bn_batches)
  title = (f"bnraw diagnosis of {result['title']}" if FLAGS.keras_model
           else f"bnraw diagnosis: {result['title']}")
  print()
  print(diagnosis.report(result, title))
  if "fixed" in result:
    from bnraw.diagnosis.explain import fixed_line
    print(fixed_line(result))
  print(f"wrote {FLAGS.out_dir}/diagnosis.json")


def console():
  app.run(main, check)


if __name__ == "__main__":
  console()
