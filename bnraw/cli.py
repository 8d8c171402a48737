"""The absl flags every script shares, their validators, and the wrapper that turns bad input
into one line on stderr and exit status 2 (no traceback, nothing written).

Defaults are the seed's. Flag values map onto ``bnraw.config`` dataclasses in :func:`configs`.
"""

from __future__ import annotations

import fractions
import os
import sys
from typing import Callable, Optional, Sequence

from absl import app, flags

from bnraw.config import NUM_IMAGES, DataConfig, ModelConfig, TrainConfig
from bnraw.data import check_block
from bnraw.errors import UsageError  # noqa: F401 (re-exported for commands)

FLAGS = flags.FLAGS
COMMON_FLAGS = ("case", "image", "block", "width", "momentum", "epsilon", "bessel",
                "bessel_scope", "l2", "fast_conv",
                "batch_size", "epochs", "optimizer", "lr", "sgd_momentum", "nesterov", "seed",
                "mode", "trace", "out_dir")


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


def define_common_flags(*, out_dir: str, trace_default: bool = False) -> None:
  """Data, model, training and output flags, with validators."""
  flags.DEFINE_enum("case", "2", ["1", "2"], "Seed case: 1 = whole image is i, 2 = a block is i.")
  flags.DEFINE_string("image", None, "Photo for case 2 (any file Pillow reads); default: the "
                      "project's deterministic image.")
  flags.DEFINE_string("block", "12:16", "Rows/cols START:STOP of case 2's block (seed code: "
                      "12:16, a 4x4 block).")
  flags.DEFINE_string("width", None, "Width multiplier, e.g. 1, 1/4, 0.0625. Default: 1 with a "
                      "GPU, 1/16 on CPU.")
  flags.DEFINE_float("momentum", 0.9, "BN momentum, Keras convention: moving*m + batch*(1-m).")
  flags.DEFINE_float("epsilon", 1e-5, "BN epsilon.")
  flags.DEFINE_bool("bessel", False, "Legacy BN: feed var*n/(n-1) into the moving variance "
                    "(Keras 2.2.4, tf_keras fused).")
  flags.DEFINE_enum("bessel_scope", "all", ["all", "conv"], "With --bessel: every BN layer, or "
                    "only the conv (4-D) ones as tf_keras's fused kernel does.")
  flags.DEFINE_float("l2", 0.0, "L2 factor on every kernel (seed: 0).")
  flags.DEFINE_bool("fast_conv", False, "Compute block 7's conv (kernel covers the input) as one "
                    "matmul: same maths, faster on CPU, not bit-identical to Keras.")
  flags.DEFINE_integer("batch_size", 256, "Batch size, 1..256 (the dataset has 256 images).")
  flags.DEFINE_integer("epochs", 500, "Epochs.")
  flags.DEFINE_enum("optimizer", "adam", ["adam", "sgd"], "Keras 3 Adam, or SGD with momentum.")
  flags.DEFINE_float("lr", 1e-3, "Learning rate.")
  flags.DEFINE_float("sgd_momentum", 0.9, "SGD momentum (with --optimizer=sgd).")
  flags.DEFINE_bool("nesterov", True, "Nesterov momentum (with --optimizer=sgd).")
  flags.DEFINE_integer("seed", 0, "Seed of the initial weights and of the per-epoch shuffling.")
  flags.DEFINE_enum("mode", "auto", ["eager", "function", "xla", "auto"],
                    "How the step runs: eager, tf.function, tf.function(jit_compile=True), or "
                    "auto = xla with a GPU, function on CPU.")
  flags.DEFINE_bool("trace", trace_default, "Record every BN layer's batch and moving statistics "
                    "at every step (trace.npz + TensorBoard in --out_dir).")
  flags.DEFINE_string("out_dir", out_dir, "Directory for the outputs.")

  _check("width", parse_width)
  _check("block", parse_block)
  _bound("momentum", lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
  _bound("epsilon", lambda v: v > 0, "must be > 0")
  _bound("l2", lambda v: v >= 0, "must be >= 0")
  _bound("batch_size", lambda v: 1 <= v <= NUM_IMAGES,
         f"must be in [1, {NUM_IMAGES}] (the dataset has {NUM_IMAGES} images)")
  _bound("epochs", lambda v: v >= 1, "must be >= 1")
  _bound("lr", lambda v: v > 0, "must be > 0")
  _bound("sgd_momentum", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
  flags.register_multi_flags_validator(
      ["bessel", "batch_size"],
      lambda f: not (f["bessel"] and (f["batch_size"] == 1 or NUM_IMAGES % f["batch_size"] == 1)),
      message="with --bessel every batch needs >= 2 images (n/(n-1) is infinite for n = 1)")


def resolve_width(announce: bool = True) -> float:
  """--width, or 1 with a GPU and 1/16 on CPU (said on stderr when it picks)."""
  if FLAGS.width is not None:
    return parse_width(FLAGS.width)
  from bnraw.loop import has_gpu  # imports TensorFlow
  width = 1.0 if has_gpu() else 1 / 16
  if announce:
    why = "a GPU is present" if width == 1.0 else "no GPU found; --width=1 is the full network"
    print(f"width: {fractions.Fraction(width)} ({why})", file=sys.stderr)
  return width


def configs() -> tuple[DataConfig, ModelConfig, TrainConfig]:
  """The flag values as the library's frozen configurations."""
  data = DataConfig(case=int(FLAGS.case), image=FLAGS.image, block=parse_block(FLAGS.block))
  model = ModelConfig(width=resolve_width(), momentum=FLAGS.momentum, epsilon=FLAGS.epsilon,
                      bessel=FLAGS.bessel, bessel_scope=FLAGS.bessel_scope, l2=FLAGS.l2,
                      fast_conv=FLAGS.fast_conv)
  train = TrainConfig(batch_size=FLAGS.batch_size, epochs=FLAGS.epochs, optimizer=FLAGS.optimizer,
                      lr=FLAGS.lr, sgd_momentum=FLAGS.sgd_momentum, nesterov=FLAGS.nesterov,
                      seed=FLAGS.seed, mode=FLAGS.mode)
  return data, model, train


def flag_values(extra: Sequence[str] = ()) -> dict:
  """The common flags plus ``extra`` as {name: value}, for the ``config`` key of outputs."""
  return {name: FLAGS[name].value for name in (*COMMON_FLAGS, *extra)}


def reject_extra_args(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UsageError("", f"unexpected arguments: {' '.join(argv[1:])} (flags take the form "
                     "--name=value)")


def _fail(message: str) -> None:
  print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))


def run(main: Callable[[list[str]], Optional[int]]) -> None:
  """``app.run(main)``; bad flags or a :class:`UsageError` -> one line, exit status 2."""
  def guarded(argv):
    from absl import logging
    if not FLAGS["verbosity"].present:  # TF's INFO lines (checkpoint sharding...) are noise here
      logging.set_verbosity(logging.WARNING)
    from bnraw.commands import import_tensorflow_quietly
    import_tensorflow_quietly()
    from bnraw.loop import NonFiniteError
    try:
      return main(argv)
    except UsageError as e:
      _fail(str(e) if e.flag else e.problem)
    except NonFiniteError as e:
      print(f"{os.path.basename(sys.argv[0])}: {e}; stopped.", file=sys.stderr)
      return 3
    except KeyboardInterrupt:
      print(f"{os.path.basename(sys.argv[0])}: interrupted.", file=sys.stderr)
      return 128 + 2
  app.run(guarded, flags_parser=_parse_flags)
