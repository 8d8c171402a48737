"""The plain-language diagnosis report the diagnose script prints."""

from __future__ import annotations

from typing import Optional

from bnraw.config import NUM_IMAGES
from bnraw.diagnosis.decompose import ATTRIBUTION, LOSS_KEYS

DESCRIBE = {
    "fit": "what fit printed: last epoch, each batch's own statistics, weights before each step",
    "train_mode_final": "final weights, each batch's own statistics (training branch)",
    "precise_bn": "final weights, population statistics recomputed now (PreciseBN)",
    "last_batch_stats": "final weights, statistics of the last training batch",
    "no_bessel": "final weights, moving statistics without the Bessel factor",
    "evaluate": "what evaluate gives: final weights, final moving statistics",
    "evaluate_distributed": "evaluate under the strategy: each shard with its replica's copy",
    "tf_keras_saved": "the same model saved by tf_keras 2: the mean of the replicas' copies",
}

CAUSE = {
    "weight_update": (
        "the weights themselves: fit reports each batch's loss *before* that batch's update, "
        "evaluate sees the weights after the last one",
        "nothing to fix in BN; measure the training loss after training (evaluate in training "
        "mode) or compare at the same weights"),
    "batch_vs_population": (
        "batch statistics differ from whole-dataset statistics (batches smaller than the data)",
        "larger batches, or PreciseBN statistics for inference"),
    "stale_statistics": (
        "BN's statistics were collected under the weights *before* the last update; the update "
        "shifted every layer's activations, and channels with a small variance magnify the "
        "shift (momentum 0 cannot help: the statistics are always one update old)",
        "recompute the statistics at the final weights (PreciseBN: `--fix precise_bn`, one "
        "extra pass over the training data)"),
    "ema_lag": (
        "the moving average still carries statistics from older weights (momentum > 0)",
        "a smaller momentum, or PreciseBN statistics"),
    "bessel": (
        "the moving variance holds the unbiased n/(n-1) variance while training normalised with "
        "the biased one (legacy Keras 2 / tf_keras fused BN)",
        "Keras 3's BN (no Bessel factor), or PreciseBN statistics"),
    "replica_divergence": (
        "each replica kept its own copy of the moving statistics, from its own shards; evaluate "
        "under the strategy normalises each shard with its replica's copy, a saved model holds "
        "replica 0's",
        "synchronized BN (`--sync_bn`: one update for every copy), or PreciseBN statistics over "
        "all shards written into every copy (`--fix precise_bn`)"),
    "moving_statistics": (
        "the moving statistics differ from the population statistics at the final weights "
        "(stale statistics, EMA lag and any Bessel factor together)",
        "recompute the statistics at the final weights (PreciseBN: `--fix precise_bn`)"),
}


NO_GAP = 1e-4  # parts smaller than this fraction of the loss are float noise, not a gap


def _num(value: Optional[float], fmt: str = "{:.4f}") -> str:
  return "n/a" if value is None else fmt.format(value)


def parts_of(diagnosis: dict) -> tuple[dict, str]:
  """The known parts of the gap (with ``moving_statistics`` = evaluate - precise_bn where no
  training history splits it) and the dominant one, or "none" when every part is below
  ``NO_GAP`` of the loss. The one rule the report, TensorBoard and the sweep share."""
  parts = {k: v for k, v in diagnosis["attribution"].items() if v is not None}
  if diagnosis["attribution"].get("stale_statistics") is None:
    parts["moving_statistics"] = (diagnosis["losses"]["evaluate"]
                                  - diagnosis["losses"]["precise_bn"])
  if not parts:
    return parts, "none"
  dominant = max(parts, key=lambda k: abs(parts[k]))
  evaluate = diagnosis["losses"]["evaluate"]
  return parts, dominant if abs(parts[dominant]) >= NO_GAP * max(abs(evaluate), 1e-12) else "none"


def metric_label(diagnosis: dict) -> str:
  """The second column's name: the seed's accuracy, or a user model's own metric (or none)."""
  if "metric" not in diagnosis:
    return "accuracy"
  return diagnosis["metric"]["name"] if diagnosis["metric"] else "no metric"


def fixed_line(diagnosis: dict) -> str:
  """What the fixed model evaluates to, and where it went."""
  fixed = diagnosis["fixed"]
  return (f"fixed model: evaluate loss {fixed['evaluate']['loss']:.4f}  {metric_label(diagnosis)} "
          f"{_num(fixed['evaluate']['accuracy'])}"
          + (f"  saved to {fixed['saved']}" if fixed.get("saved") else ""))


def mixed_precision_lines(diagnosis: dict) -> list[str]:
  """The loss scaling and rounding paragraphs of a mixed-precision run (none otherwise)."""
  lines = []
  scaling = diagnosis.get("loss_scaling")
  if scaling:
    at = scaling.get("skipped_at")
    last = f", the last at step {at[-1]}" if at else ""
    lines += ["", f"loss scaling: {scaling['skipped_steps']} of {scaling['steps']} steps skipped"
              f"{last} (gradients not finite: the weights stayed, the BN statistics moved all the "
              "same)."]
    cost = scaling["skipped_updates_cost"]
    if scaling["skipped_steps"] and cost is not None:
      lines.append(f"  evaluate without those statistics-only updates "
                   f"{scaling['evaluate_without_skipped_updates']:.4f}: they cost {cost:+.2g} "
                   "(inside stale_statistics + ema_lag).")
    elif scaling["skipped_steps"]:
      lines.append("  their cost needs the per-step history: --impl=raw prices it.")
  precision = diagnosis.get("precision")
  if precision:
    rows = precision["statistics_vs_float32"]
    lines += ["", f"{precision['dtype_policy']}: PreciseBN statistics at the final weights "
              "against a float32 run of the same weights, max relative difference "
              "(mean / variance):"]
    lines.append("  " + "  ".join(f"{r['layer']} {r['mean_max_rel']:.1e}/"
                                  f"{r['variance_max_rel']:.1e}" for r in rows))
  return lines


def report(diagnosis: dict, title: str = "") -> str:
  """The gap, the table, the attribution, the per-layer split, the dominant cause and the fix."""
  losses, accuracy = diagnosis["losses"], diagnosis["accuracy"]
  lines = [title] if title else []
  distributed = "evaluate_distributed" in losses  # replicas: the gap is to that evaluate
  fit = losses["fit"]
  evaluate = losses["evaluate_distributed" if distributed else "evaluate"]
  if distributed:
    accuracy = {**accuracy, "evaluate": accuracy["evaluate_distributed"],
                "evaluate_saved": accuracy["evaluate"]}
  short = metric_label(diagnosis)
  if fit is not None:
    lines.append(f"fit printed    loss {fit:.4f}  {short} {_num(accuracy['fit'])}")
  lines.append(f"evaluate gives loss {evaluate:.4f}  {short} {_num(accuracy['evaluate'])}")
  if fit is not None:
    accuracy_gap = (None if accuracy["fit"] is None or accuracy["evaluate"] is None
                    else accuracy["evaluate"] - accuracy["fit"])
    lines.append(f"gap            loss {evaluate - fit:+.4f}  {short} "
                 f"{_num(accuracy_gap, '{:+.4f}')}")
  if "metric" in diagnosis:  # a user's Keras model: its own metric, or none
    metric = diagnosis["metric"]
    lines.append(f"(second column: {metric['name']} ({metric['class']}), the model's first "
                 "compiled metric)" if metric else "(the model has no compiled metric)")
  name = 20 if distributed else 18  # the name column fits evaluate_distributed
  lines += ["", f"{'':{name}} {'loss':>9} {short[:9]:>9}  meaning"]
  for key in LOSS_KEYS:
    shown = "evaluate_saved" if distributed and key == "evaluate" else key
    what = ("evaluate on one device after save/load: replica 0's copy" if shown != key
            else DESCRIBE[key])
    lines.append(f"{shown:{name}} {_num(losses[key]):>9} "
                 f"{_num(accuracy[shown if distributed else key]):>9}  {what}")
  if distributed:
    lines.append(f"{'evaluate_distributed':{name}} {_num(evaluate):>9} "
                 f"{_num(accuracy['evaluate']):>9}  {DESCRIBE['evaluate_distributed']}")
    if "tf_keras_saved" in losses:
      lines.append(f"{'tf_keras_saved':{name}} {_num(losses['tf_keras_saved']):>9} "
                   f"{_num(accuracy['tf_keras_saved']):>9}  {DESCRIBE['tf_keras_saved']}")
  parts, dominant = parts_of(diagnosis)
  no_history = "moving_statistics" in parts
  total = sum(abs(v) for v in parts.values()) or 1.0
  share = lambda value: f"  ({100 * abs(value) / total:4.1f}% of |parts|)"
  lines.append("")
  lines.append("evaluate - fit, split by cause (the parts sum to the gap):" if fit is not None else
               "evaluate - train_mode_final, split by cause (no fit history: the training-"
               "history causes are n/a):")
  for key in [k for k, _, _ in ATTRIBUTION] + (["replica_divergence"] if distributed else []):
    value = diagnosis["attribution"][key]
    lines.append(f"  {key:20} {_num(value, '{:+.4f}'):>9}{'' if value is None else share(value)}")
  if distributed:
    r = diagnosis["replicas"]
    lines += ["", f"{r['count']} replicas of {r['per_replica_batch']} examples each: the saved "
              f"model holds {r['saved_copy'].split(' (')[0]}'s copy of the moving statistics"
              + (" (tf_keras 2 would save the mean of the copies)" if "tf_keras_saved" in r
                 else "") +
              "; --fix precise_bn writes one population statistic over all shards into every "
              "copy."]
  if no_history:
    value = parts["moving_statistics"]
    lines.append(f"  {'moving_statistics':20} {value:>+9.4f}{share(value)}  = evaluate - "
                 "precise_bn: stale + EMA lag + Bessel, not separable without the history")
  if diagnosis.get("frozen"):
    lines += ["", f"frozen BN layers (trainable=False: inference branch inside fit, their "
              f"statistics never move): {', '.join(diagnosis['frozen'])}"]
  lines += ["", "the moving-statistics part (evaluate - precise_bn) by BN layer, first to last:"]
  lines.append("  " + "  ".join(f"{p['layer']} {p['contribution']:+.4f}"
                                for p in diagnosis["per_layer"]))
  if diagnosis.get("dropout"):
    d = diagnosis["dropout"]
    lines += ["", f"dropout ({', '.join(d['layers'])}): the training branch with it on gives "
              f"{d['train_mode_with_dropout']:.4f}, {d['effect']:+.4f} over train_mode_final "
              "(BN alone: the parts above run without dropout). fit's loss carries it, evaluate "
              "never does."]
  lines += mixed_precision_lines(diagnosis)
  if dominant == "none":
    lines += ["", f"no gap to explain: every part is below {NO_GAP:g} of the loss, so fit, "
              "evaluate and PreciseBN agree."]
    chance = 1.0 / NUM_IMAGES  # the seed's 256 classes: not a user model's metric
    if ("metric" not in diagnosis and fit is not None and accuracy["evaluate"] is not None
        and accuracy["evaluate"] < 2 * chance):
      lines.append("the network is at chance level: it has not learned (e.g. every ReLU of a "
                   "thin first layer dead from the start; try another --seed or width).")
  else:
    why, fix = CAUSE[dominant]
    lines += ["", f"dominant cause: {dominant} ({parts[dominant]:+.4f}): {why}.", f"fix: {fix}."]
    if "precise_bn" in losses and losses["precise_bn"] is not None:
      lines.append(f"with PreciseBN statistics evaluate would give loss {losses['precise_bn']:.4f}"
                   f", {short} {_num(accuracy['precise_bn'])}.")
  return "\n".join(lines)
