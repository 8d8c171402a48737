"""The diagnosis in TensorBoard: the answer to look at, beside the trace.

Written into ``{out_dir}/tensorboard`` through a :class:`~bnraw.tracing.tensorboard.
TensorBoardWriter`:

* ``diagnosis/<loss>`` (fit, train_mode_final, precise_bn, evaluate, ...) and
  ``attribution/<part>`` scalars at every diagnosed epoch, grouped by a custom-scalars layout
  into two charts: "losses: fit vs evaluate vs PreciseBN" and "evaluate - fit, by cause";
* ``diagnosis/report``: the report as markdown tables (losses and accuracies, the parts, the
  per-layer split, the dominant cause and its fix);
* ``diagnosis/per_layer``: the per-layer split of the moving-statistics part as a bar chart;
* ``{layer}/amplification``: per BN layer, a histogram over channels of ``1/sqrt(var + eps)``
  with the final moving variance: the factor by which a stale mean shift is magnified
  (:func:`amplification`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from bnraw.diagnosis.decompose import ATTRIBUTION, LOSS_KEYS
from bnraw.diagnosis.explain import (CAUSE, DESCRIBE, NO_GAP, metric_label, mixed_precision_lines,
                                    parts_of)

CURVES = ("fit", "train_mode_final", "precise_bn", "evaluate")


def layout():
  """The custom-scalars layout: the two charts that answer the question."""
  from tensorboard.plugins.custom_scalar import layout_pb2
  chart = lambda title, regexes: layout_pb2.Chart(
      title=title, multiline=layout_pb2.MultilineChartContent(tag=regexes))
  return layout_pb2.Layout(category=[layout_pb2.Category(title="bnraw diagnosis", chart=[
      chart("losses: fit vs evaluate vs PreciseBN",
            [rf"^diagnosis/{key}$" for key in CURVES]),
      chart("evaluate - fit, by cause", [r"^attribution/.*"])])])


def scalars(result: dict) -> dict[str, float]:
  """The per-epoch values: every known loss and part (``moving_statistics`` where no history
  splits it)."""
  out = {f"diagnosis/{k}": v for k, v in result["losses"].items() if v is not None}
  out.update({f"attribution/{k}": v for k, v in parts_of(result)[0].items()})
  return out


def markdown(diagnosis: dict, title: str = "") -> str:
  """The report as markdown tables."""
  fmt = lambda v, spec="{:.4f}": "n/a" if v is None else spec.format(v)
  losses, accuracy = diagnosis["losses"], diagnosis["accuracy"]
  lines = [f"**{title}**", ""] if title else []
  lines += [f"| | loss | {metric_label(diagnosis)} | meaning |", "|---|---:|---:|---|"]
  lines += [f"| {key} | {fmt(losses[key])} | {fmt(accuracy[key])} | {DESCRIBE[key]} |"
            for key in LOSS_KEYS]
  parts, cause = parts_of(diagnosis)
  total = sum(abs(v) for v in parts.values()) or 1.0
  keys = [key for key, _, _ in ATTRIBUTION] + (["moving_statistics"]
                                               if "moving_statistics" in parts else [])
  lines += ["", "| evaluate - fit, by cause | loss | share of parts |", "|---|---:|---:|"]
  lines += [f"| {key} | {fmt(parts.get(key), '{:+.4f}')} | "
            f"{fmt(abs(parts[key]) / total if key in parts else None, '{:.1%}')} |"
            for key in keys]
  if diagnosis.get("frozen"):
    lines += ["", f"frozen BN layers (inference branch inside fit): "
              f"{', '.join(diagnosis['frozen'])}"]
  lines += ["", "| BN layer | part of evaluate - precise_bn |", "|---|---:|"]
  lines += [f"| {p['layer']} | {p['contribution']:+.4f} |" for p in diagnosis["per_layer"]]
  lines += mixed_precision_lines(diagnosis)
  if cause == "none":
    lines += ["", f"**no gap to explain**: every part is below {NO_GAP:g} of the loss."]
  else:
    why, fix = CAUSE[cause]
    lines += ["", f"**dominant cause: {cause}** ({parts[cause]:+.4f}): {why}.", "",
              f"**fix**: {fix}."]
  return "\n".join(lines)


def bar_chart(per_layer: Sequence[dict], width: int = 640, height: int = 300) -> np.ndarray:
  """``[height, width, 3]`` uint8: one bar per layer, up for a positive contribution."""
  from PIL import Image, ImageDraw
  image = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(image)
  values = np.array([p["contribution"] for p in per_layer], np.float64)
  scale = float(np.abs(values).max()) if len(values) else 1.0
  scale = scale or 1.0
  top, bottom = 24, height - 24
  zero = (top + bottom) // 2
  draw.line([(0, zero), (width, zero)], fill="gray")
  slot = width / max(len(values), 1)
  for i, (p, value) in enumerate(zip(per_layer, values)):
    x0, x1 = int(i * slot + slot * 0.2), int((i + 1) * slot - slot * 0.2)
    y = zero - value / scale * (zero - top)
    draw.rectangle([x0, min(y, zero), x1, max(y, zero)],
                   fill=(200, 60, 40) if value > 0 else (40, 100, 200))
    draw.text((x0, bottom + 4), p["layer"], fill="black")
    draw.text((x0, 4 if value > 0 else zero + 4), f"{value:+.3g}", fill="black")
  return np.asarray(image)


def amplification(layers) -> dict[str, np.ndarray]:
  """``1/sqrt(moving_variance + epsilon)`` per channel, for raw or Keras BN layers."""
  return {layer.name: 1.0 / np.sqrt(np.asarray(layer.moving_variance, np.float64)
                                    + layer.epsilon) for layer in layers}


def write(board, result: dict, *, epoch: int, title: str = "",
          amplification: Optional[dict] = None) -> None:
  """The final diagnosis at ``epoch``: scalars, layout, report, bar chart, amplification."""
  import tensorflow as tf
  from tensorboard.plugins.custom_scalar import summary as custom_scalar

  def final():
    tf.summary.experimental.write_raw_pb(custom_scalar.pb(layout()).SerializeToString(), step=0)
    tf.summary.text("diagnosis/report", markdown(result, title))
    tf.summary.image("diagnosis/per_layer", bar_chart(result["per_layer"])[None])
    for layer, factor in (amplification or {}).items():
      tf.summary.histogram(f"{layer}/amplification", factor)

  board.scalars(epoch, scalars(result))
  board.run(epoch, final)
