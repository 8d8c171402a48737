"""Random seed-shaped examples for the core tests: images in [0, 1), distinct labels."""

import numpy as np


def random_examples(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``n`` random 29x29 RGB images (NHWC, float32) and ``n`` distinct labels in [0, 256)."""
  rng = np.random.default_rng(seed)
  return (rng.uniform(0, 1, (n, 29, 29, 3)).astype(np.float32),
          rng.permutation(256)[:n].astype(np.int32))
