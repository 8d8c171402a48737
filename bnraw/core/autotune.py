"""``mode="auto"``: measure the candidate modes' train steps on this machine and keep the fastest.

Which mode is fastest depends on the machine, not only on whether it has a GPU: on a 2-core
AVX2 EPYC, XLA ran the seed's step 1.7x (width 1/16) to 5.3x (1/4) faster than ``tf.function``;
on a 2-core AVX-512 Xeon, ``tf.function`` was the faster one. So ``auto`` times both:

1. every candidate's step is compiled (its first call) and run once more untimed;
2. up to ``steps`` timed steps per candidate, round-robin so a noisy machine's drift hits all
   alike, each candidate scored by its fastest step (on a shared machine a slow step measures the
   neighbours); it stops early once one candidate is :data:`CLEAR` times another (a clear winner
   needs no more steps: each costs run time);
3. the state (every model variable, the optimizer's slots and iteration count) is put back
   exactly as it was, so the run starts from the same state whatever is picked.

The winner's compiled step is handed back for the run to reuse (its compile is not paid twice).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from bnraw.core import optim
from bnraw.core.graph import Model
from bnraw.core.step import make_train_step, relaxed_batch

CANDIDATES = ("function", "xla")
CLEAR = 1.3  # slowest / fastest candidate beyond which measuring stops early


@dataclasses.dataclass
class Choice:
  """The mode a run uses, its compiled train step, and (for ``auto``) what was measured:
  ``record = {"choice", "candidates": {mode: {"compile_s", "step_ms"}}, "steps_timed",
  "seconds"}`` (``seconds``: the whole measurement, compiles included)."""

  mode: str
  step_fn: Callable
  record: Optional[dict] = None


@contextlib.contextmanager
def state_restored(model: Model, optimizer):
  """Every model variable and the optimizer's whole state (slots, iteration count, loss scale)
  are put back exactly as they were when the block ends (also on error): steps run inside it
  for timing leave no trace."""
  variables = [*model.variables, *getattr(model, "state_variables", ()),
               *optim.state_variables(optimizer)]
  saved = [v.numpy() for v in variables]
  try:
    yield
  finally:
    for variable, value in zip(variables, saved):
      variable.assign(value)


def measure(model: Model, optimizer, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
            trace: bool, relax_batch: bool = False, candidates: Sequence[str] = CANDIDATES,
            steps: int = 3) -> Choice:
  """Times each candidate mode's train step on the first ``batch_size`` examples and returns the
  fastest (by its fastest timed step); the model and optimizer end exactly as they began."""
  started = time.perf_counter()
  x, y = tf.constant(images[:batch_size]), tf.constant(labels[:batch_size])
  compiled, compile_s, failed = {}, {}, {}
  with state_restored(model, optimizer):
    if isinstance(optimizer, optim.LossScale):  # time applied steps: a skipped one is cheaper
      optimizer.dynamic_scale.assign(1.0)
    for mode in candidates:
      step = make_train_step(model, optimizer, mode=mode, trace=trace, relax_batch=relax_batch)
      start = time.perf_counter()
      try:
        float(step(x, y)["loss"])  # the compile; float() waits for the step
      except (tf.errors.OpError, ValueError) as e:  # e.g. an op XLA cannot compile
        failed[mode] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        continue
      compile_s[mode] = time.perf_counter() - start
      float(step(x, y)["loss"])
      compiled[mode] = step
    if not compiled:
      raise RuntimeError(f"auto mode: no candidate mode runs here: {failed}")
    candidates = list(compiled)
    times = {mode: [] for mode in candidates}
    for _ in range(steps):
      for mode in candidates:
        start = time.perf_counter()
        float(compiled[mode](x, y)["loss"])
        times[mode].append(time.perf_counter() - start)
      fastest = [min(times[mode]) for mode in candidates]
      if max(fastest) > CLEAR * min(fastest):
        break
  step_ms = {mode: min(times[mode]) * 1e3 for mode in candidates}
  choice = min(candidates, key=lambda mode: step_ms[mode])
  record = {"choice": choice, "steps_timed": len(times[choice]),
            "candidates": {mode: {"compile_s": compile_s[mode], "step_ms": step_ms[mode]}
                           for mode in candidates},
            **({"failed": failed} if failed else {}),
            "seconds": time.perf_counter() - started}
  return Choice(choice, compiled[choice], record)


def choose(model: Model, optimizer, images: np.ndarray, labels: np.ndarray, *, mode: str,
           batch_size: int, trace: bool) -> Choice:
  """The train step ``loop.fit`` would compile for this data and batch size: for an explicit
  ``mode`` as given (nothing measured, nothing compiled yet), for ``"auto"`` the fastest
  (:func:`measure`)."""
  relax = relaxed_batch(len(images), batch_size)
  if mode == "auto":
    return measure(model, optimizer, images, labels, batch_size=batch_size, trace=trace,
                   relax_batch=relax)
  return Choice(mode, make_train_step(model, optimizer, mode=mode, trace=trace,
                                      relax_batch=relax))


def describe(record: dict) -> str:
  """One line: ``auto mode: function (function 123.4 ms/step, xla 220.1 ms/step; 6.2 s to
  measure)``."""
  timings = ", ".join(f"{mode} {c['step_ms']:.1f} ms/step"
                      for mode, c in record["candidates"].items())
  if record.get("reused"):
    return f"auto mode: {record['choice']}, as measured when the run began ({timings})"
  if record.get("cached"):
    return (f"auto mode: {record['choice']}, as measured on this machine at "
            f"{record.get('measured_at', '?')} ({timings}; kept in the autotune cache)")
  return f"auto mode: {record['choice']} ({timings}; {record['seconds']:.1f} s to measure)"
