"""Checkpoints that let a run stop anywhere and continue bit for bit.

A checkpoint is a ``tf.train.Checkpoint`` (every model variable by its Keras-style name and the
optimizer's whole state, :func:`bnraw.core.optim.named_state`: slots, iteration count, and with
loss scaling the scale, its counter and the skipped-step count), numbered by the steps run
(skipped ones included) and written by a ``CheckpointManager`` under ``{out_dir}/checkpoints``, plus ``run_state.json`` beside it: the loop's
:class:`bnraw.core.loop.FitState` (epoch, position in the epoch, running means, the shuffling
generator's state), the run's configuration and the checkpoint it belongs to. Both are written
complete-or-absent; the JSON last, so it never points at a checkpoint that is not there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tensorflow as tf

from bnraw import config as configs
from bnraw import outputs
from bnraw.core import optim
from bnraw.core.loop import FitState
from bnraw.errors import UsageError

STATE_FILE = "run_state.json"
# Settings that may change between a run and its resumption (section, name).
# steps_per_execution: K steps per call are bit-identical to K calls (loop_test checks it).
MAY_DIFFER = {("train", "epochs"), ("train", "mode"), ("train", "steps_per_execution"),
              ("options", "checkpoint_every"), ("options", "break_at")}


def _checkpoint(model, optimizer, extra=()) -> tf.train.Checkpoint:
  variables = [*model.variables, *getattr(model, "state_variables", ()), *extra]
  named = {v.name.split(":")[0].replace("/", "."): v for v in variables}
  if len(named) != len(variables):  # never let one variable hide another in a checkpoint
    raise UsageError("keras_model", "two variables share a name, so a checkpoint cannot hold "
                     "both (rename one of the layers)")
  return tf.train.Checkpoint(**named, **optim.named_state(optimizer))


class Checkpointer:
  """Saves and restores one run's model, optimizer and loop state in ``out_dir``."""

  def __init__(self, out_dir: str, model, optimizer, config: dict, max_to_keep: int = 2,
               strategy=None, writer: bool = True):
    self.out_dir = out_dir
    self.config = config
    # on replicas: every replica's copy of the moving statistics too (bnraw.core.replicas)
    self.copies = None
    if strategy is not None and strategy.num_replicas_in_sync > 1:
      from bnraw.core.replicas import CopyStore, moving_variables
      self.copies = CopyStore(strategy, moving_variables(model))
    self.checkpoint = _checkpoint(model, optimizer, self.copies.variables if self.copies else ())
    self.optimizer = optimizer
    self.resolved: dict = {}  # what the run decided (its mode, the autotune record): kept on resume
    # on many workers only the chief writes (every worker gathers the replicas' copies)
    self.manager = (tf.train.CheckpointManager(self.checkpoint,
                                               os.path.join(out_dir, "checkpoints"),
                                               max_to_keep=max_to_keep) if writer else None)

  def save(self, state: FitState, status: str) -> str:
    if self.copies is not None:
      self.copies.gather()
    if self.manager is None:
      return ""
    path = self.manager.save(checkpoint_number=optim.steps_run(self.optimizer))
    outputs.write_json(os.path.join(self.out_dir, STATE_FILE),
                       {"checkpoint": os.path.basename(path), "status": status,
                        "config": self.config, "resolved": self.resolved,
                        "state": dataclasses.asdict(state)})
    return path

  def restore(self) -> FitState:
    """Loads the latest checkpoint; refuses one made with other settings."""
    saved = read_state(self.out_dir)
    check_config(saved["config"], self.config)
    path = os.path.join(self.out_dir, "checkpoints", saved["checkpoint"])
    self.checkpoint.restore(path).assert_existing_objects_matched()
    if self.copies is not None:
      self.copies.scatter()
    return FitState(**saved["state"])


def read_state(out_dir: str) -> dict:
  path = os.path.join(out_dir, STATE_FILE)
  if not os.path.isfile(path):
    raise UsageError("resume", f"no {STATE_FILE} in {out_dir}: nothing to resume")
  with open(path) as f:
    return json.load(f)


def check_config(saved: dict, current: dict) -> None:
  """Raises a UsageError naming every setting (``section.name``) whose value differs from the
  saved run's; both are :func:`bnraw.config.record` dicts."""
  current = json.loads(json.dumps(outputs.jsonable(current)))  # as it would be stored
  if "keras_model" not in saved:  # a user's model's run records its files, not seed configs
    saved = configs.normalized(saved)
  saved = json.loads(json.dumps(outputs.jsonable(saved)))
  differing = []
  for section in sorted(set(saved) | set(current)):
    old, new = saved.get(section, {}), current.get(section, {})
    for name in sorted(set(old) | set(new)):
      if (section, name) not in MAY_DIFFER and old.get(name) != new.get(name):
        differing.append(f"{section}.{name} (run: {old.get(name)!r}, now: {new.get(name)!r})")
  if differing:
    raise UsageError("resume", "this run was made with other settings: " + ", ".join(differing))
