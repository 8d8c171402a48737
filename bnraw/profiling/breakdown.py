"""Where a training step's time goes, by timed sub-steps: the step with one block taken away
at a time, each variant compiled in the same mode and timed round-robin.

The chain, each variant the previous one minus one block::

  step              the real train step (make_train_step: optimizer, accuracy, NaN guard)
  no_optimizer      forward + gradients only (each gradient reduced to a scalar, so none is
                    pruned): optimizer  = step - no_optimizer
  no_moving_update  and BN normalising with batch moments without writing the moving
                    statistics:               moving update  = no_optimizer - no_moving_update
  fixed_statistics  and BN normalising with fixed statistics (no moments, forward or back):
                                              BN statistics  = no_moving_update - fixed_statistics
  no_bn             and no BN layers at all:  normalisation  = fixed_statistics - no_bn
                    what is left is the convolutions, matmuls, ReLUs and the loss: conv and rest

Works in every mode, XLA included (no profiler needed). The variants are timed interleaved step
by step, and each variant's time is its fastest step: on a shared machine a slow step measures
the neighbours, and with medians the blocks (differences of two times) came out at -12% on this
2-core machine. The blocks telescope to the step's time by construction; a small block can still
come out slightly negative, and under XLA taking a block away can change how the rest fuses.
"""

from __future__ import annotations

import statistics
from typing import Callable

import tensorflow as tf

from bnraw.core import ops
from bnraw.core.autotune import state_restored
from bnraw.core.graph import BATCH, Model, Node
from bnraw.core.layers import BatchNorm
from bnraw.core.step import compile_fn, make_train_step

VARIANTS = ("step", "no_optimizer", "no_moving_update", "fixed_statistics", "no_bn")
BLOCKS = ("optimizer", "moving_update", "bn_statistics", "normalisation", "conv_and_rest")


def without_batch_norm(model: Model) -> Model:
  """``model`` with every BN layer an identity (its output is its input): the same other
  layers, variables, loss and metric, so a step of it is the step less BN's cost."""
  alias, nodes = [0], []  # value id in model -> value id in the copy
  for layer, inputs in model.nodes:
    if isinstance(layer, BatchNorm):
      alias.append(alias[inputs[0]])
    else:
      nodes.append(Node(layer, tuple(alias[i] for i in inputs)))
      alias.append(len(nodes))
  kept = {id(v) for node in nodes for v in node.layer.variables}
  return Model(f"{model.name}_no_bn", nodes, loss_fn=model.loss_fn, metric_fn=model.metric_fn,
               variables=[v for v in model.variables if id(v) in kept],
               trainable_variables=[v for v in model.trainable_variables if id(v) in kept],
               state_variables=model.state_variables, regularizers=model.regularizers,
               output_activation=model.output_activation,
               loss_uses_logits=model.loss_uses_logits, compute_dtype=model.compute_dtype)


def variant_steps(model: Model, optimizer, mode: str, *,
                  relax_batch: bool = False) -> dict[str, Callable]:
  """``{variant: step(images, labels)}`` for :data:`VARIANTS`, compiled in ``mode`` (and
  ``relax_batch``, as the run's step would be: :func:`bnraw.core.step.relaxed_batch`)."""
  no_bn = without_batch_norm(model)

  def ablated(level: str) -> Callable:
    def step(images, labels):
      net = no_bn if level == "no_bn" else model
      statistics = {"no_optimizer": None, "no_moving_update": BATCH,
                    "fixed_statistics": {l.name: ops.Moments(l.moving_mean, l.moving_variance)
                                         for l in model.batch_norms},
                    "no_bn": None}[level]
      with tf.GradientTape() as tape:
        loss = net.loss(net(images, training=True, statistics=statistics).logits, labels)
      gradients = tape.gradient(loss, net.trainable_variables)
      return loss + tf.add_n([tf.reduce_sum(g) for g in gradients]) * 0.0
    return compile_fn(step, mode, relax_batch=relax_batch)

  steps = {"step": make_train_step(model, optimizer, mode=mode, trace=False,
                                   relax_batch=relax_batch)}
  steps.update({level: ablated(level) for level in VARIANTS[1:]})
  return steps


def blocks(step_ms: dict[str, float]) -> dict[str, float]:
  """Per block, the difference of consecutive variants' step times (ms; fastest or median)."""
  chain = [step_ms[v] for v in VARIANTS]
  out = {block: chain[i] - chain[i + 1] for i, block in enumerate(BLOCKS[:-1])}
  out[BLOCKS[-1]] = chain[-1]
  return out


def measure(model: Model, optimizer, images: tf.Tensor, labels: tf.Tensor, *, mode: str,
            steps: int, warmup: int, rounds: int, relax_batch: bool = False) -> dict:
  """Times every variant (compile, ``warmup`` untimed, then ``rounds * steps`` timed, one step of
  each variant in turn); returns ``{"mode", "step_ms": {variant: fastest}, "blocks_ms": {block:
  ms}, "median_ms", "blocks_median_ms"}`` (the same from the medians: when the two disagree by
  more than a few percent of the step, the machine was too noisy for that block).
  The model's variables are put back afterwards (the real step trains)."""
  import time
  fns = variant_steps(model, optimizer, mode, relax_batch=relax_batch)
  times = {v: [] for v in VARIANTS}
  run = lambda v: float(tf.nest.flatten(fns[v](images, labels))[0])  # waits for the step
  with state_restored(model, optimizer):
    for v in VARIANTS:
      for _ in range(1 + warmup):
        run(v)
    for _ in range(rounds * steps):
      for v in VARIANTS:
        start = time.perf_counter()
        run(v)
        times[v].append(time.perf_counter() - start)
  step_ms = {v: min(times[v]) * 1e3 for v in VARIANTS}
  median_ms = {v: statistics.median(times[v]) * 1e3 for v in VARIANTS}
  return {"mode": mode, "step_ms": step_ms, "blocks_ms": blocks(step_ms),
          "median_ms": median_ms, "blocks_median_ms": blocks(median_ms)}


def format_breakdown(width: float, table: dict) -> str:
  lines = []
  for label, times, parts in (("fastest", "step_ms", "blocks_ms"),
                              ("median", "median_ms", "blocks_median_ms")):
    total = table[times]["step"]
    blocks_text = "  ".join(f"{b} {ms:.1f} ({ms / total:.0%})" for b, ms in table[parts].items())
    lines.append(f"width {width:g}, raw {table['mode']} step {total:.1f} ms ({label} steps): "
                 f"{blocks_text}")
  return "\n".join(lines)
