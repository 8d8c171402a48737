"""The step trace: every BN layer's statistics at every optimizer step, stored column-wise.

Per step the compiled training step returns (bnraw.core.step.TRACE_KEYS), for each BN layer:
the batch mean/variance it normalised with, and its moving mean/variance before and after the
update. :class:`TraceRecorder` collects them; ``trace.npz`` holds one array per layer and quantity,
``[steps, channels]`` (on N replicas ``[steps, N, channels]``, every replica's own statistics,
and each summary ``[steps, N]``), plus per-step summaries per layer:

* ``mean_gap``: ``max |moving_mean_before - batch_mean|`` (how stale the statistics inference
  would have used on this batch are),
* ``variance_gap``: the same for the variance,
* ``min_batch_variance``,
* ``max_amplification``: ``max 1/sqrt(batch_variance + eps)``, the factor by which a stale mean
  shift is magnified.

With loss scaling (mixed_float16) also, per step, ``loss_scale`` (the scale the step used) and
``skipped`` (1: gradients not finite, weights untouched, BN statistics moved all the same).

Size: ``6 * sum(channels) * 4`` bytes per step: 220 KB at full width (sum 9,152 channels), so a
500-step full-width run is about 110 MB; 14 KB per step at width 1/16.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from bnraw.core.loop import StepRecord
from bnraw.core.step import TRACE_KEYS
from bnraw.outputs import write_atomic

SUMMARY_KEYS = ("mean_gap", "variance_gap", "min_batch_variance", "max_amplification")
TRACE_FILE = "trace.npz"


def summarize(layer_trace: dict, epsilon: float) -> dict:
  """The four per-step summaries of one layer, from its TRACE_KEYS arrays (any leading shape)."""
  batch_variance = np.asarray(layer_trace["batch_variance"])
  gap = lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(axis=-1)
  return {
      "mean_gap": gap(layer_trace["moving_mean_before"], layer_trace["batch_mean"]),
      "variance_gap": gap(layer_trace["moving_variance_before"], batch_variance),
      "min_batch_variance": batch_variance.min(axis=-1),
      "max_amplification": (1.0 / np.sqrt(batch_variance + epsilon)).max(axis=-1),
  }


def layer_epsilon(epsilon, index: int) -> float:
  """Layer ``index``'s epsilon from one for every layer (the seed) or one per layer (a user's
  model)."""
  return float(epsilon[index]) if np.ndim(epsilon) else float(epsilon)


class TraceRecorder:
  """Collects :class:`bnraw.core.loop.StepRecord` traces in memory; :meth:`save` writes the npz."""

  def __init__(self, layer_names: list[str], epsilon: float):
    self.layer_names = list(layer_names)
    self.epsilon = epsilon
    self.steps: list[int] = []
    self.epochs: list[int] = []
    self.loss: list[float] = []
    self.accuracy: list[float] = []
    self.loss_scale: list[float] = []  # with loss scaling only (mixed_float16)
    self.skipped: list[bool] = []
    self.columns = {(layer, key): [] for layer in self.layer_names for key in TRACE_KEYS}

  def extend_from(self, trace: "Trace", before_step: int) -> None:
    """Takes over an earlier trace's rows with step < ``before_step`` (a resumed run continues
    its trace without gaps or duplicates)."""
    rows = np.nonzero(trace.steps < before_step)[0]
    self.steps += trace.steps[rows].tolist()
    self.epochs += trace.arrays["epoch"][rows].tolist()
    self.loss += trace.arrays["loss"][rows].tolist()
    self.accuracy += trace.arrays["accuracy"][rows].tolist()
    if "loss_scale" in trace.arrays:
      self.loss_scale += trace.arrays["loss_scale"][rows].tolist()
      self.skipped += trace.arrays["skipped"][rows].astype(bool).tolist()
    for (layer, key), column in self.columns.items():
      column += list(trace.series(layer, key)[rows])

  def __call__(self, record: StepRecord) -> None:
    self.steps.append(record.step)
    self.epochs.append(record.epoch)
    self.loss.append(record.loss)
    self.accuracy.append(record.accuracy)
    if record.loss_scale is not None:
      self.loss_scale.append(record.loss_scale)
      self.skipped.append(record.skipped)
    for key in TRACE_KEYS:
      for layer, value in zip(self.layer_names, record.trace[key]):
        self.columns[(layer, key)].append(np.asarray(value, np.float32))

  def arrays(self) -> dict[str, np.ndarray]:
    """Flat ``{"bn_3/batch_mean": [steps, C], ..., "step": [steps], ...}``."""
    out = {"step": np.asarray(self.steps, np.int64), "epoch": np.asarray(self.epochs, np.int64),
           "loss": np.asarray(self.loss, np.float64),
           "accuracy": np.asarray(self.accuracy, np.float64),
           # the training step always runs the training branch; 1 = training, 0 = inference
           "branch": np.ones(len(self.steps), np.int8),
           "epsilon": np.asarray(self.epsilon), "layers": np.asarray(self.layer_names)}
    if self.loss_scale:
      out["loss_scale"] = np.asarray(self.loss_scale, np.float32)
      out["skipped"] = np.asarray(self.skipped, np.int8)
    for index, layer in enumerate(self.layer_names):
      layer_arrays = {key: np.stack(self.columns[(layer, key)]) if self.steps else
                      np.zeros((0, 0), np.float32) for key in TRACE_KEYS}
      for key, value in layer_arrays.items():
        out[f"{layer}/{key}"] = value
      if self.steps:
        epsilon = layer_epsilon(self.epsilon, index)
        for key, value in summarize(layer_arrays, epsilon).items():
          out[f"{layer}/{key}"] = value.astype(np.float32)
    return out

  def save(self, path: str) -> None:
    arrays = self.arrays()
    write_atomic(path, lambda f: np.savez(f, **arrays), mode="wb")


@dataclasses.dataclass
class LayerStep:
  """One layer's update at one step, as ``Trace.at`` returns it."""

  layer: str
  step: int
  epoch: int
  branch: str
  values: dict  # TRACE_KEYS and SUMMARY_KEYS -> arrays / floats


class Trace:
  """A loaded ``trace.npz``: ``Trace.load(out_dir).at("bn_3", step=41)``."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays
    self.layers = [str(name) for name in arrays["layers"]]
    self.steps = arrays["step"]
    # a run on N replicas holds every replica's statistics: [steps, N, C] (None: one device)
    first = arrays.get(f"{self.layers[0]}/batch_mean") if self.layers else None
    self.replicas = int(first.shape[1]) if first is not None and first.ndim == 3 else None

  @classmethod
  def load(cls, path: str) -> "Trace":
    """From a ``trace.npz`` file or the run directory holding it."""
    if os.path.isdir(path):
      path = os.path.join(path, TRACE_FILE)
    with np.load(path) as data:
      return cls({key: data[key] for key in data.files})

  def _row(self, step: int) -> int:
    rows = np.nonzero(self.steps == step)[0]
    if not len(rows):
      raise KeyError(f"step {step} not in trace (steps {self.steps.min()}..{self.steps.max()})")
    return int(rows[0])

  def series(self, layer: str, key: str) -> np.ndarray:
    """``[steps, ...]`` array of one quantity of one layer."""
    if layer not in self.layers:
      raise KeyError(f"no layer {layer!r}; layers: {', '.join(self.layers)}")
    return self.arrays[f"{layer}/{key}"]

  def check_replica(self, replica: Optional[int]) -> None:
    """A ValueError unless ``replica`` names one of this trace's replicas (None: one device)."""
    if self.replicas is None and replica is not None:
      raise ValueError("the run was on one device: there is no replica to choose")
    if self.replicas is not None and not (replica is not None and 0 <= replica < self.replicas):
      raise ValueError(f"the run was on {self.replicas} replicas, each with its own copy of the "
                       f"statistics: choose one of 0..{self.replicas - 1}")

  def at(self, layer: str, step: int, replica: Optional[int] = None) -> LayerStep:
    """Everything recorded for ``layer`` at ``step`` (on replicas: ``replica``'s)."""
    self.check_replica(replica)
    row = self._row(step)
    pick = (lambda a: a) if replica is None else (lambda a: a[replica])
    values = {key: pick(self.series(layer, key)[row]) for key in (*TRACE_KEYS, *SUMMARY_KEYS)}
    branch = "training" if self.arrays["branch"][row] else "inference"
    return LayerStep(layer, step, int(self.arrays["epoch"][row]), branch, values)

  def first_step_where(self, layer: str, key: str, above: float,
                       replica: Optional[int] = None) -> Optional[int]:
    """The first step at which summary ``key`` of ``layer`` exceeds ``above`` (None if never);
    on replicas in ``replica``'s copy, or in any replica's (None)."""
    series = self.series(layer, key)
    if self.replicas is not None:
      series = series.max(axis=1) if replica is None else series[:, replica]
    elif replica is not None:
      self.check_replica(replica)
    hits = np.nonzero(series > above)[0]
    return int(self.steps[hits[0]]) if len(hits) else None


def _shown(values, limit: int) -> str:
  values = np.asarray(values)
  shown = " ".join(f"{v:+.6g}" for v in values[:limit])
  return shown + (f" ... ({len(values)} channels)" if len(values) > limit else "")


def describe(trace: "Trace", layer: str, step: int, limit: int = 6,
             replica: Optional[int] = None) -> str:
  """The update of ``layer`` at ``step`` (on replicas: ``replica``'s copy), with the
  moving-average identity checked."""
  at = trace.at(layer, step, replica)
  v = at.values
  momentum_hint = ""
  delta = v["moving_mean_before"] - v["batch_mean"]
  if np.abs(delta).max() > 0:
    # recover m from moving_after = m * before + (1 - m) * batch, as a readable check
    m = (v["moving_mean_after"] - v["batch_mean"]) / delta
    momentum_hint = f"  (implied momentum {np.median(m):.6g})"
  where = "" if replica is None else f", replica {replica} of {trace.replicas}"
  lines = [f"{layer} at step {step} (epoch {at.epoch + 1}{where}), branch: {at.branch}"
           f"{momentum_hint}"]
  if "loss_scale" in trace.arrays:
    row = trace._row(step)
    skipped = bool(trace.arrays["skipped"][row])
    lines.append(f"  loss scale {float(trace.arrays['loss_scale'][row]):g}: " + (
        "step SKIPPED (gradients not finite): the weights did not move, this update did"
        if skipped else "gradients finite, step applied"))
  for key in ("batch_mean", "moving_mean_before", "moving_mean_after", "batch_variance",
              "moving_variance_before", "moving_variance_after"):
    lines.append(f"  {key:24} {_shown(v[key], limit)}")
  lines.append("  " + "   ".join(f"{key} {float(v[key]):.6g}" for key in
                                  ("mean_gap", "variance_gap", "min_batch_variance",
                                   "max_amplification")))
  return "\n".join(lines)
