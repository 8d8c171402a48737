"""Prints one BN layer's moving-statistics update at one step of a traced run.

  bnraw-train --trace --epochs=50 --out_dir=runs/t
  bnraw-inspect --run_dir=runs/t --layer=bn_3 --step=41
  bnraw-inspect --run_dir=runs/t --where=max_amplification --above=100

The second form prints, per layer (or for --layer), the first step at which the per-step summary
exceeds the value (summaries: mean_gap, variance_gap, min_batch_variance, max_amplification).
"""

from absl import flags

from bnraw.cli import app
from bnraw.cli import flags as common
from bnraw.errors import UsageError

flags.DEFINE_string("run_dir", None, "Output directory of a run made with --trace.")
flags.DEFINE_string("layer", None, "BN layer name, bn_1 .. bn_8.")
flags.DEFINE_integer("step", None, "0-based optimizer step.", lower_bound=0)
flags.DEFINE_enum("where", None, ["mean_gap", "variance_gap", "min_batch_variance",
                                  "max_amplification"], "Find the first step where this "
                  "summary exceeds --above.")
flags.DEFINE_float("above", None, "Threshold for --where.")
flags.DEFINE_integer("channels", 6, "How many channels to print per array.", lower_bound=1)
flags.mark_flag_as_required("run_dir")
FLAGS = flags.FLAGS


def _fmt(values, limit):
  import numpy as np
  values = np.asarray(values)
  shown = " ".join(f"{v:+.6g}" for v in values[:limit])
  return shown + (f" ... ({len(values)} channels)" if len(values) > limit else "")


def describe(trace, layer: str, step: int, limit: int) -> str:
  """The update of ``layer`` at ``step``, with the moving-average identity checked."""
  import numpy as np
  at = trace.at(layer, step)
  v = at.values
  momentum_hint = ""
  delta = v["moving_mean_before"] - v["batch_mean"]
  if np.abs(delta).max() > 0:
    # recover m from moving_after = m * before + (1 - m) * batch, as a readable check
    m = (v["moving_mean_after"] - v["batch_mean"]) / delta
    momentum_hint = f"  (implied momentum {np.median(m):.6g})"
  lines = [f"{layer} at step {step} (epoch {at.epoch + 1}), branch: {at.branch}{momentum_hint}"]
  for key in ("batch_mean", "moving_mean_before", "moving_mean_after", "batch_variance",
              "moving_variance_before", "moving_variance_after"):
    lines.append(f"  {key:24} {_fmt(v[key], limit)}")
  lines.append("  " + "   ".join(f"{key} {float(v[key]):.6g}" for key in
                                  ("mean_gap", "variance_gap", "min_batch_variance",
                                   "max_amplification")))
  return "\n".join(lines)


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
  from bnraw.tracing.store import TRACE_FILE, Trace
  path = os.path.join(FLAGS.run_dir, TRACE_FILE)
  if not os.path.isfile(path):
    raise UsageError("run_dir", f"no {TRACE_FILE} in {FLAGS.run_dir} (train with --trace)")
  trace = Trace.load(path)
  if FLAGS.layer is not None and FLAGS.layer not in trace.layers:
    raise UsageError("layer", f"no layer {FLAGS.layer!r}; layers: {', '.join(trace.layers)}")
  if FLAGS.where:
    for layer in [FLAGS.layer] if FLAGS.layer else trace.layers:
      step = trace.first_step_where(layer, FLAGS.where, FLAGS.above)
      print(f"{layer}: {FLAGS.where} > {FLAGS.above:g} first at step "
            f"{'never' if step is None else step}")
    return
  if FLAGS.step not in set(trace.steps.tolist()):
    raise UsageError("step", f"{FLAGS.step} is not in the trace (steps "
                     f"{trace.steps.min()}..{trace.steps.max()})")
  print(describe(trace, FLAGS.layer, FLAGS.step, FLAGS.channels))


def console():
  app.run(main, check)


if __name__ == "__main__":
  console()
