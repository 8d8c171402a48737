"""What a mixed dtype policy does to BN's statistics: the same weights, run in float32.

Under mixed_float16/bfloat16 every BN layer receives its input rounded to the compute dtype
(and computed from rounded inputs, layer after layer), then upcasts it and takes the moments in
float32. :func:`statistics_vs_float32` compares each layer's population statistics (PreciseBN)
at the final weights with those of a float32 twin holding the very same weights: per layer the
max relative difference ``max|s_mixed - s_float32| / max|s_float32|`` of the mean and of the
variance. It measures what float16/bfloat16 rounding moves the statistics by at these weights
(as PreciseBN would store them); the moving statistics carry that plus their own history. The
twin is a float32 raw seed network (the diagnose tool builds it) or, for a user's Keras model, a
clone built under the float32 policy (:func:`keras_twin`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bnraw.core import ops


def _max_rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = float(np.abs(b).max())
  return float(np.abs(a - b).max()) / scale if scale else float(np.abs(a - b).max())


def statistics_vs_float32(names: Sequence[str], mixed: Sequence[ops.Moments],
                          float32: Sequence[ops.Moments]) -> list[dict]:
  """Per BN layer ``{"layer", "mean_max_rel", "variance_max_rel"}`` of ``mixed`` against
  ``float32`` (PreciseBN statistics of the same weights under the two policies)."""
  return [{"layer": name, "mean_max_rel": _max_rel(m.mean, f.mean),
           "variance_max_rel": _max_rel(m.variance, f.variance)}
          for name, m, f in zip(names, mixed, float32)]


def keras_twin(model):
  """A clone of a Keras ``model`` whose layers compute in float32, holding its weights; None
  when a nested model keeps a mixed layer (the clone rebuilds top-level layers only)."""
  import keras
  from bnraw.models.user import all_layers
  before = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("float32")
  try:
    twin = keras.models.clone_model(
        model, clone_function=lambda layer: layer.__class__.from_config(
            {**layer.get_config(), "dtype": "float32"}))
  finally:
    keras.mixed_precision.set_global_policy(before)
  if any(layer.compute_dtype != "float32" for layer in all_layers(twin)):
    return None
  twin.set_weights(model.get_weights())
  return twin
