"""Scaling over replicas: the raw replicated step (bnraw.core.replicas) and Keras ``fit`` under
the same MirroredStrategy, at 1, 2, ... replicas of one global batch, timed round-robin in one
process (``bnraw-profile --replicas=1,2``).

One replica is today's single-device path (``--replicas=1``); N > 1 the first N of the devices
:func:`bnraw.core.replicas.configure_devices` gives: N GPUs, or the CPU split into N logical
devices. Logical CPU devices share the process's thread pools, so on a CPU the numbers measure
what the strategy costs (the split, N smaller convolutions, the all-reduces), not added compute:
a speed-up needs N real devices.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Sequence

import numpy as np
import tensorflow as tf

from bnraw.config import ModelConfig
from bnraw.profiling.bench import (Bench, _timed, device_name, keras_bench, profile_train_config,
                                   raw_bench, train_step_flops)


def raw_replicated_bench(model_config: ModelConfig, images: np.ndarray, labels: np.ndarray, *,
                         strategy: tf.distribute.Strategy, batch_size: int) -> Bench:
  """The raw replicated step (fresh model and Adam, built under ``strategy``), function mode."""
  from bnraw.core.optim import make_optimizer
  from bnraw.core.step import make_train_step
  from bnraw.models.seed import seed_network
  train = profile_train_config(model_config)
  with strategy.scope():
    net = seed_network(model_config)
    optimizer = make_optimizer(train.optimizer, net.trainable_variables, train.lr)
  step = make_train_step(net, optimizer, mode="function", trace=False, strategy=strategy)
  x, y = images[:batch_size], labels[:batch_size]
  run = lambda: step(x, y)  # numpy out: waits for every replica
  start = time.perf_counter()
  run()
  compile_s = time.perf_counter() - start
  measure = lambda steps, warmup: _timed(run, steps, warmup)
  return Bench({"impl": "raw", "mode": "function"}, compile_s, measure, run)


def run(*, counts: Sequence[int], width: float, batch_size: int, steps: int, warmup: int,
        rounds: int, keras: bool = True, progress: bool = False) -> dict:
  """Per replica count: the raw step and (``keras``) Keras ``fit`` (jit off, as fit runs under a
  strategy), each built once, then all timed round-robin ``rounds`` times; the median step.
  Returns the profile dict (``rows`` and ``scaling``)."""
  from bnraw.config import DataConfig
  from bnraw.core import replicas
  from bnraw.models.seed import check_shards, make_dataset, NUM_IMAGES
  for n in counts:
    if n < 1:
      raise ValueError(f"replica counts must be >= 1, got {n}")
    if n > 1:
      check_shards(NUM_IMAGES, batch_size, n)
  devices = replicas.configure_devices(max(counts))  # before anything starts TensorFlow's devices
  data = make_dataset(DataConfig())
  model_config = ModelConfig(width=width)
  benches = []
  for n in counts:
    strategy = tf.distribute.MirroredStrategy(devices[:n]) if n > 1 else None
    label = f"{n} replica" + ("s" if n > 1 else "")
    if progress:
      print(f"building {label}", file=sys.stderr)
    if strategy is None:  # on the first of the same devices (a GPU machine splits no CPU)
      with tf.device(devices[0]):
        raw = raw_bench(model_config, data.images, data.labels, mode="function",
                        batch_size=batch_size, trace=False)
    else:
      raw = raw_replicated_bench(model_config, data.images, data.labels, strategy=strategy,
                                 batch_size=batch_size)
    raw.row = {"impl": "raw", "mode": "function", "replicas": n}
    benches.append(raw)
    if keras:
      with strategy.scope() if strategy else tf.device(devices[0]):
        fit = keras_bench(model_config, data.images, data.labels, jit_compile=False,
                          batch_size=batch_size)
      fit.row = {"impl": "keras", "mode": "fit", "replicas": n}
      benches.append(fit)
  for r in range(rounds):
    if progress:
      print(f"round {r + 1}/{rounds}", file=sys.stderr)
    for bench in benches:
      bench.times += bench.measure(steps, warmup)
  flops = train_step_flops(model_config, batch_size)
  rows = []
  for bench in benches:
    ms = 1e3 * statistics.median(bench.times)
    rows.append({**bench.row, "ms_per_step": ms, "examples_per_s": batch_size / ms * 1e3,
                 "gflops": flops / ms / 1e6, "compile_s": bench.compile_s,
                 "timed_steps": len(bench.times)})
  on_gpu = "GPU" in devices[0].upper()
  return {"width": width, "batch_size": batch_size,
          "device": device_name() if on_gpu else f"CPU split into {len(devices)} logical "
                                                 "devices",
          "devices": list(devices), "steps": steps, "rounds": rounds, "warmup": warmup,
          "rows": rows, "scaling": scaling(rows)}


def scaling(rows: list[dict]) -> list[dict]:
  """Per implementation and replica count: the speed-up over its own 1-replica row (``None``
  without one) and, where both ran, raw over Keras."""
  by = {(row["impl"], row["replicas"]): row["ms_per_step"] for row in rows}
  out = []
  for (impl, n), ms in by.items():
    one = by.get((impl, 1))
    other = by.get(("keras", n)) if impl == "raw" else None
    out.append({"impl": impl, "replicas": n, "speedup_over_1": one / ms if one else None,
                "raw_over_keras": ms / other if other else None})
  return out


def report(result: dict) -> str:
  lines = [f"{result['device']}, width {result['width']:g}, global batch {result['batch_size']}, "
           f"devices {', '.join(d.split('/')[-1] for d in result['devices'])}; median of "
           f"{result['rounds']} rounds x {result['steps']} steps",
           f"{'impl':6} {'replicas':>8} {'ms/step':>9} {'examples/s':>11} {'speed-up':>9} "
           f"{'raw/keras':>10}"]
  scale = {(s["impl"], s["replicas"]): s for s in result["scaling"]}
  for row in result["rows"]:
    s = scale[(row["impl"], row["replicas"])]
    fmt = lambda v: f"{v:.2f}" if v is not None else "-"
    lines.append(f"{row['impl']:6} {row['replicas']:>8} {row['ms_per_step']:>9.2f} "
                 f"{row['examples_per_s']:>11.0f} {fmt(s['speedup_over_1']):>9} "
                 f"{fmt(s['raw_over_keras']):>10}")
  if "GPU" not in result["devices"][0].upper():
    lines.append("logical CPU devices share this process's cores: the replica rows show what "
                 "the strategy costs here, not a speed-up (that needs N real devices)")
  return "\n".join(lines)


__all__ = ["raw_replicated_bench", "report", "run", "scaling"]
