"""Analytic FLOPs, the device's matmul ceiling, and step timers for raw and Keras training.

FLOPs count multiply-adds as 2 and only the convolutions and matmuls (BN, ReLU, softmax and the
optimizer are O(parameters + activations), under 1% here). A training step costs forward x 3
(forward, gradient w.r.t. inputs, gradient w.r.t. weights).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from bnraw.config import (CONV_BLOCKS, DTYPE_POLICIES, IMAGE_SIZE, NUM_IMAGES, ModelConfig,
                          TrainConfig)
from bnraw.core import batching
from bnraw.profiling import op_stats

# Under mixed_float16 both sides start from this loss scale, so no timed step is one that loss
# scaling skips (a skipped step saves the optimizer update): the steady state of a long run.
PROFILE_LOSS_SCALE = 1.0


def profile_train_config(model_config: ModelConfig, steps_per_execution: int = 1) -> TrainConfig:
  """The training settings both sides are timed with: Adam, and under mixed_float16 loss
  scaling from :data:`PROFILE_LOSS_SCALE`."""
  scaled = model_config.dtype_policy == "mixed_float16"
  return TrainConfig(steps_per_execution=steps_per_execution,
                     loss_scale=PROFILE_LOSS_SCALE if scaled else None)


def forward_flops(config: ModelConfig, batch_size: int) -> int:
  """Multiply-add FLOPs (x2) of one forward pass over ``batch_size`` images."""
  flops, side, channels_in = 0, IMAGE_SIZE, 3
  for (k, _), c in zip(CONV_BLOCKS, config.conv_channels()):
    side -= k - 1
    flops += 2 * batch_size * side * side * k * k * channels_in * c
    channels_in = c
  units = config.dense_units()
  flops += 2 * batch_size * side * side * channels_in * units
  flops += 2 * batch_size * units * NUM_IMAGES
  return flops


def train_step_flops(config: ModelConfig, batch_size: int) -> int:
  return 3 * forward_flops(config, batch_size)


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
  """GFLOP/s of a large float32 ``n x n`` matmul (median of ``repeats``): the practical ceiling."""
  a = tf.random.stateless_normal((n, n), (1, 2))
  b = tf.random.stateless_normal((n, n), (3, 4))
  matmul = tf.function(lambda x, y: tf.reduce_sum(tf.matmul(x, y)))
  float(matmul(a, b))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    float(matmul(a, b))
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / statistics.median(times) / 1e9


def device_name() -> str:
  gpus = tf.config.list_physical_devices("GPU")
  if gpus:
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"GPU: {details.get('device_name', gpus[0].name)}"
  return f"CPU: {os.cpu_count()} cores"


class Bench:
  """One configuration, built and compiled once; :meth:`measure` times steady steps."""

  def __init__(self, row: dict, compile_s: float, measure: Callable[[int, int], list],
               run: Optional[Callable[[], None]] = None):
    self.row, self.compile_s, self.measure, self.run = row, compile_s, measure, run
    self.times: list[float] = []


def _timed(run: Callable[[], None], steps: int, warmup: int) -> list:
  for _ in range(warmup):
    run()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return times


def raw_bench(model_config: ModelConfig, images: np.ndarray, labels: np.ndarray, *, mode: str,
              batch_size: int, trace: bool, hlo_dir: Optional[str] = None,
              steps_per_execution: int = 1) -> Bench:
  """The raw training step (fresh model and Adam) in ``mode``; its first call is the compile.
  ``mode="auto"``: the step :mod:`bnraw.core.autotune` picks, its "compile" being the whole
  measurement. ``steps_per_execution`` K > 1: K steps per call (the same batch K times), the
  times per step."""
  from bnraw.core import autotune
  from bnraw.core.optim import make_optimizer
  from bnraw.core.step import make_multi_step, make_train_step, relaxed_batch
  from bnraw.models.seed import seed_network
  relax = relaxed_batch(len(images), batch_size)  # the graph a run over these images traces
  net = seed_network(model_config)
  train = profile_train_config(model_config)
  optimizer = make_optimizer(train.optimizer, net.trainable_variables, train.lr,
                             loss_scale=train.initial_loss_scale(model_config))
  x, y = tf.constant(images[:batch_size]), tf.constant(labels[:batch_size])
  row = {"impl": "raw", "mode": mode, "traced": trace, "steps_per_execution": steps_per_execution}
  if mode == "auto":
    choice = autotune.measure(net, optimizer, images, labels, batch_size=batch_size, trace=trace,
                              relax_batch=relax)
    step, row["chosen"], row["autotune"] = choice.step_fn, choice.mode, choice.record
  else:
    step = make_train_step(net, optimizer, mode=mode, trace=trace, relax_batch=relax)
  k = steps_per_execution
  if k > 1:
    multi = make_multi_step(step, mode, relax_batch=relax)
    xs, ys = tf.stack([x] * k), tf.stack([y] * k)
    run = lambda: float(multi(xs, ys)["loss"][-1])
  else:
    run = lambda: float(step(x, y)["loss"])  # float() waits for the step to finish
  start = time.perf_counter()
  run()
  compile_s = time.perf_counter() - start
  if mode == "auto":
    compile_s = choice.record["seconds"]
  if hlo_dir and mode == "xla" and k == 1 and not relax:
    policy = "" if model_config.dtype_policy == "float32" else f"_{model_config.dtype_policy}"
    write_hlo(step, x, y, hlo_dir, f"raw_w{model_config.width:g}{policy}_trace{int(trace)}")
  measure = lambda steps, warmup: [t / k for t in _timed(run, steps, warmup)]
  return Bench(row, compile_s, measure, run)


def keras_bench(model_config: ModelConfig, images: np.ndarray, labels: np.ndarray, *,
                jit_compile: bool, batch_size: int, steps_per_execution: int = 1,
                label: Optional[str] = None) -> Bench:
  """Real Keras ``fit``. Each measurement is one ``fit`` over the data repeated, timed from one
  batch end to the next (a callback waits for each step's loss; with ``steps_per_execution``
  K it fires once per K steps, and the time is divided by K), warm-up executions dropped; the
  first ``fit`` call's first execution is the compile."""
  from bnraw.models import keras_bridge
  model = keras_bridge.build_model(model_config)
  k = steps_per_execution
  keras_bridge.compile_model(model, profile_train_config(model_config, k),
                             jit_compile=jit_compile)
  one_hot = np.eye(NUM_IMAGES, dtype=np.float32)[labels]
  mode = label or ("fit_xla" if jit_compile else "fit")
  return fit_bench(model, images, one_hot, batch_size=batch_size, steps_per_execution=k,
                   mode=mode)


def fit_bench(model, x: np.ndarray, y: np.ndarray, *, batch_size: int, steps_per_execution: int,
              mode: str) -> Bench:
  """Times ``model.fit`` (compiled) on ``x``/``y`` repeated: see :func:`keras_bench`."""
  import keras
  k = steps_per_execution

  def fit_stamps(n_executions):
    n_steps = n_executions * k
    reps = -(-n_steps * batch_size // len(x))
    stamps = []

    class Stamp(keras.callbacks.Callback):
      def on_train_batch_end(self, batch, logs=None):
        float(logs["loss"])
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    model.fit(np.concatenate([x] * reps), np.concatenate([y] * reps),
              batch_size=batch_size, epochs=1, shuffle=False, verbose=0,
              steps_per_epoch=n_steps, callbacks=[Stamp()])
    return start, stamps

  start, stamps = fit_stamps(1)
  measure = lambda steps, warmup: list(np.diff(fit_stamps(1 + warmup + steps)[1])[warmup:] / k)
  return Bench({"impl": "keras", "mode": mode, "traced": False, "steps_per_execution": k},
               stamps[0] - start, measure)


def run_keras_model(workload, *, steps: int, warmup: int, rounds: int,
                    raw_modes: Sequence[str] = ("function", "xla"),
                    keras_jit: Sequence[bool] = (False, True), out_dir: Optional[str] = None,
                    progress: bool = False, overwrite: bool = False) -> dict:
  """A user's model's workload (bnraw.models.workload.from_keras_file): its raw twin's step (``raw_modes``: eager, function, xla) against that
  model's own ``fit`` (each ``keras_jit``), every configuration built once and timed
  round-robin as :func:`run` times the seed's. ``ratio``: the best exact raw step over the best
  fit, side by side in one process."""
  import sys
  from bnraw import outputs
  from bnraw.core.step import make_train_step, relaxed_batch
  from bnraw.errors import UsageError
  from bnraw.models import user
  from bnraw.models.keras_bridge import recompile
  for mode in raw_modes:
    if mode not in ("eager", "function", "xla"):
      raise UsageError("raw_modes", f"expected some of eager, function, xla; got {mode!r}")
  twin, batch_size, (model_path, _) = workload.twin, workload.train.batch_size, workload.paths
  if workload.strategy is not None:
    raise UsageError("replicas", "a user's model is profiled on one device")
  if out_dir is not None:
    outputs.prepare_out_dir(out_dir, overwrite=overwrite)
  images, labels = workload.images, workload.labels
  relax = relaxed_batch(len(images), batch_size)
  x, y = tf.constant(images[:batch_size]), tf.constant(labels[:batch_size])
  benches = []
  for mode in raw_modes:
    step = make_train_step(workload.model, workload.optimizer, mode=mode, trace=False,
                           relax_batch=relax)
    run = lambda step=step: float(step(x, y)["loss"])
    start = time.perf_counter()
    run()
    benches.append(Bench({"impl": "raw", "mode": mode, "traced": False,
                          "steps_per_execution": 1}, time.perf_counter() - start,
                         lambda steps, warmup, run=run: _timed(run, steps, warmup), run))
  if batching.streamed(images):  # streamed data: fit times one batch, as the raw side
    images, labels = images[:batch_size], labels[:batch_size]
  for jit in keras_jit:
    kmodel = user.load_keras_model(model_path, nested_bn=True)
    recompile(kmodel, jit_compile=jit, steps_per_execution=1)
    benches.append(fit_bench(kmodel, images, labels, batch_size=batch_size,
                             steps_per_execution=1, mode="fit_xla" if jit else "fit"))
  say = (lambda text: print(text, file=sys.stderr)) if progress else (lambda text: None)
  for r in range(rounds):
    say(f"{twin.kmodel.name}: round {r + 1}/{rounds}")
    for bench in benches:
      bench.times += bench.measure(steps, warmup)
  rows = [{**bench.row, "batch_size": batch_size, "compile_s": bench.compile_s,
           "step_s_median": statistics.median(bench.times), "step_s_min": min(bench.times),
           "steps_timed": len(bench.times),
           "images_per_s": batch_size / statistics.median(bench.times)} for bench in benches]
  best = lambda impl, modes: min((r for r in rows if r["impl"] == impl and r["mode"] in modes),
                                 key=lambda r: r["step_s_median"], default=None)
  raw_best, keras_best = best("raw", ("function", "xla")), best("keras", ("fit", "fit_xla"))
  result = {"device": device_name(), "keras_model": os.path.abspath(model_path),
            "model": twin.kmodel.name, "rounds": rounds, "results": rows,
            "environment": outputs.environment()}
  if raw_best and keras_best:
    result["ratio"] = {"raw": raw_best["mode"], "keras": keras_best["mode"],
                       "exact_raw_over_best_keras": raw_best["step_s_median"]
                       / keras_best["step_s_median"]}
  if out_dir is not None:
    outputs.write_json(os.path.join(out_dir, "profile.json"), result)
  return result


def report_keras_model(result: dict) -> str:
  """The user-model profile's table and ratio."""
  lines = [f"{result['model']} ({result['keras_model']}) on {result['device']}",
           f"{'impl':5} {'mode':9} {'compile s':>9} {'ms/step':>9} {'images/s':>9}"]
  for r in result["results"]:
    lines.append(f"{r['impl']:5} {r['mode']:9} {r['compile_s']:9.2f} "
                 f"{r['step_s_median'] * 1e3:9.2f} {r['images_per_s']:9.0f}")
  if "ratio" in result:
    ratio = result["ratio"]
    lines.append(f"exact raw ({ratio['raw']}) / best Keras fit ({ratio['keras']}): "
                 f"{ratio['exact_raw_over_best_keras']:.2f}x")
  return "\n".join(lines)


def write_hlo(step, x, y, hlo_dir: str, name: str) -> None:
  """The XLA step's HLO before (``hlo``) and after (``optimized_hlo``) XLA's passes."""
  os.makedirs(hlo_dir, exist_ok=True)
  ir = step.experimental_get_compiler_ir(x, y)
  for stage in ("hlo", "optimized_hlo"):
    with open(os.path.join(hlo_dir, f"{name}.{stage}.txt"), "w") as f:
      f.write(ir(stage=stage))


def capture_profile(run: Callable[[], None], profile_dir: str, steps: int) -> None:
  """A TensorFlow profiler trace of ``steps`` steady steps, step-marked for TensorBoard."""
  tf.profiler.experimental.start(profile_dir)
  try:
    for i in range(steps):
      with tf.profiler.experimental.Trace("train", step_num=i, _r=1):
        run()
  finally:
    tf.profiler.experimental.stop()


def result_row(bench: Bench, model_config: ModelConfig, batch_size: int, peak: float) -> dict:
  median = statistics.median(bench.times)
  gflops = train_step_flops(model_config, batch_size) / median / 1e9
  return {**bench.row, "width": model_config.width, "dtype_policy": model_config.dtype_policy,
          "batch_size": batch_size,
          "fast_conv": model_config.fast_conv, "compile_s": bench.compile_s,
          "step_s_median": median, "step_s_min": min(bench.times),
          "steps_timed": len(bench.times),
          "images_per_s": batch_size / median, "gflops": gflops, "peak_fraction": gflops / peak}


def run(*, widths: list[float], batch_size: int, steps: int, warmup: int, rounds: int,
        raw_modes: list[str], keras_jit: list, out_dir: Optional[str],
        profile_dir: Optional[str] = None, hlo_dir: Optional[str] = None,
        progress: bool = False, overwrite: bool = False,
        steps_per_execution: Sequence[int] = (1,), breakdown: bool = True,
        dtype_policies: Sequence[str] = ("float32",)) -> dict:
  """Every configuration of a width is built once, then timed round-robin ``rounds`` times
  (``steps`` steps each after ``warmup``), so drift on a noisy machine hits all alike; the
  reported step time is the median of all timed steps. Writes ``profile.json`` into ``out_dir``
  (None: nothing written) and returns its dict.

  ``raw_modes`` may hold ``"auto"`` (the measured choice; its compile time is the whole
  measurement) and ``keras_jit`` ``"auto"`` (fit with jit on when the raw auto choice is xla).
  Each K > 1 in ``steps_per_execution`` adds raw function/xla rows and Keras rows running K
  steps per call. ``breakdown``: the best exact raw mode's time per block
  (:mod:`bnraw.profiling.breakdown`). ``dtype_policies``: every configuration again under each
  policy (rows carry ``dtype_policy``; mixed_float16 with the loss scale of
  :func:`profile_train_config`); the breakdown and the profiler capture are float32's."""
  import sys
  from bnraw import outputs
  from bnraw.config import DataConfig
  from bnraw.core.step import MODES, resolve_mode
  from bnraw.errors import UsageError
  from bnraw.models.seed import make_dataset
  for mode in raw_modes:
    if mode not in MODES:
      raise UsageError("raw_modes", f"unknown mode {mode!r}; expected some of {MODES}")
  for jit in keras_jit:
    if jit not in (False, True, "auto"):
      raise UsageError("keras_jit", f"expected false, true or auto, got {jit!r}")
  if not all(isinstance(k, int) and k >= 1 for k in steps_per_execution):
    raise UsageError("steps_per_execution", f"need integers >= 1, got {steps_per_execution}")
  if not all(w > 0 for w in widths) or not widths:
    raise UsageError("widths", f"need one or more widths > 0, got {widths}")
  if not dtype_policies or not set(dtype_policies) <= set(DTYPE_POLICIES):
    raise UsageError("dtype_policies", f"need some of {', '.join(DTYPE_POLICIES)}, got "
                     f"{list(dtype_policies)}")
  if profile_dir and "float32" not in dtype_policies:
    raise UsageError("profile_dir", "captures the float32 step: needs float32 among the policies")
  if out_dir is not None:
    outputs.prepare_out_dir(out_dir, overwrite=overwrite)
  data = make_dataset(DataConfig())
  op_tables, breakdowns = [], []
  peak = matmul_peak_gflops()
  rows = []
  say = (lambda text: print(text, file=sys.stderr)) if progress else (lambda text: None)
  for width, policy in ((w, p) for w in widths for p in dtype_policies):
    config = ModelConfig(width=width, dtype_policy=policy)
    label = f"{width:g}" + ("" if policy == "float32" else f" {policy}")
    benches = []
    auto_choice = None
    for mode in raw_modes:
      if mode == "auto":
        bench = raw_bench(config, data.images, data.labels, mode="auto", batch_size=batch_size,
                          trace=False)
        auto_choice = bench.row["chosen"]
        benches.append((config, bench))
        continue
      variants = [(False, False)]  # (fast_conv, traced)
      if mode != "eager":
        variants.append((True, False))
      if mode == "xla":
        variants.append((False, True))
      for fast, traced in variants:
        variant = dataclasses.replace(config, fast_conv=fast)
        bench = raw_bench(variant, data.images, data.labels, mode=mode,
                          batch_size=batch_size, trace=traced,
                          hlo_dir=hlo_dir if not (traced or fast) else None)
        benches.append((variant, bench))
      for k in steps_per_execution:
        if k > 1 and mode != "eager":
          benches.append((config, raw_bench(config, data.images, data.labels, mode=mode,
                                            batch_size=batch_size, trace=False,
                                            steps_per_execution=k)))
    for jit in keras_jit:
      on = (auto_choice or resolve_mode("auto")) == "xla" if jit == "auto" else jit
      for k in (1, *[k for k in steps_per_execution if k > 1 and jit != "auto"]):
        benches.append((config, keras_bench(
            config, data.images, data.labels, jit_compile=on, batch_size=batch_size,
            steps_per_execution=k, label="fit_auto" if jit == "auto" else None)))
    for r in range(rounds):
      say(f"width {label}: round {r + 1}/{rounds}")
      for _, bench in benches:
        bench.times += bench.measure(steps, warmup)
    for variant, bench in benches:
      rows.append(result_row(bench, variant, batch_size, peak))
      say(f"  {bench.row['impl']:5} {bench.row['mode']:9} fast={int(variant.fast_conv)} "
          f"trace={int(bench.row['traced'])} k={bench.row['steps_per_execution']}  "
          f"{rows[-1]['step_s_median'] * 1e3:8.1f} ms/step")
    if breakdown and policy == "float32":  # the fastest exact compiled raw mode, one step a call
      exact = [r for r in rows[-len(benches):] if r["impl"] == "raw" and r["mode"] in
               ("function", "xla") and not r["fast_conv"] and not r["traced"]
               and r["steps_per_execution"] == 1]
      if exact:
        from bnraw.core.optim import Adam
        from bnraw.models.seed import seed_network
        from bnraw.profiling import breakdown as blocks
        best_mode = min(exact, key=lambda r: r["step_s_median"])["mode"]
        say(f"width {width:g}: per-block breakdown of the raw {best_mode} step")
        net = seed_network(config)
        table = blocks.measure(net, Adam(net.trainable_variables),
                               tf.constant(data.images[:batch_size]),
                               tf.constant(data.labels[:batch_size]), mode=best_mode,
                               steps=steps, warmup=warmup, rounds=rounds,
                               relax_batch=len(data.images) % batch_size != 0)
        breakdowns.append({"width": width, "gflop_per_step": train_step_flops(config, batch_size)
                           / 1e9, **table})
    if profile_dir and policy == "float32":  # the fastest raw step keeping TF op names, if any
      raw = [(v, b) for v, b in benches if b.row["impl"] == "raw" and not b.row["traced"]
             and b.row["mode"] != "auto" and b.row["steps_per_execution"] == 1]
      named = [(v, b) for v, b in raw if b.row["mode"] != "xla"] or raw
      best_variant, best = min(named, key=lambda vb: statistics.median(vb[1].times))
      capture_dir = os.path.join(profile_dir, f"w{width:g}")
      capture_profile(best.run, capture_dir, steps=5)
      ops = op_stats.framework_op_stats(capture_dir)
      if ops is not None:
        from bnraw.models.seed import MODEL_NAME
        names = [f"bn_{i}" for i in range(1, len(CONV_BLOCKS) + 2)]
        op_tables.append({"width": width, "mode": best.row["mode"],
                          "fast_conv": best_variant.fast_conv,
                          **op_stats.summarize(ops, names, split=best.row["mode"] != "xla",
                                               model=MODEL_NAME)})
    del benches
  result = {"device": device_name(), "matmul_peak_gflops": peak, "rounds": rounds,
            "results": rows, "environment": outputs.environment()}
  if profile_dir:  # None: XProf (the optional extra) is not installed
    result["op_stats"] = op_tables if op_tables else None
  if breakdown:  # None: no float32 step to take apart
    result["breakdown"] = breakdowns if "float32" in dtype_policies else None
  result["ratios"] = ratios(result)
  if out_dir is not None:
    outputs.write_json(os.path.join(out_dir, "profile.json"), result)
  return result


def ratios(result: dict) -> list[dict]:
  """Per width and dtype policy: best raw / best Keras step time, and trace on/off for raw
  xla; for a mixed policy also its best raw and best Keras time over float32's."""
  out, best_s = [], {}  # best_s[(width, policy)]: (best exact raw, best Keras) step seconds
  groups = sorted({(r["width"], r.get("dtype_policy", "float32")) for r in result["results"]},
                  key=lambda g: (g[0], DTYPE_POLICIES.index(g[1])))
  for width, policy in groups:
    every = [r for r in result["results"] if r["width"] == width
             and r.get("dtype_policy", "float32") == policy]
    rows = [r for r in every if r["steps_per_execution"] == 1 and "auto" not in r["mode"]]
    raw = [r for r in rows if r["impl"] == "raw" and not r["traced"]]
    exact = [r for r in raw if not r["fast_conv"]]
    keras = [r for r in rows if r["impl"] == "keras"]
    entry = {"width": width, "dtype_policy": policy}
    if raw and keras:
      best_keras = min(keras, key=lambda r: r["step_s_median"])
      for label, candidates in (("", raw), ("exact_", exact)):
        best = min(candidates, key=lambda r: r["step_s_median"])
        name = best["mode"] + ("+fast_conv" if best["fast_conv"] else "")
        entry.update({f"best_{label}raw": name,
                      f"{label}raw_over_keras": best["step_s_median"] / best_keras["step_s_median"],
                      f"best_{label}raw_peak_fraction": best["peak_fraction"]})
      entry["best_keras"] = best_keras["mode"]
      best_s[width, policy] = (min(r["step_s_median"] for r in exact),
                               best_keras["step_s_median"])
    xla = {r["traced"]: r for r in rows if r["impl"] == "raw" and r["mode"] == "xla"
           and not r["fast_conv"]}
    if len(xla) == 2:
      entry["xla_trace_on_over_off"] = xla[True]["step_s_median"] / xla[False]["step_s_median"]
    compiled = [r for r in exact if r["mode"] in ("function", "xla")]
    auto = next((r for r in every if r["impl"] == "raw" and r["mode"] == "auto"), None)
    if auto is not None and compiled:
      best = min(compiled, key=lambda r: r["step_s_median"])
      chosen = next((r for r in compiled if r["mode"] == auto["chosen"]), auto)
      record = auto["autotune"]
      # What measuring costs beyond the chosen mode's own compile, over the seed's 500 steps,
      # with the chosen mode's own row (the auto row runs the same step: its difference from
      # that row is the machine's noise, not the choice).
      extra = record["seconds"] - record["candidates"][record["choice"]]["compile_s"]
      entry["auto"] = {
          "chosen": auto["chosen"], "best_explicit": best["mode"],
          "step_over_best": auto["step_s_median"] / best["step_s_median"],
          "measure_s": record["seconds"], "extra_s": extra,
          "run_500_steps_over_best": (extra + 500 * chosen["step_s_median"])
                                     / (500 * best["step_s_median"])}
    per_call = {}
    for r in every:
      k = r["steps_per_execution"]
      one = next((o for o in rows if o["impl"] == r["impl"] and o["mode"] == r["mode"]
                  and not o["fast_conv"] and not o["traced"]), None)
      if k > 1 and one is not None:
        per_call[f"{r['impl']} {r['mode']} k={k}"] = r["step_s_median"] / one["step_s_median"]
    if per_call:
      entry["steps_per_execution_over_one"] = per_call
    out.append(entry)
  for entry in out:  # each mixed policy against float32 at the same width
    mine, base = (best_s.get((entry["width"], entry["dtype_policy"])),
                  best_s.get((entry["width"], "float32")))
    if entry["dtype_policy"] != "float32" and mine and base:
      entry["over_float32"] = {"exact_raw": mine[0] / base[0], "keras": mine[1] / base[1]}
  return out


def _short(policy: str) -> str:
  return {"mixed_float16": "mixed16", "mixed_bfloat16": "mixedb16"}.get(policy, policy)


def report(result: dict) -> str:
  """The table the command prints, with the per-width ratios under it."""
  lines = [f"device {result['device']}; matmul ceiling {result['matmul_peak_gflops']:.0f} GFLOP/s",
           f"{'impl':5} {'mode':13} {'k':>2} {'fast':>4} {'width':>7} {'dtype':>8} {'batch':>5} "
           f"{'trace':>5} "
           f"{'compile s':>9} {'step ms':>9} {'min ms':>8} {'img/s':>8} {'GFLOP/s':>8} "
           f"{'of peak':>7}"]
  for r in result["results"]:
    mode = f"auto:{r['chosen']}" if r["mode"] == "auto" else r["mode"]
    lines.append(f"{r['impl']:5} {mode:13} {r['steps_per_execution']:>2} "
                 f"{'yes' if r['fast_conv'] else 'no':>4} "
                 f"{r['width']:>7.4g} {_short(r.get('dtype_policy', 'float32')):>8} "
                 f"{r['batch_size']:>5} "
                 f"{'on' if r['traced'] else 'off':>5} {r['compile_s']:>9.2f} "
                 f"{r['step_s_median'] * 1e3:>9.1f} {r['step_s_min'] * 1e3:>8.1f} "
                 f"{r['images_per_s']:>8.0f} "
                 f"{r['gflops']:>8.1f} {r['peak_fraction']:>7.1%}")
  for entry in result["ratios"]:
    policy = entry.get("dtype_policy", "float32")
    parts = [f"width {entry['width']:g}" + ("" if policy == "float32" else f" {policy}") + ":"]
    if "raw_over_keras" in entry:
      parts.append(f"best raw ({entry['best_raw']}) / best Keras ({entry['best_keras']}) = "
                   f"{entry['raw_over_keras']:.2f}; Keras-exact raw ({entry['best_exact_raw']}): "
                   f"{entry['exact_raw_over_keras']:.2f}")
    if "xla_trace_on_over_off" in entry:
      parts.append(f"raw xla trace on/off = {entry['xla_trace_on_over_off']:.3f}")
    lines.append("  ".join(parts))
    if "auto" in entry:
      a = entry["auto"]
      lines.append(f"  auto chose {a['chosen']} (best explicit {a['best_explicit']}): step "
                   f"{a['step_over_best']:.2f}x the best; measuring took {a['measure_s']:.1f} s, "
                   f"{a['extra_s']:.1f} s beyond its own compile: a 500-step run "
                   f"{a['run_500_steps_over_best']:.3f}x the best explicit mode's")
    for name, ratio in entry.get("steps_per_execution_over_one", {}).items():
      lines.append(f"  {name}: {ratio:.3f}x the time per step of k=1")
    if "over_float32" in entry:
      o = entry["over_float32"]
      lines.append(f"  {policy} / float32, best of each: exact raw {o['exact_raw']:.2f}x, "
                   f"Keras {o['keras']:.2f}x")
  if "breakdown" in result and result["breakdown"] is None:
    lines.append("(no per-block breakdown: it takes the float32 step apart; add float32 to "
                 "--dtype_policy)")
  if result.get("breakdown"):
    from bnraw.profiling.breakdown import format_breakdown
    for table in result["breakdown"]:
      lines.append(format_breakdown(table["width"], table))
  for table in result.get("op_stats") or []:
    lines.append(f"width {table['width']:g}, XProf op stats of the raw {table['mode']} step:")
    lines.append(op_stats.format_summary(table))
  if result.get("op_stats", []) is None:
    lines.append("(no per-op tables: XProf is not installed (pip install 'bnraw[xprof]'), or "
                 "it could not read the capture)")
  return "\n".join(lines)
