"""Where a synced comparison first stops being bit-identical: which weights differ after the
first such step, the deepest first (a gradient is computed from the output back, so the deepest
weight that differs is nearest to where the backward pass first differed), and which layer's
output, in the step's compiled mode from the state before it, is the first to differ.

The forward check runs each side's training-mode forward on that step's first batch, compiled
as the step was (``tf.function``, and XLA in xla mode), returning every layer's output; it
compares the layers both sides name alike (the top-level layers of the Keras model). A forward
compiled on its own may fuse differently from the same ops inside the training step, so "every
output identical" there points at the backward pass but does not prove the forward identical
inside the step."""

from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from bnraw.parity.metrics import max_rel


def differing_weights(names: list[str], raw: list[np.ndarray], keras: list[np.ndarray],
                      trainable: list[bool]) -> list[dict]:
  """The weights whose values differ, deepest first: name, trainable, max relative diff."""
  return [{"name": names[i], "trainable": trainable[i],
           "max_rel_diff": max_rel(raw[i], keras[i])}
          for i in reversed(range(len(names))) if not np.array_equal(raw[i], keras[i])]


def first_layer_output(workload, kmodel, x: np.ndarray, mode: str) -> Optional[dict]:
  """The first layer (in the raw model's order) whose training-mode output on ``x`` differs,
  with its max relative diff and the number of layers compared; ``{"layer": None, ...}`` when
  every compared output is identical. The training-mode forwards move both models' BN
  statistics and seeds: the caller restores them (:func:`bnraw.parity.compare.locate` does)."""
  from bnraw.models import keras_bridge
  keras = keras_bridge.keras_module(workload.reference)
  raw = workload.model
  names = {layer.name for layer in kmodel.layers if type(layer).__name__ != "InputLayer"}
  shared = [layer.name for layer in raw.layers if layer.name in names]
  if not shared:
    return None
  probe = keras.Model(kmodel.inputs, [kmodel.get_layer(name).output for name in shared])
  last = raw.layers[-1].name

  def raw_forward(x):
    outputs: dict = {}
    raw(x, training=True, outputs=outputs)
    if raw.output_activation is not None and last in outputs:
      outputs[last] = raw.predictions(outputs[last])
    return [outputs[name] for name in shared]

  compile_ = lambda fn: tf.function(fn, jit_compile=(mode == "xla"))
  x = tf.constant(x)
  ours = [np.asarray(v, np.float32) for v in compile_(raw_forward)(x)]
  theirs = [np.asarray(v, np.float32) for v in compile_(lambda x: probe(x, training=True))(x)]
  for name, a, b in zip(shared, ours, theirs):
    if a.shape != b.shape or not np.array_equal(a, b):
      return {"layer": name, "max_rel_diff": (max_rel(a, b) if a.shape == b.shape
                                              else float("inf")), "compared": len(shared)}
  return {"layer": None, "max_rel_diff": 0.0, "compared": len(shared)}


def describe(found: dict) -> list[str]:
  """The lines the compare report prints for ``result["first_difference"]``."""
  lines = [f"first step not bit-identical: {found['step']}"]
  weights = found["weights"]
  if weights:
    deepest = weights[0]
    lines.append(f"  weights that differ after it: {len(weights)} of {found['weight_count']}; "
                 f"deepest {deepest['name']} (max rel {deepest['max_rel_diff']:.1e})")
  else:
    lines.append("  weights: every one identical after it; only the loss differs")
  forward = found.get("forward")
  if forward is None:
    lines.append("  forward: not checked (free-running, replicas, or no layer named alike on "
                 "both sides)")
  elif forward["layer"] is None:
    lines.append(f"  forward: every layer's output identical ({forward['compared']} layers, "
                 "compiled apart from the step): the backward pass or the update differs")
  else:
    lines.append(f"  forward: first layer whose output differs: {forward['layer']} "
                 f"(max rel {forward['max_rel_diff']:.1e})")
  return lines
