"""Frozen configuration. Defaults are the seed's (DESIGN.md section 1); absl flags live in
``bnraw.commands.flags`` and only map onto these."""

from __future__ import annotations

import dataclasses
from typing import Optional

# The seed network at width 1: (kernel size, output channels) of conv blocks 1-7.
CONV_BLOCKS = ((7, 64), (7, 128), (5, 256), (5, 512), (5, 1024), (3, 2048), (3, 4096))
DENSE_UNITS = 1024
NUM_IMAGES = 256  # also the number of classes: label i for image i
IMAGE_SIZE = 29


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

  width: float = 1.0
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

  def conv_channels(self) -> list[int]:
    return [scaled(c, self.width) for _, c in CONV_BLOCKS]

  def dense_units(self) -> int:
    return scaled(DENSE_UNITS, self.width)


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
  mode: str = "auto"  # "eager" | "function" | "xla" | "auto"
