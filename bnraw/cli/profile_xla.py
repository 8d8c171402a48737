"""Times the training step: raw eager/function/xla/auto (trace off and on) vs Keras fit (XLA off/on).

  bnraw-profile --widths=1/16,1/4 --out_dir=runs/profile
  bnraw-profile --keras_model=model.keras --data=train.npz --out_dir=runs/profile_mine
  bnraw-profile --replicas=1,2 --widths=1/4 --out_dir=runs/profile_replicas

With --replicas: the raw replicated step and Keras fit under the same MirroredStrategy at each
replica count (N GPUs, or the CPU split into N logical devices), the speed-up over one replica
and raw/Keras (bnraw.profiling.replicas).

With --keras_model: that model's raw twin (function, xla; eager on request) against its own fit
(jit off and on), and the ratio of the best exact raw step to the best fit.

All in one process on the same data, width and batch: every configuration is built once and
timed round-robin (--rounds), so a noisy machine's drift hits all alike. Prints a table with
GFLOP/s, the fraction of the matmul ceiling measured in the same run, raw/Keras ratios, what
auto chose and what measuring cost, steps-per-execution ratios, and the best exact raw mode's
time per block (optimizer, moving update, BN statistics, normalisation, convolutions and rest).
"""

from absl import flags

from bnraw.cli import app
from bnraw.config import DTYPE_POLICIES, NUM_IMAGES
from bnraw.cli import flags as common
from bnraw.errors import UsageError

flags.DEFINE_list("widths", ["1/16"], "Width multipliers, comma-separated (e.g. 1/16,1/4).")
flags.DEFINE_integer("batch_size", 256, "Batch size (with --keras_model: default 32, fit's).",
                     lower_bound=1)
flags.DEFINE_integer("steps", 5, "Timed steps per configuration and round.", lower_bound=1)
flags.DEFINE_integer("rounds", 3, "Round-robin rounds over all configurations (the median of "
                     "all timed steps is reported).", lower_bound=1)
flags.DEFINE_integer("warmup", 2, "Untimed steps after the first (compiling) one.", lower_bound=0)
flags.DEFINE_list("raw_modes", ["eager", "function", "xla", "auto"], "Raw modes to time (auto: "
                  "the mode auto measures and picks; its compile time is the measurement).")
flags.DEFINE_list("keras_jit", ["false", "true", "auto"], "Keras fit jit_compile values to time "
                  "(auto: jit on when the raw auto mode picked xla).")
flags.DEFINE_list("steps_per_execution", ["1", "4"], "Steps per compiled call: each K > 1 adds "
                  "raw function/xla and Keras rows running K steps per call.")
flags.DEFINE_list("dtype_policy", ["float32"], "Keras dtype policies to time, comma-separated "
                  "(float32, mixed_float16, mixed_bfloat16): every row again under each (float16 "
                  "with loss scaling from 1, so no timed step is skipped).")
flags.DEFINE_bool("breakdown", True, "Time the best exact raw mode's step with one block taken "
                  "away at a time: the time per block.")
flags.DEFINE_string("profile_dir", None, "Write a TensorFlow profiler trace of a few steady raw "
                    "steps of the best mode here (TensorBoard's Profile tab).")
flags.DEFINE_string("hlo_dir", None, "Write the raw xla step's HLO before/after optimisation.")
flags.DEFINE_list("replicas", None, "Replica counts to time, e.g. 1,2: the replicated step "
                  "and (with false in --keras_jit, the default) fit under MirroredStrategy (one "
                  "width; the other seed-only flags do not apply).")
common.define_output_flags("runs/profile")
common.define_keras_model_flags("Profile")
FLAGS = flags.FLAGS
# what only the seed's profile has
SEED_ONLY = ("widths", "steps_per_execution", "dtype_policy", "breakdown", "profile_dir",
             "hlo_dir", "replicas")


def check(argv):
  common.reject_extra_args(argv)
  common.check_outputs()
  if FLAGS.keras_model:
    common.refuse_present(SEED_ONLY, "profiles the seed network; with --keras_model the model "
                          "brings its own width, policy and compile")
    for value in FLAGS.raw_modes if FLAGS["raw_modes"].present else ():
      if value not in ("eager", "function", "xla"):
        raise UsageError("raw_modes", f"expected some of eager, function, xla with "
                         f"--keras_model; got {value!r}")
    for value in FLAGS.keras_jit if FLAGS["keras_jit"].present else ():
      if value not in ("false", "true"):
        raise UsageError("keras_jit", f"expected false or true with --keras_model; got {value!r}")
    common.import_custom_objects()
    return
  if FLAGS.replicas:
    common.refuse_present(("raw_modes", "steps_per_execution", "dtype_policy", "breakdown",
                           "profile_dir", "hlo_dir"), "times the function step and fit (jit "
                          "off, as under a strategy) per replica count; --replicas says which")
    if len(FLAGS.widths) != 1:
      raise UsageError("widths", "give one width with --replicas")
    for value in FLAGS.replicas:
      if not value.isdigit() or int(value) < 1:
        raise UsageError("replicas", f"expected integers >= 1, got {value!r}")
    from bnraw.models.seed import check_shards
    for value in FLAGS.replicas:
      if int(value) > 1:
        check_shards(NUM_IMAGES, FLAGS.batch_size, int(value))
  if FLAGS.batch_size > NUM_IMAGES:
    raise UsageError("batch_size", f"must be in [1, {NUM_IMAGES}] (the seed's dataset has "
                     f"{NUM_IMAGES} images)")
  for text in FLAGS.widths:
    try:
      common.parse_width(text)
    except ValueError as e:
      raise UsageError("widths", str(e)) from None
  if FLAGS.hlo_dir and "xla" not in FLAGS.raw_modes:
    raise UsageError("hlo_dir", "needs xla in --raw_modes (HLO is the xla step's)")
  if FLAGS.hlo_dir and NUM_IMAGES % FLAGS.batch_size:
    raise UsageError("hlo_dir", f"needs a batch size that divides the {NUM_IMAGES} images (the "
                     "step is otherwise traced for an unknown batch size, as Keras does)")
  for value in FLAGS.keras_jit:
    if value not in ("false", "true", "auto"):
      raise UsageError("keras_jit", f"expected false, true or auto, got {value!r}")
  if "auto" in FLAGS.keras_jit and "auto" not in FLAGS.raw_modes:
    raise UsageError("keras_jit", "auto follows the raw auto mode's choice: needs auto in "
                     "--raw_modes")
  for value in FLAGS.raw_modes:
    if value not in ("eager", "function", "xla", "auto"):
      raise UsageError("raw_modes", f"expected some of eager, function, xla, auto; got {value!r}")
  for value in FLAGS.dtype_policy:
    if value not in DTYPE_POLICIES:
      raise UsageError("dtype_policy", f"expected some of {', '.join(DTYPE_POLICIES)}; got "
                       f"{value!r}")
  if FLAGS.profile_dir and "float32" not in FLAGS.dtype_policy:
    raise UsageError("profile_dir", "captures the float32 step: needs float32 in --dtype_policy")
  for value in FLAGS.steps_per_execution:
    if not value.isdigit() or int(value) < 1:
      raise UsageError("steps_per_execution", f"expected integers >= 1, got {value!r}")


def main(argv):
  from bnraw import profiling
  if FLAGS.keras_model:
    from bnraw.config import TrainConfig
    from bnraw.models.workload import from_keras_file
    workload = from_keras_file(FLAGS.keras_model, FLAGS.data,
                               TrainConfig(batch_size=common.keras_fit_batch_size()),
                               common.image_size())
    result = profiling.run_keras_model(
        workload, steps=FLAGS.steps, warmup=FLAGS.warmup, rounds=FLAGS.rounds,
        raw_modes=FLAGS.raw_modes if FLAGS["raw_modes"].present else ["function", "xla"],
        keras_jit=([v == "true" for v in FLAGS.keras_jit] if FLAGS["keras_jit"].present
                   else [False, True]),
        out_dir=FLAGS.out_dir, progress=FLAGS.progress, overwrite=FLAGS.overwrite)
    print(profiling.report_keras_model(result))
    print(f"wrote {FLAGS.out_dir}/profile.json")
    return
  if FLAGS.replicas:
    import os
    from bnraw import outputs
    from bnraw.profiling import replicas
    result = replicas.run(counts=[int(v) for v in FLAGS.replicas],
                          width=common.parse_width(FLAGS.widths[0]), batch_size=FLAGS.batch_size,
                          steps=FLAGS.steps, warmup=FLAGS.warmup, rounds=FLAGS.rounds,
                          keras="false" in FLAGS.keras_jit, progress=FLAGS.progress)
    outputs.prepare_out_dir(FLAGS.out_dir, overwrite=FLAGS.overwrite)
    outputs.write_json(os.path.join(FLAGS.out_dir, "profile.json"), result)
    print(replicas.report(result))
    print(f"wrote {FLAGS.out_dir}/profile.json")
    return
  result = profiling.run(
      widths=[common.parse_width(w) for w in FLAGS.widths], batch_size=FLAGS.batch_size,
      steps=FLAGS.steps, warmup=FLAGS.warmup, rounds=FLAGS.rounds, raw_modes=FLAGS.raw_modes,
      keras_jit=[{"true": True, "false": False}.get(v, v) for v in FLAGS.keras_jit],
      steps_per_execution=[int(k) for k in FLAGS.steps_per_execution],
      breakdown=FLAGS.breakdown, dtype_policies=FLAGS.dtype_policy, out_dir=FLAGS.out_dir,
      profile_dir=FLAGS.profile_dir, hlo_dir=FLAGS.hlo_dir, progress=FLAGS.progress,
      overwrite=FLAGS.overwrite)
  print(profiling.report(result))
  print(f"wrote {FLAGS.out_dir}/profile.json")


def console():
  app.run(main, check)


if __name__ == "__main__":
  console()
