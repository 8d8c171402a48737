"""The train tool: trains a workload's raw side (the seed's, or a user's model's twin), evaluates,
writes ``summary.json`` (and the trace with ``trace=True``; ``trained.keras`` for a user's model).
A Workload in, the summary dict out."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from typing import Callable, Optional

from bnraw import outputs
from bnraw.config import HISTOGRAM_EVERY
from bnraw.errors import UsageError
from bnraw.models import workload as workloads
from bnraw.models.workload import Workload
from bnraw.progress import EpochProgress


@contextlib.contextmanager
def stop_on_signals():
  """SIGINT/SIGTERM set a flag instead of killing the run; yields ``() -> signal or None``."""
  caught = []

  def handler(signum, frame):
    if caught:  # a second signal: stop now
      raise KeyboardInterrupt
    caught.append(signum)

  previous = {}
  try:
    for sig in (signal.SIGINT, signal.SIGTERM):
      previous[sig] = signal.signal(sig, handler)
  except ValueError:  # not the main thread: no handlers, never stops early
    pass
  try:
    yield lambda: caught[0] if caught else None
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


def run(workload: Workload, *, out_dir: str, trace: bool = False, progress: bool = True,
        on_step: Optional[Callable] = None, break_at: Optional[tuple[str, int]] = None,
        break_action: Optional[Callable] = None, checkpoint_every: int = 0,
        resume: bool = False, overwrite: bool = False,
        histogram_every: int = HISTOGRAM_EVERY) -> dict:
  """Trains the workload's raw side, evaluates, writes ``summary.json`` (and the trace) into
  ``out_dir``; a user's model (``workload.source == "keras_model"``) also ``trained.keras``.

  ``break_at=(layer, step)`` stops in that layer's moving-average update at that step, which alone
  runs eagerly; the steps before it run in the run's own mode, so the values at the break are the
  traced run's (``break_action`` replaces the debugger; see bnraw.tracing.debugger). A checkpoint is
  written every ``checkpoint_every`` epochs (0: only at the end), on SIGINT/SIGTERM (after the
  current step) and at the end; ``resume`` continues the run in ``out_dir``; an earlier run there is
  refused unless ``overwrite`` (bnraw.outputs.prepare_out_dir). The summary's ``status`` is
  "complete" or "interrupted"; a non-finite step writes the summary with status "non_finite" and
  raises :class:`bnraw.core.loop.NonFiniteError`. Returns the summary dict (docs/design.md
  section 4).
  """
  if histogram_every < 1:
    raise UsageError("histogram_every", f"must be >= 1, got {histogram_every}")
  from bnraw import cluster as clusters
  cluster = clusters.from_environment()  # on many workers only the chief writes
  with lost_workers(cluster):
    return _run(workload, out_dir=out_dir, trace=trace, progress=progress, on_step=on_step,
                break_at=break_at, break_action=break_action,
                checkpoint_every=checkpoint_every, resume=resume, overwrite=overwrite,
                histogram_every=histogram_every, cluster=cluster)


def _run(workload, *, out_dir, trace, progress, on_step, break_at, break_action,
         checkpoint_every, resume, overwrite, histogram_every, cluster) -> dict:
  """:func:`run`'s body, on this process's ``cluster`` (None: one process)."""
  from bnraw import cluster as clusters
  from bnraw import machine
  from bnraw.core import autotune, batching, loop, optim, replicas, step
  from bnraw.training.checkpoint import Checkpointer, read_state
  options = dict(trace=trace, checkpoint_every=checkpoint_every,
                 break_at=list(break_at) if break_at else None)
  train, strategy = workload.train, workload.strategy
  model, optimizer = workload.model, workload.optimizer
  images, labels = workload.images, workload.labels
  metric = workload.metric_name
  writer = clusters.is_chief(cluster)
  if break_at is not None and strategy is not None:
    raise UsageError("break_at", "stops one device's step; runs with --replicas=1")
  record = workload.recorded(**options)
  names = workload.bn_names
  hook = None
  if break_at is not None:
    from bnraw.tracing.debugger import BreakAt
    if break_at[0] not in names:
      raise UsageError("break_at", f"no BN layer {break_at[0]!r}; layers: {', '.join(names)}")
    if not model.layer(break_at[0]).trainable:
      raise UsageError("break_at", f"{break_at[0]} is frozen (trainable=False): its moving "
                       "statistics are never updated, so there is no update to stop in")
    # a user's model numbers its steps on from its saved optimizer's (the seed from 0)
    first = optim.steps_run(optimizer)
    last = first + train.epochs * batching.steps_per_epoch(len(images),
                                                       train.batch_size) - 1
    if not first <= break_at[1] <= last:
      raise UsageError("break_at", f"step {break_at[1]} is not in this run (steps "
                       f"{first}..{last})")
    hook = BreakAt(*break_at, lambda: optim.steps_run(optimizer), break_action)
  saved = read_state(out_dir) if resume else None  # nothing to resume: refused here
  if writer:
    outputs.prepare_out_dir(out_dir, overwrite=overwrite, resume=resume)
  checkpointer = Checkpointer(out_dir, model, optimizer, record, strategy=strategy,
                              writer=writer)
  resume_state = checkpointer.restore() if resume else None
  if resume_state is not None:
    if train.epochs < resume_state.epoch:
      raise UsageError("epochs", f"the run has done {resume_state.epoch} epochs already; "
                       f"resume with epochs >= {resume_state.epoch}")
    done = optim.steps_run(optimizer)
    if break_at is not None and break_at[1] < done:
      raise UsageError("break_at", f"step {break_at[1]} is before the resumed run's next step "
                       f"({done})")
  # auto measures the modes on this state (and puts it back); a resumed auto run keeps the
  # mode it was measured to have, so it repeats the uninterrupted run.
  # (A run from before auto measured has no record: it ran the old static guess.)
  earlier = (saved or {}).get("resolved", {})
  chosen = train.mode
  if saved is not None and train.mode == "auto":
    chosen = earlier.get("mode") or step.resolve_mode("auto")
  if strategy is None:
    choice = machine.choose_mode(model, optimizer, images,
                                 labels, mode=chosen, batch_size=train.batch_size,
                                 trace=trace, workload=workload.tuning_key)
    mode, step_fn = choice.mode, choice.step_fn
    tuning = choice.record or (dict(earlier["autotune"], reused=True)
                               if chosen != train.mode and earlier.get("autotune") else None)
  else:  # the mode Keras compiles replicas in (bnraw.models.seed.replicated): nothing to measure
    mode, step_fn, tuning = workload.replica_mode(), None, None
  progress = progress and writer
  if progress and tuning:
    print(autotune.describe(tuning), file=sys.stderr)
  checkpointer.resolved = {"mode": mode, "autotune": tuning}
  recorders = [on_step] if on_step is not None else []
  printer = (EpochProgress(train.epochs, steps_per_epoch=batching.steps_per_epoch(
      len(images), train.batch_size)) if progress else None)
  with contextlib.ExitStack() as stack:
    if trace and writer:  # every worker traces in its step (gathers are collectives)
      from bnraw.tracing.store import TRACE_FILE, Trace, TraceRecorder
      from bnraw.tracing.tensorboard import TensorBoardWriter
      recorder = TraceRecorder(names, workload.epsilon)
      if resume_state is not None and os.path.exists(os.path.join(out_dir, TRACE_FILE)):
        recorder.extend_from(Trace.load(out_dir), optim.steps_run(optimizer))
      board = stack.enter_context(TensorBoardWriter(out_dir, names, workload.epsilon,
                                                    histogram_every))
      recorders += [recorder, board.step]

    def save_trace():
      if trace and writer:
        recorder.save(os.path.join(out_dir, TRACE_FILE))

    def on_epoch(epoch, history):
      if printer:
        printer(epoch, history)
      if checkpoint_every and (epoch + 1) % checkpoint_every == 0 and epoch + 1 < train.epochs:
        save_trace()
        checkpointer.save(history.state, "running")

    start = time.perf_counter()
    stopped = stack.enter_context(stop_on_signals())
    if cluster is None:
      should_stop = lambda: stopped() is not None
    else:  # every worker stops after the same step: a signal to any one stops them all
      should_stop = lambda: replicas.any_worker(strategy, stopped() is not None)
    history = loop.fit(model, optimizer, images, labels,
                       batch_size=train.batch_size, epochs=train.epochs, seed=train.seed,
                       mode=mode, trace=trace,
                       on_step=(lambda r: [f(r) for f in recorders]) if recorders else None,
                       on_epoch=on_epoch, hook=hook, hook_step=break_at and break_at[1],
                       resume=resume_state, should_stop=should_stop,
                       step_fn=step_fn, steps_per_execution=train.steps_per_execution,
                       strategy=strategy, sorted_shards=train.shards == "sorted")
    summary = {
        "config": record,
        "status": history.status,
        "complete": history.status == "complete",
        "resolved": {"width": workload.width, "mode": mode},
        **({"replicas": replicas_summary(model, strategy)} if strategy else {}),
        "autotune": tuning,
        "environment": outputs.environment(),
        "parameters": model.count_parameters(),
        "history": {"loss": history.loss,
                    "accuracy": history.accuracy if metric else [None] * len(history.loss)},
        "metric": metric,
        "evaluate": {"loss": None, "accuracy": None},
        "steps_done": optim.steps_run(optimizer),
        "train_seconds": time.perf_counter() - start,
    }
    if isinstance(optimizer, optim.LossScale) and history.status != "non_finite":
      # over the whole run, resumes included (a non-finite step's own skip is not a step done)
      summary["loss_scaling"] = {
          "initial_scale": optimizer.initial_scale,
          "final_scale": float(optimizer.dynamic_scale.numpy()),
          "skipped_steps": int(optimizer.skipped_steps.numpy())}
    if history.status == "complete":
      data_and_batch = dict(images=images, labels=labels,
                            batch_size=train.batch_size, mode=mode)
      # (under a strategy: each shard with its replica's copy)
      eval_loss, eval_accuracy = loop.evaluate(model, **data_and_batch, strategy=strategy)
      summary["evaluate"] = {"loss": eval_loss, "accuracy": eval_accuracy if metric else None}
      if workload.twin is not None and writer:  # the trained twin as the user's own model
        summary["trained_model"] = workload.save_keras(os.path.join(out_dir, "trained.keras"))
      if trace and writer:
        board.scalars(summary["steps_done"], {"evaluate/loss": eval_loss,
                                              "evaluate/accuracy": eval_accuracy})
    if history.status == "non_finite":
      summary["non_finite"] = {"step": history.error.step, "where": history.error.where}
      summary["steps_done"] = history.error.step  # the failing step's update is not kept
    else:  # never checkpoint non-finite weights: the last good checkpoint stays the latest
      checkpointer.save(history.state, history.status)
    if history.status == "interrupted":
      summary["signal"] = stopped()
    save_trace()
  if writer:
    outputs.write_json(os.path.join(out_dir, "summary.json"), summary)
  if history.status == "non_finite":
    raise history.error
  return summary


@contextlib.contextmanager
def lost_workers(cluster):
  """On a worker of ``cluster``: a collective that fails because a peer is gone (TensorFlow
  aborts them when a peer's connection drops, its heartbeats stop, or MWMS's health check,
  every 30 s, finds it down) becomes :class:`bnraw.cluster.LostWorker`, naming the peer. Other
  errors pass through. Without a cluster: nothing."""
  if cluster is None:
    yield
    return
  import tensorflow as tf
  from bnraw import cluster as clusters
  try:
    yield
  except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
          tf.errors.CancelledError, tf.errors.AbortedError, tf.errors.InternalError) as e:
    if not clusters.names_a_peer(str(e)):
      raise
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", str(e)).strip()
    raise clusters.LostWorker(f"lost {clusters.lost_peer(cluster, str(e))}: "
                              f"{(text.splitlines() or [''])[0][:160]}") from None


def replicas_summary(model, strategy) -> dict:
  """The replicas, and per BN layer how far the copies of its moving statistics spread
  (bnraw.core.replicas.copy_spread of the mean and the variance; 0 with synchronized BN)."""
  from bnraw.core import replicas
  return {"count": strategy.num_replicas_in_sync,
          # this process's devices (on many workers: the chief's; the others' hold the rest)
          "local_devices": list(strategy.extended.worker_devices), "saved_copy": "replica 0",
          "moving_statistics_rel_spread": {
              layer.name: [replicas.copy_spread(mean), replicas.copy_spread(variance)]
              for layer, (mean, variance) in zip(model.batch_norms,
                                                 replicas.moving_copies(strategy, model))}}


def resume(out_dir: str, *, epochs: Optional[int] = None, **kwargs) -> dict:
  """Continues the run in ``out_dir`` with the settings it was made with (by the command line or
  by :func:`run`), optionally for more ``epochs``; other keywords go to :func:`run`."""
  from bnraw.training.checkpoint import read_state
  changes = {} if epochs is None else {"epochs": epochs}
  workload, options = workloads.from_record(read_state(out_dir)["config"], **changes)
  options = {k: v for k, v in options.items() if k in ("trace", "checkpoint_every")}
  return run(workload, out_dir=out_dir, resume=True, **{**options, **kwargs})


def report(summary: dict) -> str:
  """What fit printed last and what evaluate gives."""
  history, evaluate = summary["history"], summary["evaluate"]
  metric = summary.get("metric", "accuracy")
  column = lambda value: f"  {metric} {value:.4f}" if metric else ""
  text = (f"fit loss (last epoch) {history['loss'][-1]:.6g}{column(history['accuracy'][-1])}\n"
          f"evaluate loss         {evaluate['loss']:.6g}{column(evaluate['accuracy'])}")
  if "trained_model" in summary:
    text += f"\ntrained model: {summary['trained_model']} (keras.models.load_model)"
  scaling = summary.get("loss_scaling")
  if scaling:
    text += (f"\nloss scaling: {scaling['skipped_steps']} of {summary['steps_done']} steps "
             f"skipped (weights kept, BN statistics moved); scale {scaling['initial_scale']:g} "
             f"-> {scaling['final_scale']:g}")
  return text
