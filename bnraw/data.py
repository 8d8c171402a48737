"""The seed's dataset: 256 images of 29x29x3, label i for image i.

* Case 1: every pixel of image i is i.
* Case 2: a block of image i (rows/cols ``block``, default the seed code's 12:16) is i; the rest
  is the photo.

Values are float32 in [0, 1] (uint8 value / 255). The seed used a random ImageNet photo we do not
have; :func:`default_image` makes a deterministic stand-in, and any Pillow-readable file works.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from bnraw.config import IMAGE_SIZE, NUM_IMAGES, DataConfig
from bnraw.errors import UsageError


class Dataset(NamedTuple):
  images: np.ndarray  # [256, 29, 29, 3] float32 in [0, 1]
  labels: np.ndarray  # [256] int32, labels[i] == i


def default_image(size: int = 96) -> Image.Image:
  """A deterministic photo-like RGB image: smooth colour gradients, rings and a few edges."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
  r = 0.5 + 0.5 * np.sin(6.0 * xx + 2.0 * yy)
  g = 0.5 + 0.5 * np.cos(9.0 * np.hypot(xx - 0.4, yy - 0.6))
  b = np.clip(0.3 + 0.7 * yy * (xx > 0.35) + 0.2 * (np.hypot(xx - 0.7, yy - 0.3) < 0.15), 0, 1)
  rgb = np.stack([r, g, b], axis=-1)
  return Image.fromarray(np.round(255.0 * rgb).astype(np.uint8), mode="RGB")


def load_image(path: str | None) -> np.ndarray:
  """The photo as uint8 ``[29, 29, 3]``: RGB, resized with Pillow's default filter."""
  if path is None:
    image = default_image()
  else:
    try:
      with Image.open(path) as opened:
        image = opened.convert("RGB")
    except FileNotFoundError:
      raise UsageError("image", f"no such file: {path}") from None
    except UnidentifiedImageError:
      raise UsageError("image", f"not an image Pillow can read: {path}") from None
    except OSError as e:
      raise UsageError("image", f"cannot read {path}: {e.strerror or e}") from None
  return np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.uint8)


def check_block(block: tuple[int, int]) -> None:
  start, stop = block
  if not 0 <= start < stop <= IMAGE_SIZE:
    raise UsageError("block", f"need 0 <= start < stop <= {IMAGE_SIZE}, got {start}:{stop}")


def make_dataset(config: DataConfig) -> Dataset:
  """Case 1 or 2 of the seed, as float32 images / 255 and int32 labels 0..255."""
  if config.case not in (1, 2):
    raise UsageError("case", f"must be 1 or 2, got {config.case}")
  check_block(config.block)
  photo = load_image(config.image)
  values = np.arange(NUM_IMAGES, dtype=np.float32)[:, None, None, None]
  if config.case == 1:
    images = np.broadcast_to(values, (NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
  else:
    images = np.repeat(photo[None].astype(np.float32), NUM_IMAGES, axis=0)
    start, stop = config.block
    images[:, start:stop, start:stop, :] = values
  return Dataset(images / np.float32(255.0), np.arange(NUM_IMAGES, dtype=np.int32))
