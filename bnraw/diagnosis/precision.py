"""What a mixed dtype policy does to BN's statistics: the same weights, run in float32.

Under mixed_float16/bfloat16 every BN layer receives its input rounded to the compute dtype
(and computed from rounded inputs, layer after layer), then upcasts it and takes the moments in
float32. :func:`statistics_vs_float32` compares each layer's population statistics (PreciseBN)
at the final weights with those of a float32 twin holding the very same weights: per layer the
max relative difference ``max|s_mixed - s_float32| / max|s_float32|`` of the mean and of the
variance. It is what float16/bfloat16 rounding moves the stored statistics by, at most, once
PreciseBN has recomputed them; the moving statistics carry that plus their own history.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bnraw.core import ops
from bnraw.diagnosis.precise_bn import raw_population_statistics


def _max_rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = float(np.abs(b).max())
  return float(np.abs(a - b).max()) / scale if scale else float(np.abs(a - b).max())


def statistics_vs_float32(mixed_statistics: Sequence[ops.Moments], float32_twin,
                          images: np.ndarray, batch_size: int) -> list[dict]:
  """Per BN layer ``{"layer", "mean_max_rel", "variance_max_rel"}``: ``mixed_statistics`` (the
  mixed model's PreciseBN statistics) against ``float32_twin``'s, a float32 raw model already
  holding the same weights."""
  reference = raw_population_statistics(float32_twin, images, batch_size)
  return [{"layer": layer.name, "mean_max_rel": _max_rel(mixed.mean, exact.mean),
           "variance_max_rel": _max_rel(mixed.variance, exact.variance)}
          for layer, mixed, exact in zip(float32_twin.batch_norms, mixed_statistics, reference)]
