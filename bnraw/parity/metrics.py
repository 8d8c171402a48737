"""The relative difference compare and its first-difference report measure with."""

import numpy as np


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
  """``max|a - b| / max|b|`` (0 when both are all zero)."""
  scale = float(np.abs(b).max()) if np.size(b) else 0.0
  diff = float(np.abs(np.asarray(a, np.float64) - b).max()) if np.size(b) else 0.0
  return diff / scale if scale else diff
