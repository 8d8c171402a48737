"""Prints one BN layer's moving-statistics update at one step of a traced run.

  bnraw-train --trace --epochs=50 --out_dir=runs/t
  bnraw-inspect --run_dir=runs/t --layer=bn_3 --step=41
  bnraw-inspect --run_dir=runs/t --where=max_amplification --above=100
  bnraw-inspect --run_dir=runs/r2 --layer=bn_3 --step=41 --replica=1   (a --replicas run)

The second form prints, per layer (or for --layer), the first step at which the per-step summary
exceeds the value (summaries: mean_gap, variance_gap, min_batch_variance, max_amplification).
"""

from absl import flags

from bnraw.cli import app
from bnraw.cli import flags as common
from bnraw.errors import UsageError

flags.DEFINE_string("run_dir", None, "Output directory of a run made with --trace.")
flags.DEFINE_string("layer", None, "BN layer name as the trace has it (the seed: bn_1 .. "
                    "bn_8; a user's model: its own names, e.g. backbone/bn_1).")
flags.DEFINE_integer("step", None, "0-based optimizer step.", lower_bound=0)
flags.DEFINE_enum("where", None, ["mean_gap", "variance_gap", "min_batch_variance",
                                  "max_amplification"], "Find the first step where this "
                  "summary exceeds --above.")
flags.DEFINE_float("above", None, "Threshold for --where.")
flags.DEFINE_integer("replica", None, "A run on several replicas (--replicas): whose copy of "
                     "the statistics (0-based). With --where: only that replica's (default: "
                     "any replica's).", lower_bound=0)
flags.DEFINE_integer("channels", 6, "How many channels to print per array.", lower_bound=1)
flags.mark_flag_as_required("run_dir")
FLAGS = flags.FLAGS


def check(argv):
  common.reject_extra_args(argv)
  if FLAGS.where:
    if FLAGS.above is None:
      raise UsageError("above", "--where needs --above")
    common.refuse_present(("step", "channels"), "prints one update; --where finds steps")
  else:
    common.refuse_present(("above",), "needs --where")
    if FLAGS.layer is None or FLAGS.step is None:
      raise UsageError("layer", "give --layer and --step, or --where and --above")


def main(argv):
  import os
  from bnraw.tracing.store import TRACE_FILE, Trace, describe
  path = os.path.join(FLAGS.run_dir, TRACE_FILE)
  if not os.path.isfile(path):
    raise UsageError("run_dir", f"no {TRACE_FILE} in {FLAGS.run_dir} (train with --trace)")
  trace = Trace.load(path)
  if FLAGS.layer is not None and FLAGS.layer not in trace.layers:
    raise UsageError("layer", f"no layer {FLAGS.layer!r}; layers: {', '.join(trace.layers)}")
  if FLAGS.replica is not None or (trace.replicas is not None and not FLAGS.where):
    try:
      trace.check_replica(FLAGS.replica)
    except ValueError as e:
      raise UsageError("replica", str(e)) from None
  if FLAGS.where:
    for layer in [FLAGS.layer] if FLAGS.layer else trace.layers:
      step = trace.first_step_where(layer, FLAGS.where, FLAGS.above, FLAGS.replica)
      print(f"{layer}: {FLAGS.where} > {FLAGS.above:g} first at step "
            f"{'never' if step is None else step}")
    return
  if FLAGS.step not in set(trace.steps.tolist()):
    raise UsageError("step", f"{FLAGS.step} is not in the trace (steps "
                     f"{trace.steps.min()}..{trace.steps.max()})")
  print(describe(trace, FLAGS.layer, FLAGS.step, FLAGS.channels, FLAGS.replica))


def console():
  app.run(main, check)


if __name__ == "__main__":
  console()
