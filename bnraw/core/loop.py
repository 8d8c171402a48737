"""The explicit training loop: fit() and evaluate() around the compiled steps of
:mod:`bnraw.core.step` (one device or the replicas of a strategy), with Keras's batching,
shuffling and epoch averaging (:mod:`bnraw.core.batching`), and the state a run needs to stop
anywhere and continue bit for bit."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from bnraw.core import optim
from bnraw.core.graph import Model
from bnraw.core.layers import UpdateHook
from bnraw.core.batching import (MeanTracker, batches, mean_over_batches, read_batches,
                                 shard_sizes, sorted_within_batches, streamed)
from bnraw.core.step import make_eval_step, make_multi_step, make_train_step, relaxed_batch


@dataclasses.dataclass
class StepRecord:
  """What the loop hands to ``on_step`` after every optimizer step (numpy values)."""

  epoch: int  # 0-based
  step: int  # global optimizer step, 0-based
  batch: np.ndarray  # example indices of this batch
  loss: float
  accuracy: float
  trace: Optional[dict]  # TRACE_KEYS -> list (per BN layer) of arrays, when tracing
  loss_scale: Optional[float] = None  # with loss scaling: the scale this step used
  skipped: Optional[bool] = None  # with loss scaling: gradients not finite, no weight update


class NonFiniteError(RuntimeError):
  """A step produced a non-finite loss or BN statistic; ``step`` is 0-based."""

  def __init__(self, step: int, where: str):
    super().__init__(f"non-finite value at step {step}, first in {where}")
    self.step, self.where = step, where


@dataclasses.dataclass
class FitState:
  """Where a run stands, exactly enough to continue it bit for bit: the epoch, the next batch
  of that epoch's order, the epoch's running means so far, and the shuffling generator's state
  (after this epoch's permutation was drawn; data read as a dataset draws each epoch's order
  from the epoch's number alone)."""

  epoch: int = 0
  next_batch: int = 0
  order: Optional[list] = None  # this epoch's permutation, if it has begun
  loss_mean: tuple = (0.0, 0.0)  # MeanTracker (total, count)
  accuracy_mean: tuple = (0.0, 0.0)
  rng_state: Optional[dict] = None
  loss: list = dataclasses.field(default_factory=list)  # per finished epoch
  accuracy: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class History:
  """Per epoch, what ``model.fit`` would print, and the batch order that produced it.

  ``status`` is ``"complete"``, ``"interrupted"`` (``should_stop`` said so) or ``"non_finite"``
  (then ``error`` says where); ``state`` is where to resume.
  """

  loss: list = dataclasses.field(default_factory=list)
  accuracy: list = dataclasses.field(default_factory=list)
  permutations: list = dataclasses.field(default_factory=list)
  status: str = "complete"
  state: FitState = dataclasses.field(default_factory=FitState)
  error: Optional[NonFiniteError] = None
  seconds: float = 0.0  # wall time of this call's training loop
  mode: str = ""  # the mode the steps ran in (mode="auto": the measured choice)
  skipped: list = dataclasses.field(default_factory=list)  # steps loss scaling skipped (this call)
  autotune: Optional[dict] = None  # what mode="auto" measured (bnraw.core.autotune)


def fit(model: Model, optimizer, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
        epochs: int, seed: int, mode: str, trace: bool = False,
        on_step: Optional[Callable[[StepRecord], None]] = None,
        on_epoch: Optional[Callable[[int, History], None]] = None,
        hook: Optional[UpdateHook] = None, hook_step: Optional[int] = None,
        resume: Optional[FitState] = None, should_stop: Optional[Callable[[], bool]] = None,
        step_fn: Optional[Callable] = None, steps_per_execution: int = 1,
        strategy: Optional[tf.distribute.Strategy] = None,
        sorted_shards: bool = False) -> History:
  """Trains until ``epochs`` epochs are done, reshuffling every epoch from
  ``np.random.default_rng(seed)`` (data read as a dataset, an ``images`` with
  ``epoch_order``: in the orders fit draws from it, ``bnraw.models.data``); or continues
  from ``resume``.

  The permutations are recorded in the returned history so another trainer (Keras ``fit``) can
  replay exactly the same batches. After every step ``should_stop()`` may end the run early
  (status "interrupted"); a non-finite loss or BN statistic ends it with status "non_finite".
  Step ``hook_step`` alone runs eagerly with ``hook`` in every BN layer (the step debugger);
  every other step runs in ``mode``, so up to that step the run is the one it would be without
  the hook (after it, eager rounding may let it drift: ~1e-7 from function, ~1e-4 from xla).
  ``step_fn``: a train step already compiled for this model, optimizer, mode, trace and batch
  relaxation (a sweep reuses it across runs that re-initialise the same variables).
  ``steps_per_execution``: up to this many consecutive batches of an epoch run as one execution
  (:func:`run_chunk`: one compiled call per batch size; as Keras, never across epochs), their
  per-step outputs returned stacked, so ``on_step`` still sees every step; ``should_stop`` is
  asked after each execution, and the hook's step always runs alone.
  ``strategy``: the replicated step (bnraw.core.replicas) on its N replicas, every output per
  replica (the trace ``[N, C]`` per layer), the epoch means per replica (:class:`MeanTracker`);
  ``on_step`` gets the global batch's loss and accuracy. ``sorted_shards``: each batch sorted
  by label before it is split (:func:`sorted_within_batches`, non-iid shards).
  """
  if (hook is None) != (hook_step is None):
    raise ValueError("hook and hook_step go together: the hook runs at that one step")
  if steps_per_execution < 1:
    raise ValueError(f"steps_per_execution must be >= 1, got {steps_per_execution}")
  relax = relaxed_batch(len(images), batch_size)
  tuning = None
  n = 1 if strategy is None else strategy.num_replicas_in_sync
  if strategy is not None:
    if hook is not None or steps_per_execution > 1 or mode not in ("function", "xla", "eager"):
      raise ValueError("replicas run one step per call, in a fixed mode, without a hook")
    step_fn = step_fn or make_train_step(model, optimizer, mode=mode, trace=trace,
                                         relax_batch=relax, strategy=strategy)
  if step_fn is None and mode == "auto":  # measured here, on this state (which it puts back)
    from bnraw.core import autotune
    choice = autotune.choose(model, optimizer, images, labels, mode=mode,
                             batch_size=batch_size, trace=trace)
    mode, step_fn, tuning = choice.mode, choice.step_fn, choice.record
  step_fn = step_fn or make_train_step(model, optimizer, mode=mode, trace=trace, relax_batch=relax)
  multi_fn = (make_multi_step(step_fn, mode, relax_batch=relax) if steps_per_execution > 1
              else None)
  debug_fn = (make_train_step(model, optimizer, mode="eager", trace=trace, hook=hook)
              if hook is not None else None)
  reader = Reader(images, labels)
  rng = np.random.default_rng(seed)
  state = resume or FitState(rng_state=rng.bit_generator.state)
  rng.bit_generator.state = state.rng_state
  history = History(loss=list(state.loss), accuracy=list(state.accuracy), state=state,
                    mode=mode, autotune=tuning)
  global_step = optim.steps_run(optimizer)
  started = time.perf_counter()
  for epoch in range(state.epoch, epochs):
    resuming = state.order is not None and epoch == state.epoch
    if resuming:
      order = np.asarray(state.order)
    elif hasattr(images, "epoch_order"):  # data read as a dataset: the batches fit draws from it
      order = images.epoch_order(seed, batch_size, epoch)
    else:
      order = rng.permutation(len(images))
      if sorted_shards:
        order = sorted_within_batches(order, labels, batch_size)
    loss_mean = MeanTracker(*state.loss_mean) if resuming else MeanTracker(replicas=n)
    accuracy_mean = (MeanTracker(*state.accuracy_mean) if resuming else
                     MeanTracker(replicas=n))
    first = state.next_batch if resuming else 0
    history.permutations.append(order)
    epoch_batches = batches(order, batch_size)
    reader.epoch(epoch_batches[first:], f"train: epoch {epoch + 1}")
    number = first
    while number < len(epoch_batches):
      chunk = _chunk(epoch_batches, number, global_step, steps_per_execution, hook_step)
      run_step = debug_fn if debug_fn is not None and global_step == hook_step else step_fn
      for batch, out in zip(chunk, run_chunk(run_step, multi_fn, reader.take, chunk)):
        losses, correct = np.reshape(out["loss"], [n]), np.reshape(out["correct"], [n])
        finite = np.reshape(out["finite"], [n, -1]).all(axis=0)
        if not finite.all() or not np.isfinite(losses).all():
          where = (model.batch_norms[int(np.argmin(finite))].name if not finite.all()
                   else "the loss")
          history.status, history.error = "non_finite", NonFiniteError(global_step, where)
          history.seconds = time.perf_counter() - started
          return history
        sizes = shard_sizes(len(batch), n)
        loss_mean.update(losses, sizes)
        accuracy_mean.add(correct, sizes)
        # the global batch's loss (one device: exactly the step's)
        loss = float(losses[0] if n == 1 else np.dot(losses.astype(np.float64), sizes) /
                     len(batch))
        scaled = "skipped" in out
        if scaled and out["skipped"]:
          history.skipped.append(global_step)
        if on_step is not None:
          on_step(StepRecord(epoch, global_step, batch, loss, float(correct.sum()) / len(batch),
                             out["trace"] if trace else None,
                             float(out["loss_scale"]) if scaled else None,
                             bool(out["skipped"]) if scaled else None))
        global_step += 1
      number += len(chunk)
      if should_stop is not None and should_stop():
        history.state = state = FitState(
            epoch, number, order.tolist(), loss_mean.state(), accuracy_mean.state(),
            rng.bit_generator.state,
            list(history.loss), list(history.accuracy))
        history.status = "interrupted"
        history.seconds = time.perf_counter() - started
        return history
    history.loss.append(loss_mean.result())
    history.accuracy.append(accuracy_mean.result())
    history.state = state = FitState(epoch + 1, rng_state=rng.bit_generator.state,
                                     loss=list(history.loss), accuracy=list(history.accuracy))
    if on_epoch is not None:
      on_epoch(epoch, history)
  history.seconds = time.perf_counter() - started
  return history


class Reader:
  """Where a run's batches come from: ``take(indices) -> (x, y)`` tensors. Data in memory is
  held once as tensors (on the device) and gathered; streamed data (``batching.streamed``) is
  read ahead through each epoch's batches, given to :meth:`epoch` before the epoch starts
  (``take`` then asks for them in that order)."""

  def __init__(self, images, labels):
    self.images, self.labels = images, labels
    self._ahead = None
    if not streamed(images):
      self._x, self._y = tf.constant(images), tf.constant(labels)

  def epoch(self, chunks, what: str) -> None:
    if streamed(self.images):
      self._ahead = ReadAhead(self.images, self.labels, chunks, what)

  def take(self, index) -> tuple[tf.Tensor, tf.Tensor]:
    if self._ahead is not None:
      return self._ahead.take(index)
    return tf.gather(self._x, index), tf.gather(self._y, index)


class ReadAhead:
  """A streamed ``images`` read in the order of ``chunks`` (:func:`read_batches`, which reads
  ahead): ``take(indices)`` returns the next batches, which hold exactly ``indices``."""

  def __init__(self, images, labels, chunks, what: str):
    self.chunks = iter(chunks)
    self.items = read_batches(images, labels, chunks, what)

  def take(self, index) -> tuple[tf.Tensor, tf.Tensor]:
    index, xs, ys, got = np.asarray(index), [], [], 0
    while got < len(index):
      expected = next(self.chunks)
      if not np.array_equal(expected, index[got:got + len(expected)]):
        raise ValueError("ReadAhead: batches asked out of their order")
      xb, yb = next(self.items)
      xs.append(xb)
      ys.append(yb)
      got += len(xb)
    return tf.constant(np.concatenate(xs)), tf.constant(np.concatenate(ys))


def run_chunk(step_fn: Callable, multi_fn: Optional[Callable], take: Callable,
              chunk: list[np.ndarray]) -> list[dict]:
  """Runs one train step per batch of ``chunk`` (example indices, read by ``take``:
  :meth:`Reader.take`), in order:
  each run of consecutive batches of one size (a graph has one batch shape) in one call of
  ``multi_fn`` (:func:`bnraw.core.step.make_multi_step`) when it has several, else ``step_fn``.
  Returns each step's outputs as numpy, up to and including the first non-finite one."""
  outs, start = [], 0
  while start < len(chunk):
    end = start + 1
    while end < len(chunk) and len(chunk[end]) == len(chunk[start]):
      end += 1
    outs += _run_one_size(step_fn, multi_fn, take, chunk[start:end])
    last = outs[-1]
    if not (np.all(last["finite"]) and np.all(np.isfinite(last["loss"]))):
      break
    start = end
  return outs


def _run_one_size(step_fn: Callable, multi_fn: Optional[Callable], take: Callable,
                  chunk: list[np.ndarray]) -> list[dict]:
  if len(chunk) == 1:
    return [tf.nest.map_structure(np.asarray, step_fn(*take(tf.constant(chunk[0]))))]
  x, y = take(tf.constant(np.concatenate(chunk)))
  shape = (len(chunk), len(chunk[0]))
  outs = multi_fn(tf.reshape(x, shape + tuple(x.shape[1:])),
                  tf.reshape(y, shape + tuple(y.shape[1:])))
  outs = tf.nest.map_structure(lambda t: t.numpy(), outs)
  return [tf.nest.map_structure(lambda a, j=j: a[j], outs) for j in range(len(outs["loss"]))]


def _chunk(epoch_batches: list, number: int, global_step: int, most: int,
           hook_step: Optional[int]) -> list[np.ndarray]:
  """The batches one execution runs (:func:`run_chunk`), from ``epoch_batches[number]`` on: at
  most ``most``, the hook's step alone."""
  if global_step == hook_step:
    return [epoch_batches[number]]
  end = min(number + most, len(epoch_batches))
  if hook_step is not None and global_step < hook_step < global_step + end - number:
    end = number + hook_step - global_step
  return epoch_batches[number:end]


def evaluate(model: Model, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
             mode: str, strategy: Optional[tf.distribute.Strategy] = None,
             training: bool = False) -> tuple[float, float]:
  """``model.evaluate``: inference-branch loss and accuracy, averaged over batches in order
  (``training``: the training branch without updates, see :func:`make_eval_step`).
  ``strategy``: under it, each shard normalised with its replica's copy, averaged per replica as
  Keras's SUM-on-read metrics (:class:`bnraw.core.batching.MeanTracker`)."""
  return evaluate_batches(model, images, labels, batches(np.arange(len(images)), batch_size),
                          batch_size=batch_size, mode=mode, strategy=strategy, training=training)


def evaluate_batches(model: Model, images: np.ndarray, labels: np.ndarray, chunks, *,
                     batch_size: int, mode: str,
                     strategy: Optional[tf.distribute.Strategy] = None,
                     training: bool = False, what: str = "evaluate") -> tuple[float, float]:
  """:func:`evaluate` over the batches ``chunks`` (example indices, cut at ``batch_size``), in
  that order."""
  relax = relaxed_batch(len(images), batch_size)
  step_fn = make_eval_step(model, mode=mode, relax_batch=relax, strategy=strategy,
                           training=training)

  def one_batch(xb, yb):
    out = step_fn(tf.constant(xb), tf.constant(yb))
    return out["loss"], out["correct"]

  return mean_over_batches(one_batch, chunks, (images, labels), what=what,
                           replicas=1 if strategy is None else strategy.num_replicas_in_sync)
