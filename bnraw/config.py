"""Typed, frozen configuration: the single source of truth. Defaults are the seed's (docs/design.md
section 1). The flags in ``bnraw.cli.flags`` only map onto these; outputs and ``--resume`` record
:func:`record` of them, the same typed values whoever started the run."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

# The seed network at width 1: (kernel size, output channels) of conv blocks 1-7.
CONV_BLOCKS = ((7, 64), (7, 128), (5, 256), (5, 512), (5, 1024), (3, 2048), (3, 4096))
DENSE_UNITS = 1024
NUM_IMAGES = 256  # also the number of classes: label i for image i
IMAGE_SIZE = 29
CPU_WIDTH = 1 / 16  # the default width without a GPU (full width is a GPU workload)
# Trace histograms every this many steps (scalars: every step). Histograms at every step made a
# 500-epoch width-1/16 traced run take 122 s instead of 46 s (measured in issue 14).
HISTOGRAM_EVERY = 10
# Keras dtype policies: variables float32 always; layers compute in float32, float16 or bfloat16.
DTYPE_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
KERAS_INITIAL_LOSS_SCALE = 2.0 ** 15  # keras.optimizers.LossScaleOptimizer's initial_scale


def scaled(channels: int, width: float) -> int:
  """Hidden channel count at width multiplier ``width``: ``max(1, int(channels * width))``."""
  return max(1, int(channels * width))


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The seed's dataset: case 1 (whole image = i) or case 2 (a block = i on a photo)."""

  case: int = 2
  image: Optional[str] = None  # None: the project's deterministic default image
  block: tuple[int, int] = (12, 16)  # rows/cols [start, stop) of case 2's block (the seed's code)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The seed's ``model_toy``; ``momentum`` is Keras's (moving * m + batch * (1 - m))."""

  width: Optional[float] = None  # None: 1 with a GPU, CPU_WIDTH without (see resolved())
  momentum: float = 0.9
  epsilon: float = 1e-5
  bessel: bool = False
  # Which BN layers the legacy variant applies to: "all", or "conv" = only the 4-D (conv) layers,
  # which is what tf_keras does (its fused kernel corrects, its 2-D dense path does not).
  bessel_scope: str = "all"
  l2: float = 0.0
  # Compute block 7's conv (its 3x3 kernel covers its 3x3 input) as one matmul: same maths,
  # much faster on CPU, no longer bit-identical to Keras (ops.conv2d_as_matmul).
  fast_conv: bool = False
  # Keras's dtype policy: "mixed_*" computes convs, matmuls and activations in float16/bfloat16
  # with float32 variables; BN upcasts to float32 (bnraw.core.layers).
  dtype_policy: str = "float32"
  # Keras's BatchNormalization(synchronized=True): one-pass moments, summed over the replicas
  # under a strategy (every copy of the moving statistics then gets the same update).
  sync_bn: bool = False

  def resolved(self) -> "ModelConfig":
    """This config with ``width`` decided: 1 with a GPU, 1/16 without (imports TensorFlow)."""
    if self.width is not None:
      return self
    import tensorflow as tf
    width = 1.0 if tf.config.list_physical_devices("GPU") else CPU_WIDTH
    return dataclasses.replace(self, width=width)

  @property
  def compute_dtype(self) -> str:
    """``"float32"``, ``"float16"`` or ``"bfloat16"``: what the policy computes layers in."""
    return self.dtype_policy.replace("mixed_", "")

  def conv_channels(self) -> list[int]:
    return [scaled(c, self.resolved().width) for _, c in CONV_BLOCKS]

  def dense_units(self) -> int:
    return scaled(DENSE_UNITS, self.resolved().width)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation: Keras 3 Adam by default; SGD with (Nesterov) momentum as the alternative."""

  batch_size: int = 256
  epochs: int = 500
  optimizer: str = "adam"  # "adam" | "sgd"
  lr: float = 1e-3
  sgd_momentum: float = 0.9
  nesterov: bool = True
  seed: int = 0
  mode: str = "auto"  # "eager" | "function" | "xla" | "auto" (measures: bnraw.core.autotune)
  # Optimizer steps per compiled call (Keras's name); within an epoch, as Keras.
  steps_per_execution: int = 1
  # mixed_float16 only: the initial dynamic loss scale (None: Keras's 2**15). Keras's compile
  # wraps the optimizer in a LossScaleOptimizer exactly under that policy (bnraw.core.optim).
  loss_scale: Optional[float] = None
  # Replicas under tf.distribute.MirroredStrategy (bnraw.core.replicas): N GPUs, or the CPU
  # split into N logical devices; the global batch is split over them.
  replicas: int = 1
  # How a global batch reaches the replicas: "iid" (as drawn), or "sorted" (each global batch
  # sorted by label before it is split: non-iid shards, replica 0 the lowest labels).
  shards: str = "iid"

  def initial_loss_scale(self, model: "ModelConfig") -> Optional[float]:
    """The loss scale a run starts with: None (no loss scaling) unless mixed_float16."""
    if model.dtype_policy != "mixed_float16":
      return None
    return self.loss_scale if self.loss_scale is not None else KERAS_INITIAL_LOSS_SCALE


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def record(data: DataConfig, model: ModelConfig, train: TrainConfig, **options: Any) -> dict:
  """What outputs and checkpoints store: ``{"data": {...}, "model": {...}, "train": {...},
  "options": {...}}`` with the typed values (the model's width resolved), JSON-ready."""
  as_json = lambda config: {k: list(v) if isinstance(v, tuple) else v
                            for k, v in dataclasses.asdict(config).items()}
  return {"data": as_json(data), "model": as_json(model.resolved()), "train": as_json(train),
          "options": dict(options)}


def normalized(saved: dict) -> dict:
  """A stored :func:`record` as this version would write it: settings added since it was made
  take their defaults (a run from before mixed precision was float32), unknown ones are
  dropped. Compare records through this."""
  data, model, train, options = from_record(saved)
  return record(data, model, train, **options)


def from_values(cls, values: dict):
  """A config of class ``cls`` from its stored (JSON) values: lists back to tuples, settings
  this version does not know dropped, missing ones at their defaults."""
  fields = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()
                if k in fields})


def from_record(saved: dict) -> tuple[DataConfig, ModelConfig, TrainConfig, dict]:
  """The inverse of :func:`record`: the configs a stored run was made with, and its options."""
  return (*(from_values(cls, saved[name]) for name, cls in SECTIONS.items()),
          dict(saved.get("options", {})))
