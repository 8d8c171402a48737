"""Lockstep comparison of the raw path with real Keras ``model.fit``, step by step.

Both sides start from the same weights and see the same batches in the same order (the raw
path's per-epoch permutations, replayed to Keras with ``shuffle=False``). A Keras callback runs
the raw step on the same batch at the start of every Keras step and compares both sides after it:

* synced (default): the raw side is first set to Keras's state (weights, BN statistics, optimizer
  slots, iteration count), so every difference belongs to that step alone;
* free-running: the raw side runs on from its own state; the report gives the step at which the
  loss difference first exceeds 1e-3 relative and the per-step growth factor of the weight
  difference, a measurement of how sensitive the network is.

Metric definitions (docs/design.md section 4): ``loss_rel_diff = |a - b| / |b|``; for tensors,
``max|a - b| / max|b|`` worst over layers; ``update_rel_l2_diff = ||dw_raw - dw_keras|| /
||dw_keras||`` over all trainable weights together.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
from typing import Callable, Optional

import numpy as np

from bnraw import machine, outputs
from bnraw.core import batching, loop, step
from bnraw.errors import UsageError
from bnraw.models import keras_bridge
from bnraw.models.workload import Workload
from bnraw.parity import first_difference
from bnraw.parity.metrics import max_rel

TOLERANCE = {"loss_rel_diff": 1e-6, "moving_mean_max_rel_diff": 1e-6,
             "moving_variance_max_rel_diff": 1e-6, "update_rel_l2_diff": 1e-5}
FREE_RUNNING_THRESHOLD = 1e-3


def _flat(weights: list[np.ndarray], mask: list[bool]) -> np.ndarray:
  return np.concatenate([w.ravel().astype(np.float64) for w, m in zip(weights, mask) if m])


def step_metrics(raw_before: dict, raw_after: dict, keras_before: dict, keras_after: dict,
                 trainable: list[bool], moving_mean: list[bool],
                 moving_variance: list[bool]) -> dict:
  """The per-step comparison of two states after the same step (weights in Keras order)."""
  raw_w, keras_w = raw_after["weights"], keras_after["weights"]
  pick = lambda mask: [i for i, m in enumerate(mask) if m]
  dw_raw = _flat(raw_w, trainable) - _flat(raw_before["weights"], trainable)
  dw_keras = _flat(keras_w, trainable) - _flat(keras_before["weights"], trainable)
  update_diff, update = np.linalg.norm(dw_raw - dw_keras), np.linalg.norm(dw_keras)
  if update:
    update_rel = float(update_diff / update)
  else:  # Keras skipped the step (loss scaling): no difference, or the raw side moved anyway
    update_rel = 0.0 if update_diff == 0 else float("inf")
  return {
      "moving_mean_max_rel_diff": max(max_rel(raw_w[i], keras_w[i]) for i in pick(moving_mean)),
      "moving_variance_max_rel_diff": max(max_rel(raw_w[i], keras_w[i])
                                          for i in pick(moving_variance)),
      "update_rel_l2_diff": update_rel,
      "weights_max_rel_diff": max(max_rel(raw_w[i], keras_w[i]) for i in pick(trainable)),
      "weights_max_abs_diff": max(float(np.abs(raw_w[i] - keras_w[i]).max())
                                  for i in pick(trainable)),
      "bit_identical": all(np.array_equal(a, b) for a, b in zip(raw_w, keras_w)),
  }


def growth_report(steps: list[dict]) -> dict:
  """Free-running: when the loss difference passes 1e-3, and its per-step growth factor.

  The factor is ``exp(slope)`` of a straight-line fit to ``log(loss_rel_diff)`` over the first
  steps, up to the one where it passes 1e-3 (after that it saturates). Weight differences are no
  use for this: Adam turns any noise-level gradient difference into a full-size step at once.
  """
  diffs = np.array([s["loss_rel_diff"] for s in steps])
  first = next((s["step"] for s in steps if s["loss_rel_diff"] > FREE_RUNNING_THRESHOLD), None)
  end = next((i for i, d in enumerate(diffs) if d > FREE_RUNNING_THRESHOLD), len(diffs) - 1) + 1
  window = np.nonzero(diffs[:end] > 0)[0]
  factor = None
  if len(window) >= 2:
    factor = float(np.exp(np.polyfit(window.astype(np.float64), np.log(diffs[window]), 1)[0]))
  return {"first_step_loss_rel_diff_above_1e-3": first, "loss_diff_growth_per_step": factor,
          "fit_window_steps": [int(window[0]), int(window[-1])] if len(window) else None}


@dataclasses.dataclass
class Sides:
  """The two models being compared: the workload's raw side and its Keras model, the raw step
  over a group of batches, and the raw evaluate (one device or under the strategy)."""

  workload: Workload
  kmodel: object
  run_group: Callable  # [example indices per batch] -> per-step outputs
  evaluate: Callable  # () -> (loss, metric)
  start_epoch: Optional[Callable] = None  # (that epoch's batches, what) before each epoch
  # the first step that is not bit-identical: its state before, first batch, differing weights
  first_unequal: Optional[dict] = None

  def raw_state(self) -> dict:
    return self.workload.raw_state()

  def set_raw_state(self, state: dict) -> None:
    self.workload.set_raw_state(state)

  def keras_state(self) -> dict:
    return self.workload.keras_state(self.kmodel)


def lockstep(sides: Sides, *, synced: bool, progress: Optional[Callable] = None) -> list[dict]:
  """Runs ``train.epochs`` epochs of Keras ``fit`` on ``sides.kmodel`` (compiled with a
  ``batch_loss`` metric), the raw step on the same batches at the start of each Keras execution,
  and compares the states after it; returns one row per execution."""
  workload, kmodel = sides.workload, sides.kmodel
  train = workload.train
  keras = keras_bridge.keras_module(workload.reference)
  names = workload.state_names()
  trainable = [v.trainable for v in workload.model.variables for _ in range(workload.replicas)]
  moving_mean = [n.split("@")[0].endswith("moving_mean") for n in names]
  moving_variance = [n.split("@")[0].endswith("moving_variance") for n in names]
  steps: list[dict] = []  # one row per Keras execution (steps_per_execution steps)

  class Lockstep(keras.callbacks.Callback):

    def __init__(self, order):
      super().__init__()
      self.order = order
      if sides.start_epoch is not None:  # streamed data: read ahead in this epoch's order
        sides.start_epoch(batching.batches(order, train.batch_size), "compare: epoch")

    def on_train_batch_begin(self, batch, logs=None):
      # Keras calls this once per execution of up to steps_per_execution steps (begin step).
      self.keras_before = sides.keras_state()
      # fit's loss adds each regularisation term of the weights *before* the update, as
      # trainer.compute_loss sums them: ops.sum([loss, *model.losses])
      self.regularization = [keras.ops.sum(term) for term in kmodel.losses]
      if synced:
        sides.set_raw_state(self.keras_before)
      self.raw_before = sides.raw_state()
      group = batching.batches(self.order, train.batch_size)[
          batch:batch + train.steps_per_execution]
      self.executed, self.first_batch = len(group), group[0]
      outs = sides.run_group(group)
      self.raw_loss = float(outs[-1]["loss"])
      self.raw_skipped = sum(int(out.get("skipped", False)) for out in outs)

    def on_train_batch_end(self, batch, logs=None):
      keras_loss = kmodel.get_metrics_result()["batch_loss"]
      if self.regularization:
        keras_loss = keras.ops.sum([keras_loss, *self.regularization])
      keras_loss = float(keras_loss)
      done = (steps[-1]["step"] + 1) if steps else 0
      row = {"step": done + self.executed - 1, "loss_raw": self.raw_loss, "loss_keras": keras_loss,
             "loss_rel_diff": (abs(self.raw_loss - keras_loss) / abs(keras_loss) if keras_loss
                               else abs(self.raw_loss))}
      if self.executed > 1:
        row["first_step"] = done
      keras_after = sides.keras_state()
      if "loss_scale" in keras_after:  # skipped steps do not advance Keras's iterations
        row.update(loss_scale=float(self.keras_before["loss_scale"][0]),
                   skipped_raw=self.raw_skipped,
                   skipped_keras=self.executed - (keras_after["iterations"]
                                                  - self.keras_before["iterations"]))
      raw_after = sides.raw_state()
      row.update(step_metrics(self.raw_before, raw_after, self.keras_before,
                              keras_after, trainable, moving_mean, moving_variance))
      steps.append(row)
      if (not (row["bit_identical"] and row["loss_rel_diff"] == 0)
          and sides.first_unequal is None):
        sides.first_unequal = {
            "step": row.get("first_step", row["step"]), "before": self.keras_before,
            "batch": self.first_batch,
            "weights": first_difference.differing_weights(
                names, raw_after["weights"], keras_after["weights"], trainable),
            "weight_count": len(names)}
      if progress is not None:
        progress(row)

  orders = batching.data_orders(train.seed, workload.images, train.batch_size)
  if train.shards == "sorted":  # non-iid shards: the same orders on both sides
    orders = (batching.sorted_within_batches(order, workload.labels, train.batch_size)
              for order in orders)
  keras_bridge.fit_replaying(kmodel, workload.images, workload.keras_labels, orders,
                             batch_size=train.batch_size, epochs=train.epochs,
                             callbacks_for=lambda epoch, order: [Lockstep(order)])
  return steps


def verdict(sides: Sides, steps: list[dict]) -> dict:
  """Evaluate on both sides, the first step beyond tolerance and the bit-identical count."""
  workload = sides.workload
  raw_eval = sides.evaluate()
  keras_eval = sides.kmodel.evaluate(
      **keras_bridge.keras_data(workload.images, workload.keras_labels,
                                np.arange(len(workload.images)), workload.train.batch_size),
      verbose=0, return_dict=True)
  gated = lambda s: (any(s[key] > tol for key, tol in TOLERANCE.items())
                     or s.get("skipped_raw") != s.get("skipped_keras"))
  metric = workload.metric_name
  result = {
      "steps": steps,
      "evaluate": {"raw": {"loss": raw_eval[0], **({metric: raw_eval[1]} if metric else {})},
                   "keras": {"loss": keras_eval["loss"],
                             **({metric: keras_eval[metric]} if metric else {})},
                   "loss_rel_diff": (abs(raw_eval[0] - keras_eval["loss"])
                                     / abs(keras_eval["loss"]) if keras_eval["loss"]
                                     else abs(raw_eval[0]))},
      "first_divergent_step": next((s["step"] for s in steps if gated(s)), None),
      "tolerance": TOLERANCE,
      "bit_identical_steps": sum(s["bit_identical"] and s["loss_rel_diff"] == 0 for s in steps),
  }
  if steps and "loss_scale" in steps[0]:
    result["skipped_steps"] = {"raw": sum(s["skipped_raw"] for s in steps),
                               "keras": sum(s["skipped_keras"] for s in steps)}
  return result


def reference_version(reference: str) -> str:
  return importlib.metadata.version("keras" if reference == "keras3" else "tf_keras")


def perturb(variables, relative: float, seed: int) -> None:
  """``w *= 1 + relative * s`` with random signs s: a controlled ulp-sized push (a uniform scale
  would be undone by ReLU + BN)."""
  rng = np.random.default_rng(seed)
  for v in variables:
    signs = rng.choice(np.array([-1.0, 1.0], np.float32), size=v.shape)
    v.assign(v.numpy() * (1 + relative * signs).astype(np.float32))


def check(reference: str, synced: bool, perturbation: float) -> None:
  """Refuses compare settings that cannot work, before anything is built."""
  if reference not in keras_bridge.REFERENCES:
    raise UsageError("reference", f"must be one of {keras_bridge.REFERENCES}, got {reference!r}")
  if importlib.util.find_spec(keras_bridge.PACKAGE[reference]) is None:
    raise UsageError("reference", f"{keras_bridge.PACKAGE[reference]} is not installed "
                     f"(pip install {keras_bridge.PACKAGE[reference]})")
  if not 0 <= perturbation < 1:
    raise UsageError("perturb", f"must be in [0, 1), got {perturbation}")
  if perturbation and synced:
    raise UsageError("perturb", "needs free-running (synced=False): a synced step starts "
                     "from Keras's state and would undo it")


def run(workload: Workload, *, out_dir: Optional[str], synced: bool = True,
        perturbation: float = 0.0, progress: Optional[Callable] = None,
        overwrite: bool = False) -> dict:
  """Trains the workload's raw side and its Keras model (the seed's, or a user's own model with
  its compiled loss, first metric and optimizer, from its saved state) in lockstep for
  ``train.epochs`` epochs; writes ``compare.json`` into ``out_dir`` (None: nothing written)
  and returns its dict. ``workload.reference`` is the Keras compared against.

  ``perturbation`` (free-running only) multiplies the raw side's initial trainable weights by
  ``1 +- perturbation`` after the transfer, to measure how fast a tiny difference grows when
  the two paths are otherwise bit-identical.
  """
  train, raw, optimizer = workload.train, workload.model, workload.optimizer
  check(workload.reference, synced, perturbation)
  if workload.source == "seed":
    keras_bridge.check_comparable(workload.model_config, train, workload.reference)
  if perturbation and workload.strategy is not None:
    raise UsageError("perturb", "is not supported with replicas yet")
  if getattr(raw, "regularizers", None) and train.steps_per_execution > 1:
    raise UsageError("steps_per_execution", "> 1 with a regularized model cannot be compared "
                     "step by step: fit's loss holds the penalty of the weights before each "
                     "step, which no callback sees inside an execution")
  if out_dir is not None:
    outputs.prepare_out_dir(out_dir, overwrite=overwrite)
  images, labels = workload.images, workload.labels
  relax = step.relaxed_batch(len(images), train.batch_size)
  if workload.strategy is None:
    choice = machine.choose_mode(raw, optimizer, images, labels, mode=train.mode,
                                 batch_size=train.batch_size, trace=False,
                                 workload=workload.tuning_key)
    mode, tuning, step_fn = choice.mode, choice.record, choice.step_fn
    multi_fn = step.make_multi_step(step_fn, mode, relax_batch=relax)
    reader = loop.Reader(images, labels)
    run_group = lambda group: loop.run_chunk(step_fn, multi_fn, reader.take, group)
  else:  # the mode Keras compiles replicas in: nothing to measure
    mode, tuning, reader = workload.replica_mode(), None, None
    step_fn = step.make_train_step(raw, optimizer, mode=mode, trace=False, relax_batch=relax,
                                   strategy=workload.strategy)
    run_group = lambda group: [_global_loss(step_fn(images[batch], labels[batch]))
                               for batch in group]
  kmodel = workload.keras_model(jit_compile=(mode == "xla"), batch_loss=True)
  if perturbation:
    perturb(raw.trainable_variables, perturbation, train.seed + 1)
  sides = Sides(workload, kmodel, run_group, evaluate=lambda: loop.evaluate(
      raw, images, labels, batch_size=train.batch_size, mode=mode, strategy=workload.strategy),
      start_epoch=reader.epoch if reader is not None else None)
  steps = lockstep(sides, synced=synced, progress=progress)
  result = {
      "reference": workload.reference,
      "reference_version": reference_version(workload.reference),
      "synced": synced,
      "perturbation": perturbation if not synced else 0.0,
      "mode": mode,
      "autotune": tuning,
      "config": workload.recorded(reference=workload.reference, synced=synced,
                                  perturb=perturbation),
      **verdict(sides, steps),
  }
  if sides.first_unequal is not None:
    result["first_difference"] = locate(sides, mode, synced)
  if workload.source == "seed":
    result["raw_model_config"] = dataclasses.asdict(workload.model_config)
  else:
    result["model"] = {"name": kmodel.name, "dtype_policy": kmodel.dtype_policy.name,
                       "bn_layers": workload.bn_names, "metric": workload.metric_name}
  if workload.strategy is not None:
    result.update(replicas=workload.replicas,
                  devices=list(workload.strategy.extended.worker_devices),
                  replica_copies_differ=copies_differ(sides))
  if not synced:
    result["free_running"] = growth_report(steps)
  if out_dir is not None:
    outputs.write_json(os.path.join(out_dir, "compare.json"), result)
  return result


def locate(sides: Sides, mode: str, synced: bool) -> dict:
  """``result["first_difference"]``: the first step that is not bit-identical, the weights
  that differ after it (deepest first) and, synced on one device, the first layer whose
  training-mode output differs from the state before it
  (:mod:`bnraw.parity.first_difference`)."""
  workload, found = sides.workload, sides.first_unequal
  result = {"step": found["step"], "weights": found["weights"],
            "weight_count": found["weight_count"], "forward": None}
  if synced and workload.strategy is None:
    after_raw, after_keras = workload.raw_state(), sides.keras_state()
    workload.set_raw_state(found["before"])
    workload.set_keras_state(sides.kmodel, found["before"])
    try:
      result["forward"] = first_difference.first_layer_output(
          workload, sides.kmodel, workload.images[found["batch"]], mode)
    finally:
      workload.set_raw_state(after_raw)
      workload.set_keras_state(sides.kmodel, after_keras)
  return result


def _global_loss(out: dict) -> dict:
  """A replicated step's outputs with its loss as Keras's ``batch_loss`` metric reads it: a SUM
  on read of the replicas' scaled losses."""
  scaled = np.float32(0)
  for value in out["scaled_loss"]:
    scaled = np.float32(scaled + np.float32(value))
  return {**out, "loss": scaled}


def copies_differ(sides: Sides) -> bool:
  """Whether the Keras side's replicas hold different copies of any moving statistic."""
  n = sides.workload.replicas
  moving = [i for i, name in enumerate(sides.workload.state_names()) if "moving_" in name]
  final = sides.keras_state()["weights"]
  return any(not np.array_equal(final[i], final[i - i % n]) for i in moving)


def report(result: dict) -> str:
  """The text the command prints: the per-step table, then the verdict."""
  return format_table(result["steps"]) + "\n" + summary_lines(result)


def format_table(steps: list[dict]) -> str:
  """The per-step table."""
  scaled = bool(steps) and "loss_scale" in steps[0]
  head = (f"{'step':>4}  {'loss raw':>11}  {'loss keras':>11}  {'loss rel':>8}  {'mmean':>8}  "
          f"{'mvar':>8}  {'update':>8}  {'weights':>8}"
          + (f"  {'scale':>8}  skipped raw/keras" if scaled else ""))
  lines = [head]
  for s in steps:
    lines.append(f"{s['step']:>4}  {s['loss_raw']:>11.7g}  {s['loss_keras']:>11.7g}  "
                 f"{s['loss_rel_diff']:>8.1e}  {s['moving_mean_max_rel_diff']:>8.1e}  "
                 f"{s['moving_variance_max_rel_diff']:>8.1e}  {s['update_rel_l2_diff']:>8.1e}  "
                 f"{s['weights_max_rel_diff']:>8.1e}"
                 + (f"  {s['loss_scale']:>8g}  {s['skipped_raw']}/{s['skipped_keras']}"
                    if scaled else ""))
  return "\n".join(lines)


def summary_lines(result: dict) -> str:
  """The verdict under the table."""
  steps = result["steps"]
  policy = (result.get("model") or result["config"]["model"]).get("dtype_policy", "float32")
  lines = [f"reference {result['reference']} {result['reference_version']}, "
           f"{'synced' if result['synced'] else 'free-running'}, raw mode {result['mode']}, "
           f"dtype policy {policy}"]
  if "skipped_steps" in result:
    lines.append("loss scaling: steps skipped (non-finite gradients; BN statistics still "
                 f"moved): raw {result['skipped_steps']['raw']}, keras "
                 f"{result['skipped_steps']['keras']}")
  if result.get("autotune"):
    from bnraw.core.autotune import describe
    lines.append(describe(result["autotune"]))
  per_execution = result["config"]["train"].get("steps_per_execution", 1)
  if per_execution > 1:
    lines.append(f"steps_per_execution {per_execution}: one row per Keras execution (its last "
                 "step's loss; states after the whole execution)")
  first = result["first_divergent_step"]
  lines.append("every step within tolerance " + ", ".join(
      f"{k} <= {v:g}" for k, v in result["tolerance"].items()) if first is None else
      f"first step beyond tolerance: {first}")
  lines.append(f"bit-identical steps (loss and every weight): {result['bit_identical_steps']} "
               f"of {len(steps)}")
  if "first_difference" in result:
    lines.extend(first_difference.describe(result["first_difference"]))
  ev = result["evaluate"]
  lines.append(f"evaluate: raw {ev['raw']['loss']:.7g}  keras {ev['keras']['loss']:.7g}  "
               f"rel diff {ev['loss_rel_diff']:.1e}")
  if "free_running" in result:
    fr = result["free_running"]
    growth = fr["loss_diff_growth_per_step"]
    lines.append(f"free-running: loss rel diff first > 1e-3 at step "
                 f"{fr['first_step_loss_rel_diff_above_1e-3']}; it grows "
                 + (f"x{growth:.3g} per step (steps {fr['fit_window_steps']})" if growth else
                    "not at all: the two paths are bit-identical (--perturb gives them a start)"))
  return "\n".join(lines)
