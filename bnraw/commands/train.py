"""Trains the seed network with the raw path; writes summary.json (and trace.npz with --trace).

  python scripts/train.py --case=2 --epochs=500 --out_dir=runs/train

Prints a progress line per epoch, then what fit printed last and what evaluate gives.
"""

from absl import flags

from bnraw import cli

cli.define_common_flags(out_dir="runs/train")
flags.DEFINE_string("break_at", None, "LAYER:STEP, e.g. bn_3:41: run eagerly and stop in the "
                    "Python debugger inside that layer's moving-average update at that step.")
FLAGS = flags.FLAGS


def main(argv):
  cli.reject_extra_args(argv)
  from bnraw import experiment
  data, model, train = cli.configs()
  break_at = None
  if FLAGS.break_at:
    from bnraw.debug import parse_break_at
    break_at = parse_break_at(FLAGS.break_at)
  summary = experiment.train(data, model, train, out_dir=FLAGS.out_dir, trace=FLAGS.trace,
                             config=cli.flag_values(["break_at"]), break_at=break_at)
  print(f"fit loss (last epoch) {summary['history']['loss'][-1]:.6g}  accuracy "
        f"{summary['history']['accuracy'][-1]:.4f}\n"
        f"evaluate loss         {summary['evaluate']['loss']:.6g}  accuracy "
        f"{summary['evaluate']['accuracy']:.4f}\n"
        f"wrote {FLAGS.out_dir}/summary.json")


def console():
  cli.run(main)


if __name__ == "__main__":
  console()
