"""The absl flags the seed's tools share and their validators; :func:`configs` maps their
values onto the typed configs of ``bnraw.config`` (the single source of truth). Defaults are the
seed's, taken from those configs. Checked before TensorFlow is imported."""

from __future__ import annotations

import fractions
import os
import sys
from typing import Callable

from absl import flags

from bnraw.config import (DTYPE_POLICIES, HISTOGRAM_EVERY, KERAS_INITIAL_LOSS_SCALE, NUM_IMAGES,
                          DataConfig, ModelConfig, TrainConfig)
from bnraw.errors import UsageError
from bnraw.models.seed import check_block, loss_scale_fits

FLAGS = flags.FLAGS
# The flags that describe the seed setup: with --keras_model they have no meaning.
SEED_FLAGS = ("case", "image", "block", "width", "momentum", "epsilon", "bessel",
              "bessel_scope", "l2", "fast_conv", "epochs", "optimizer", "lr", "sgd_momentum",
              "nesterov", "seed", "mode", "steps_per_execution", "dtype_policy", "loss_scale",
              "sync_bn", "replicas", "shards")
# Of those, what a user's model brings itself (its layers, compile and policy): refused with
# --keras_model when its raw twin trains; the loop's own flags (epochs, seed, mode, ...) apply.
MODEL_FLAGS = tuple(f for f in SEED_FLAGS if f not in ("epochs", "seed", "mode",
                                                        "steps_per_execution"))


def parse_width(text: str) -> float:
  """``"1/16"``, ``"0.0625"`` or ``"1"`` -> float > 0."""
  try:
    value = float(fractions.Fraction(text.strip()))
  except (ValueError, ZeroDivisionError):
    raise ValueError(f"not a number or fraction: {text!r}") from None
  if not value > 0:
    raise ValueError(f"must be > 0, got {text}")
  return value


def parse_block(text: str) -> tuple[int, int]:
  """``"12:16"`` -> (12, 16), rows/cols [start, stop) inside the 29x29 image."""
  try:
    start, stop = (int(part) for part in text.split(":"))
  except ValueError:
    raise ValueError(f"expected START:STOP, got {text!r}") from None
  try:
    check_block((start, stop))
  except UsageError as e:
    raise ValueError(e.problem) from None
  return start, stop


def parse_image_size(text: str) -> tuple[int, int]:
  """``"64,48"`` -> (64, 48): a folder's images' height and width."""
  try:
    height, width = (int(part) for part in text.split(","))
  except ValueError:
    raise ValueError(f"expected HEIGHT,WIDTH (e.g. 64,64), got {text!r}") from None
  if height < 1 or width < 1:
    raise ValueError(f"height and width must be >= 1, got {text!r}")
  return height, width


def image_size():
  """--image_size as (height, width), or None."""
  return parse_image_size(FLAGS.image_size) if FLAGS.image_size else None


def parse_break_at(text: str) -> tuple[str, int]:
  """``"bn_3:41"`` -> ("bn_3", 41)."""
  try:
    layer, step = text.split(":")
    step = int(step)
  except ValueError:
    raise UsageError("break_at", f"expected LAYER:STEP such as bn_3:41, got {text!r}") from None
  if step < 0:
    raise UsageError("break_at", f"step must be >= 0, got {step}")
  return layer, step


def _check(name: str, parse: Callable) -> None:
  """Registers ``parse`` as the validator of flag ``name``, its ValueError text as the message."""
  def validator(value):
    if value is None:
      return True
    try:
      parse(value)
    except ValueError as e:
      raise flags.ValidationError(str(e)) from None
    return True
  flags.register_validator(name, validator)


def _bound(name: str, ok: Callable[[float], bool], message: str) -> None:
  flags.register_validator(name, lambda v: v is None or ok(v), message=message)


def define_common_flags(*, out_dir: str, trace: bool) -> None:
  """Data, model, training and output flags, with validators; ``--trace`` where the tool
  records one. Defaults come from the configs."""
  data, model, train = DataConfig(), ModelConfig(), TrainConfig()
  flags.DEFINE_enum("case", str(data.case), ["1", "2"],
                    "Seed case: 1 = whole image is i, 2 = a block is i.")
  flags.DEFINE_string("image", data.image, "Photo for case 2 (any file Pillow reads); default: "
                      "the project's deterministic image.")
  flags.DEFINE_string("block", "{}:{}".format(*data.block), "Rows/cols START:STOP of case 2's "
                      "block (seed code: 12:16, a 4x4 block).")
  flags.DEFINE_string("width", None, "Width multiplier, e.g. 1, 1/4, 0.0625. Default: 1 with a "
                      "GPU, 1/16 on CPU.")
  flags.DEFINE_float("momentum", model.momentum, "BN momentum, Keras convention: "
                     "moving*m + batch*(1-m).")
  flags.DEFINE_float("epsilon", model.epsilon, "BN epsilon.")
  flags.DEFINE_bool("bessel", model.bessel, "Legacy BN: feed var*n/(n-1) into the moving "
                    "variance (Keras 2.2.4, tf_keras fused).")
  flags.DEFINE_enum("bessel_scope", model.bessel_scope, ["all", "conv"], "With --bessel: every "
                    "BN layer, or only the conv (4-D) ones as tf_keras's fused kernel does.")
  flags.DEFINE_float("l2", model.l2, "L2 factor on every kernel (seed: 0).")
  flags.DEFINE_bool("fast_conv", model.fast_conv, "Compute block 7's conv (kernel covers the "
                    "input) as one matmul: same maths, faster on CPU, not bit-identical to Keras.")
  flags.DEFINE_enum("dtype_policy", model.dtype_policy, list(DTYPE_POLICIES),
                    "Keras dtype policy: mixed_* computes convs, matmuls and activations in "
                    "float16/bfloat16 with float32 variables; BN upcasts to float32.")
  flags.DEFINE_bool("sync_bn", model.sync_bn, "BatchNormalization(synchronized=True): one-pass "
                    "moments, summed over the replicas with --replicas.")
  flags.DEFINE_float("loss_scale", None, "With --dtype_policy=mixed_float16: the initial dynamic "
                     f"loss scale (Keras's default: {KERAS_INITIAL_LOSS_SCALE:g}); a step whose "
                     "scaled gradients overflow is skipped and the scale halved.")
  flags.DEFINE_integer("batch_size", train.batch_size, f"Batch size (the seed's dataset has "
                       f"{NUM_IMAGES} images).")
  flags.DEFINE_integer("epochs", train.epochs, "Epochs.")
  flags.DEFINE_enum("optimizer", train.optimizer, ["adam", "sgd"],
                    "Keras 3 Adam, or SGD with momentum.")
  flags.DEFINE_float("lr", train.lr, "Learning rate.")
  flags.DEFINE_float("sgd_momentum", train.sgd_momentum, "SGD momentum (with --optimizer=sgd).")
  flags.DEFINE_bool("nesterov", train.nesterov, "Nesterov momentum (with --optimizer=sgd).")
  flags.DEFINE_integer("seed", train.seed, "Seed of the initial weights and of the per-epoch "
                       "shuffling.")
  flags.DEFINE_enum("mode", train.mode, ["eager", "function", "xla", "auto"],
                    "How the step runs: eager, tf.function, tf.function(jit_compile=True), or "
                    "auto = time function and xla on this machine first, keep the faster.")
  flags.DEFINE_integer("steps_per_execution", train.steps_per_execution, "Optimizer steps per "
                       "compiled call, within an epoch (Keras's name; at the seed's batch 256 an "
                       "epoch is one step); every step's loss and trace still come back.",
                       lower_bound=1)
  flags.DEFINE_integer("replicas", train.replicas, "Replicas under MirroredStrategy: N GPUs, or "
                       "the CPU split into N logical devices; the global batch is split over "
                       "them (bnraw-train, bnraw-compare, bnraw-diagnose).", lower_bound=1)
  flags.DEFINE_enum("shards", train.shards, ["iid", "sorted"], "With --replicas: iid shards "
                    "(each global batch as drawn), or sorted: each global batch sorted by label "
                    "before it is split (non-iid shards).")
  if trace:
    flags.DEFINE_bool("trace", False, "Record every BN layer's batch and moving statistics at "
                      "every step (trace.npz + TensorBoard in --out_dir).")
    flags.DEFINE_integer("histogram_every", HISTOGRAM_EVERY, "With --trace: TensorBoard histograms every K "
                         "steps (scalars: every step).", lower_bound=1)
  define_output_flags(out_dir)

  _check("width", parse_width)
  _check("block", parse_block)
  _bound("momentum", lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
  _bound("epsilon", lambda v: v > 0, "must be > 0")
  _bound("l2", lambda v: v >= 0, "must be >= 0")
  _bound("batch_size", lambda v: v >= 1, "must be >= 1")
  _bound("epochs", lambda v: v >= 1, "must be >= 1")
  _bound("lr", lambda v: v > 0, "must be > 0")
  _bound("loss_scale", loss_scale_fits, "must be a float32 number > 0 (up to 3.4e38)")
  _bound("sgd_momentum", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")


def define_keras_model_flags(what: str) -> None:
  """--keras_model and --data (together), for a tool that also runs on a user's model."""
  flags.DEFINE_string("keras_model", None, f"{what} your own compiled .keras model instead of "
                      "the seed (needs --data).")
  flags.DEFINE_string("data", None, "--keras_model's data: a .npz with arrays x and y, a "
                      "saved tf.data dataset (Dataset.save, elements (x, y)), or a folder of "
                      "class sub-folders of images (read as "
                      "keras.utils.image_dataset_from_directory reads it, at the model's input "
                      "size, batch by batch).")
  flags.DEFINE_string("image_size", None, "HEIGHT,WIDTH to read a --data folder of images at, "
                      "for a model that takes any size (default: the model's input size).")
  _check("image_size", parse_image_size)
  flags.register_multi_flags_validator(
      ["image_size", "data"], lambda f: f["image_size"] is None or f["data"] is not None,
      message="--image_size sets the size a --data folder of images is read at: give --data")
  flags.DEFINE_list("custom_objects", [], "Python files (.py) or modules to import before "
                    "loading --keras_model: where its custom layers are registered "
                    "(keras.saving.register_keras_serializable), as your own code loads it.")
  flags.register_multi_flags_validator(
      ["keras_model", "data"], lambda f: (f["keras_model"] is None) == (f["data"] is None),
      message="--keras_model and --data go together")


def check_keras_model_setup(*, resume: bool = False, replicas: bool = False) -> None:
  """With --keras_model: the seed's model flags refused (``replicas``: but --replicas, which
  this tool runs), the output folder checked."""
  from bnraw import cluster as clusters
  refuse_present([f for f in MODEL_FLAGS if not (replicas and f == "replicas")],
                 "describes the seed setup; with --keras_model the model, its compile and its "
                 "dtype policy come from the saved model")
  if replicas and FLAGS.replicas < 1:
    raise UsageError("replicas", f"must be >= 1, got {FLAGS.replicas}")
  if clusters.from_environment() is not None:
    raise UsageError("TF_CONFIG", "describes a cluster; a --keras_model run is in one process "
                     "so far (--replicas splits its devices): unset TF_CONFIG")
  check_outputs(resume=resume)
  import_custom_objects()  # after the cheap checks: it loads Keras


def import_custom_objects() -> None:
  """--custom_objects imported (Keras with them, so only when given)."""
  if FLAGS.custom_objects:
    from bnraw.models import user
    user.import_custom_objects(FLAGS.custom_objects)


def keras_fit_batch_size() -> int:
  """--batch_size for a user's model: as given, else Keras fit's default (32)."""
  from bnraw.models.user import KERAS_FIT_BATCH_SIZE
  return FLAGS.batch_size if FLAGS["batch_size"].present else KERAS_FIT_BATCH_SIZE


def twin_train_config() -> TrainConfig:
  """The loop's flags for a user's model: --batch_size and --epochs default to Keras fit's
  (32 and 1)."""
  return TrainConfig(batch_size=keras_fit_batch_size(),
                     epochs=FLAGS.epochs if FLAGS["epochs"].present else 1, seed=FLAGS.seed,
                     mode=FLAGS.mode, steps_per_execution=FLAGS.steps_per_execution,
                     replicas=FLAGS.replicas)


def define_output_flags(out_dir: str) -> None:
  flags.DEFINE_string("out_dir", out_dir, "Directory for the outputs.")
  flags.DEFINE_bool("overwrite", False, "Replace an earlier run's outputs in --out_dir (without "
                    "it, a folder holding a run is refused).")


def resolve_width(announce: bool = True) -> float:
  """--width, or the library's default (1 with a GPU, 1/16 on CPU), said on stderr when picked."""
  if FLAGS.width is not None:
    return parse_width(FLAGS.width)
  width = ModelConfig().resolved().width  # imports TensorFlow
  if not announce:
    return width
  why = "a GPU is present" if width == 1.0 else "no GPU found; --width=1 is the full network"
  print(f"width: {fractions.Fraction(width)} ({why})", file=sys.stderr)
  return width


def check_seed_setup(*, resume: bool = False, replicas: bool = False,
                     multi_worker: bool = False) -> None:
  """Meaningless flags, the seed settings, the cluster, the output folder and the photo, all
  checked before TensorFlow loads (the library checks them again before it works);
  ``replicas``: whether this tool runs --replicas > 1; ``multi_worker``: on a cluster in
  TF_CONFIG (bnraw.cluster), where only the chief writes (and checks) the output folder."""
  from bnraw import cluster as clusters
  from bnraw.models import seed
  refuse_ignored_seed_flags()
  if not replicas and FLAGS.replicas > 1:
    seed.refuse_replicas(configs(resolve=False)[2], os.path.basename(sys.argv[0]))
  cluster = clusters.from_environment()
  if cluster is not None:
    if not multi_worker:
      raise UsageError("TF_CONFIG", f"describes a cluster; {os.path.basename(sys.argv[0])} runs "
                       "in one process (bnraw-train runs on many workers): unset TF_CONFIG")
    if FLAGS.replicas == 1:
      raise UsageError("replicas", f"TF_CONFIG describes {cluster.workers} workers: give "
                       f"--replicas (one per device of each worker, e.g. {cluster.workers})")
    clusters.check_replicas(cluster, FLAGS.replicas)
  seed.check(*configs(resolve=False))
  if clusters.is_chief(cluster):
    check_outputs(resume=resume)


def check_outputs(*, resume: bool = False) -> None:
  """The output folder, checked before TensorFlow loads."""
  from bnraw import outputs
  if resume and FLAGS.overwrite:
    raise UsageError("overwrite", "--resume continues the run in --out_dir; --overwrite would "
                     "replace it: give one")
  outputs.check_out_dir(FLAGS.out_dir, overwrite=FLAGS.overwrite, resume=resume)


def refuse_ignored_seed_flags() -> None:
  """Flags given on the command line that the other flags make meaningless: exit 2, not a
  silently ignored value."""
  if FLAGS.case == "1":
    refuse_present(("image", "block"), "case 1 has no photo or block (every pixel is i)")
  if not FLAGS.bessel:
    refuse_present(("bessel_scope",), "only applies with --bessel")
  if "trace" in FLAGS and not FLAGS.trace:
    refuse_present(("histogram_every",), "only applies with --trace")
  if FLAGS.optimizer != "sgd":
    refuse_present(("sgd_momentum", "nesterov"), "only applies with --optimizer=sgd")


def configs(announce_width: bool = True, resolve: bool = True
            ) -> tuple[DataConfig, ModelConfig, TrainConfig]:
  """The flag values as the library's frozen configurations; ``resolve=False`` leaves an unset
  width undecided (no TensorFlow import)."""
  data = DataConfig(case=int(FLAGS.case), image=FLAGS.image, block=parse_block(FLAGS.block))
  width = (resolve_width(announce_width) if resolve else
           parse_width(FLAGS.width) if FLAGS.width is not None else None)
  model = ModelConfig(width=width, momentum=FLAGS.momentum, epsilon=FLAGS.epsilon,
                      bessel=FLAGS.bessel, bessel_scope=FLAGS.bessel_scope, l2=FLAGS.l2,
                      fast_conv=FLAGS.fast_conv, dtype_policy=FLAGS.dtype_policy,
                      sync_bn=FLAGS.sync_bn)
  train = TrainConfig(batch_size=FLAGS.batch_size, epochs=FLAGS.epochs, optimizer=FLAGS.optimizer,
                      lr=FLAGS.lr, sgd_momentum=FLAGS.sgd_momentum, nesterov=FLAGS.nesterov,
                      seed=FLAGS.seed, mode=FLAGS.mode,
                      steps_per_execution=FLAGS.steps_per_execution,
                      loss_scale=FLAGS.loss_scale, replicas=FLAGS.replicas,
                      shards=FLAGS.shards)
  return data, model, train


def workload(reference: str = "keras3"):
  """The workload the flags describe: a --keras_model and its --data (through its raw twin),
  else the seed's (bnraw.models.workload). Imports TensorFlow: call it in ``main``."""
  from bnraw.models import workload as workloads
  if FLAGS.keras_model:
    return workloads.from_keras_file(FLAGS.keras_model, FLAGS.data, twin_train_config(),
                                     image_size())
  return workloads.from_seed(*configs(), reference=reference)


def refuse_present(names, reason: str) -> None:
  """A UsageError for the first of ``names`` given on the command line: it would be ignored."""
  for name in names:
    if name in FLAGS and FLAGS[name].present:
      raise UsageError(name, reason)


def reject_extra_args(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UsageError("", f"unexpected arguments: {' '.join(argv[1:])} (flags take the form "
                     "--name=value)")
