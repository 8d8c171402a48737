"""The sweep tool: the seed's diagnosis over many seeds (and cases, momenta, widths) in one
process. Training trajectories are chaotic and differ across CPUs, so "what usually happens" is
a distribution, not one run: per setting, the median and interquartile range of every loss and
part, how often each cause dominates, how often evaluate > fit.

Runs of one (width, momentum) share one raw model, optimizer and set of compiled functions: each
run re-initialises the variables in place (the same values a fresh run would create), so every
shape is traced once. ``sweep.json`` is rewritten after every run, which makes the sweep
resumable: ``resume=True`` keeps the finished runs of a sweep made with the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from bnraw import config as configs
from bnraw import outputs
from bnraw.config import DataConfig, ModelConfig, TrainConfig
from bnraw.core.loop import NonFiniteError
from bnraw.diagnosis.decompose import ATTRIBUTION
from bnraw.diagnosis.explain import parts_of
from bnraw.errors import UsageError

SWEEP_FILE = "sweep.json"
PARTS = tuple(key for key, _, _ in ATTRIBUTION)
SUMMARY_LOSSES = ("fit", "train_mode_final", "precise_bn", "evaluate")


def _reinitialise(parts, model: ModelConfig, seed: int) -> None:
  """The weights a fresh ``seed_network(model, seed)`` would have; optimizer state as new
  (zeros; a loss scale back at its initial value)."""
  import tensorflow as tf
  from bnraw.core import optim
  from bnraw.models.seed import seed_network
  for variable, value in zip(parts.model.variables, seed_network(model, seed).variables):
    variable.assign(value)
  for variable in optim.state_variables(parts.optimizer):
    variable.assign(tf.zeros_like(variable))
  if isinstance(parts.optimizer, optim.LossScale):
    parts.optimizer.dynamic_scale.assign(parts.optimizer.initial_scale)


def dominant(run: dict) -> str:
  """The report's dominant cause of a run, "none" where there is no gap (chance level, say)."""
  return parts_of(run)[1]


def summarize(runs: Sequence[dict]) -> list[dict]:
  """Per setting (case, momentum, width): median and quartiles of each loss and part, the
  dominant-cause counts, and how often evaluate exceeds fit, over the complete runs; runs that
  went non-finite are counted apart."""
  out = []
  for setting in sorted({(r["case"], r["momentum"], r["width"]) for r in runs}):
    same = [r for r in runs if (r["case"], r["momentum"], r["width"]) == setting]
    rows = [r for r in same if r.get("status", "complete") == "complete"]
    if not rows:
      out.append({"case": setting[0], "momentum": setting[1], "width": setting[2], "runs": 0,
                  "non_finite": len(same)})
      continue
    values = {key: [r["losses"][key] for r in rows] for key in SUMMARY_LOSSES}
    values.update({key: [r["attribution"][key] for r in rows] for key in PARTS})
    stats = {key: dict(zip(("q25", "median", "q75"), np.percentile(v, [25, 50, 75]).tolist()))
             for key, v in values.items()}
    causes = [dominant(r) for r in rows]
    counts = {key: causes.count(key) for key in (*PARTS, "none")}
    out.append({"case": setting[0], "momentum": setting[1], "width": setting[2],
                "runs": len(rows), "non_finite": len(same) - len(rows),
                "seeds": [r["seed"] for r in rows], "statistics": stats,
                "dominant_counts": counts,
                "evaluate_above_fit": sum(r["losses"]["evaluate"] > r["losses"]["fit"]
                                          for r in rows)})
  return out


def report(result: dict) -> str:
  """The summary table: one block per setting."""
  import fractions
  lines = []
  for s in result["summary"]:
    head = (f"case {s['case']}, momentum {s['momentum']:g}, width "
            f"{fractions.Fraction(s['width']).limit_denominator(1024)}: {s['runs']} seeds"
            + (f" ({s['non_finite']} more went non-finite)" if s["non_finite"] else ""))
    if not s["runs"]:
      lines += [head, ""]
      continue
    lines += [f"{head}, evaluate > fit in {s['evaluate_above_fit']}/{s['runs']}",
              f"  {'':20} {'median':>9} {'q25':>9} {'q75':>9}"]
    for key in (*SUMMARY_LOSSES, *PARTS):
      q, sign = s["statistics"][key], "+" if key in PARTS else ""
      lines.append(f"  {key:20} " + " ".join(f"{q[k]:>{sign}9.4f}"
                                              for k in ("median", "q25", "q75")))
    counts = ", ".join(f"{k} {n}" for k, n in sorted(s["dominant_counts"].items(),
                                                     key=lambda kv: -kv[1]) if n)
    lines += [f"  dominant cause: {counts}", ""]
  timing = result["timing"]
  lines.append(f"{len(result['runs'])} runs in {timing['wall_seconds']:.0f} s; training alone "
               f"{timing['train_seconds']:.0f} s (wall / training = "
               f"{timing['wall_over_train']:.2f})")
  return "\n".join(lines)


def run(data: DataConfig, model: ModelConfig, train: TrainConfig, *, seeds: Sequence[int],
        out_dir: str, cases: Optional[Sequence[int]] = None,
        momenta: Optional[Sequence[float]] = None, widths: Optional[Sequence[float]] = None,
        resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
  """Diagnoses every (width, momentum, case, seed) combination; writes ``sweep.json``.

  ``cases``, ``momenta``, ``widths`` default to the single values in the configs.
  """
  from bnraw import machine
  from bnraw.core import autotune
  from bnraw.diagnosis.tool import compile_raw, diagnose_raw_training
  from bnraw.models import seed as seed_setup
  model = model.resolved()
  cases, momenta = list(cases or [data.case]), list(momenta or [model.momentum])
  widths, seeds = list(widths or [model.width]), list(seeds)
  if not seeds:
    raise UsageError("seeds", "need at least one seed")
  seed_setup.refuse_replicas(train, "sweep")
  for name, values in (("seeds", seeds), ("cases", cases), ("momenta", momenta),
                       ("widths", widths)):
    if len(set(values)) != len(values):
      raise UsageError(name, f"repeats a value: {values}")
  for case, momentum, width in ((c, m, w) for c in cases for m in momenta for w in widths):
    seed_setup.check(dataclasses.replace(data, case=case),  # all of them, before any work
                     dataclasses.replace(model, momentum=momentum, width=width), train)
  record = configs.record(data, model, train, seeds=seeds, cases=cases, momenta=momenta,
                          widths=widths)
  done = _previous_runs(out_dir, record) if resume else []
  outputs.prepare_out_dir(out_dir, overwrite=overwrite, resume=resume)
  plan = [(w, m, c, s) for w in widths for m in momenta for c in cases for s in seeds]
  key = lambda r: (r["width"], r["momentum"], r["case"], r["seed"])
  finished = {key(r): r for r in done}
  runs = list(done)  # kept whole, also runs outside this plan
  start = time.perf_counter()
  wall_before = sum(r["seconds"] for r in runs)
  result = {}
  for width in widths:
    for momentum in momenta:
      todo = [(c, s) for c in cases for s in seeds if (width, momentum, c, s) not in finished]
      if not todo:
        continue
      config = dataclasses.replace(model, width=width, momentum=momentum)
      parts = seed_setup.build(dataclasses.replace(data, case=todo[0][0]), config,
                               dataclasses.replace(train, seed=todo[0][1]))
      # auto: measured once per (width, momentum) group on its first run's initial state (put
      # back; the cache makes the next momentum free); a resumed sweep keeps the group's mode
      earlier = next((r["mode"] for r in done if "mode" in r and r["width"] == width
                      and r["momentum"] == momentum), None)
      chosen = earlier if train.mode == "auto" and earlier else train.mode
      choice = machine.choose_mode(parts.model, parts.optimizer, parts.data.images,
                                   parts.data.labels, mode=chosen,
                                   batch_size=train.batch_size, trace=True,
                                   workload=seed_setup.workload(config, train))
      mode = choice.mode
      if progress and choice.record:
        print(f"width {width:g}, momentum {momentum:g}: {autotune.describe(choice.record)}",
              file=sys.stderr)
      compiled = compile_raw(parts.model, parts.optimizer, parts.data.images, mode,
                             train.batch_size, train_step=choice.step_fn)
      for case in cases:
        dataset = seed_setup.make_dataset(dataclasses.replace(data, case=case))
        for seed in seeds:
          if (width, momentum, case, seed) in finished:
            continue
          began = time.perf_counter()
          _reinitialise(parts, config, seed)
          run_info = {"width": width, "momentum": momentum, "case": case, "seed": seed,
                      "mode": mode}
          try:
            out, history = diagnose_raw_training(
                parts.model, parts.optimizer, dataset.images, dataset.labels,
                dataclasses.replace(train, seed=seed), mode, compiled=compiled)
          except NonFiniteError as e:  # recorded and counted, left out of the statistics
            runs.append({**run_info, "status": "non_finite",
                         "non_finite": {"step": e.step, "where": e.where}, "train_seconds": 0.0,
                         "seconds": time.perf_counter() - began})
          else:
            out.pop("precise_statistics")
            runs.append({**run_info, "status": "complete", "losses": out["losses"],
                         "attribution": out["attribution"], "accuracy": out["accuracy"],
                         "dominant": dominant(out), "train_seconds": history.seconds,
                         "seconds": time.perf_counter() - began,
                         **({"loss_scaling": out["loss_scaling"]} if "loss_scaling" in out
                            else {})})
          result = _result(record, runs, wall_before + time.perf_counter() - start)
          outputs.write_json(os.path.join(out_dir, SWEEP_FILE), result)
          if progress:
            r = runs[-1]
            what = (f"fit {r['losses']['fit']:.4f} evaluate {r['losses']['evaluate']:.4f} "
                    f"dominant {r['dominant']}" if r["status"] == "complete" else
                    f"non-finite at step {r['non_finite']['step']} in {r['non_finite']['where']}")
            print(f"run {len(runs)}/{len(plan)}  case {case} momentum {momentum:g} width "
                  f"{width:g} seed {seed}: {what} ({r['seconds']:.1f} s)", file=sys.stderr,
                  flush=True)
  if not result:  # everything was already done
    result = _result(record, runs, wall_before)
    outputs.write_json(os.path.join(out_dir, SWEEP_FILE), result)
  return result


def _result(record: dict, runs: list, wall_seconds: float) -> dict:
  for r in runs:  # an older sweep's stored cause, under today's rule
    if r.get("status", "complete") == "complete":
      r["dominant"] = dominant(r)
  train_seconds = sum(r["train_seconds"] for r in runs)
  modes = sorted({r["mode"] for r in runs if "mode" in r})  # auto: measured per width
  return {"config": record, "modes": modes, "environment": outputs.environment(), "runs": runs,
          "summary": summarize(runs),
          "timing": {"wall_seconds": wall_seconds, "train_seconds": train_seconds,
                     "wall_over_train": wall_seconds / train_seconds if train_seconds else None}}


def _previous_runs(out_dir: str, record: dict) -> list:
  """The finished runs of the sweep in ``out_dir`` (all kept, also those outside a narrower
  new plan); refuses one made with other settings (the lists of seeds, cases, momenta and
  widths may differ)."""
  path = os.path.join(out_dir, SWEEP_FILE)
  if not os.path.isfile(path):
    raise UsageError("resume", f"no {SWEEP_FILE} in {out_dir}: nothing to resume")
  with open(path) as f:
    saved = json.load(f)
  current = json.loads(json.dumps(outputs.jsonable(record)))
  saved_config = json.loads(json.dumps(outputs.jsonable(configs.normalized(saved["config"]))))
  for section in ("data", "model", "train"):
    # steps_per_execution is bit-identical to one step per call: it may change
    fixed = {k: v for k, v in current[section].items() if k not in (
        "case", "momentum", "width", "seed", "steps_per_execution")}
    old = {k: v for k, v in saved_config[section].items() if k in fixed}
    if old != fixed:
      raise UsageError("resume", f"the sweep in {out_dir} was made with other {section} "
                       f"settings: {old} vs now {fixed}")
  return saved["runs"]
