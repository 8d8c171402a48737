"""Per-op tables from a TensorFlow profiler capture, through XProf (the optional ``xprof``
package, ``pip install 'bnraw[xprof]'``): the top ops by self time, and each BN layer's share of
the step split into statistics, normalisation, moving update and backward pass.

bnraw names its ops by model and layer, as Keras does, so XProf's ``framework_op_stats``
attributes them: ``model_toy/bn_3/moments/*`` (statistics), ``model_toy/bn_3/batchnorm/*``
(normalisation), ``model_toy/bn_3_moving_update/*`` (the moving-average update) and
``gradient_tape/model_toy/bn_3/*`` (their gradients). Where the table has
device rows (a GPU), only those count: host rows are then kernel launches. Under XLA the framework
ops are compiled into clusters and the split is not made here (``hlo_stats`` keeps the TF op
names of fused HLO and could attribute them: not done yet); an eager capture has no name scopes.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Optional, Sequence

PARTS = {"statistics": "{scope}{layer}/moments/", "normalization": "{scope}{layer}/batchnorm/",
         "moving_update": "{scope}{layer}_moving_update/",
         "backward": "gradient_tape/{scope}{layer}/"}


def framework_op_stats(profile_dir: str) -> Optional[list[dict]]:
  """The capture's op table (``operation``, ``type``, ``occurrences``, ``self_time_us``), or
  None when XProf is not installed or there is no capture."""
  try:
    from xprof.convert import raw_to_tool_data
  except ImportError:
    return None
  captures = sorted(glob.glob(os.path.join(profile_dir, "plugins", "profile", "*")))
  paths = sorted(glob.glob(os.path.join(captures[-1], "*.xplane.pb"))) if captures else []
  if not paths:  # only the newest capture: earlier ones in the same folder are not mixed in
    return None
  data, _ = raw_to_tool_data.xspace_to_tool_data(paths, "framework_op_stats", {})
  if not data:  # the conversion failed; the timings stand without it
    return None
  table = json.loads(data)[0]  # a gviz DataTable: cols with ids, rows of {"c": [{"v": ...}]}
  ids = [col["id"] for col in table["cols"]]
  rows = [dict(zip(ids, (cell.get("v") for cell in row["c"]))) for row in table["rows"]]
  rows = [r for r in rows if r["type"] != "IDLE"]
  if any(r["host_or_device"] == "Device" for r in rows):
    rows = [r for r in rows if r["host_or_device"] == "Device"]
  return [{"operation": r["operation"], "type": r["type"], "occurrences": int(r["occurrences"]),
           "self_time_us": float(r["total_self_time"])} for r in rows]


def summarize(ops: Sequence[dict], layer_names: Sequence[str], top: int = 10,
              split: bool = True, model: str = "") -> dict:
  """The ``top`` ops by self time and, per BN layer of the model named ``model``, each part's
  share of all ops' self time (``split=False``: None, for a capture whose ops lost their names,
  XLA's)."""
  scope = f"{model}/" if model else ""
  total = sum(op["self_time_us"] for op in ops) or 1.0
  ranked = sorted(ops, key=lambda op: -op["self_time_us"])
  shares = {}
  for layer in layer_names:
    parts = {part: sum(op["self_time_us"] for op in ops
                       if op["operation"].startswith(prefix.format(scope=scope, layer=layer))) / total
             for part, prefix in PARTS.items()}
    shares[layer] = {**parts, "total": sum(parts.values())} if split else None
  return {"tool": "xprof framework_op_stats", "self_time_us": total,
          "top_ops": [{**op, "share": op["self_time_us"] / total} for op in ranked[:top]],
          "bn_layers": shares}


def format_summary(summary: dict) -> str:
  lines = ["  top ops by self time: " + ", ".join(
      f"{op['operation']} {op['share']:.1%}" for op in summary["top_ops"][:5])]
  lines.append("  BN share of the step (stats / norm / moving update / backward = total):")
  for layer, s in summary["bn_layers"].items():
    if s is None:
      lines.append(f"    {layer}: n/a (XLA compiles the ops into clusters)")
      continue
    lines.append(f"    {layer}: {s['statistics']:.1%} / {s['normalization']:.1%} / "
                 f"{s['moving_update']:.2%} / {s['backward']:.1%} = {s['total']:.1%}")
  return "\n".join(lines)
