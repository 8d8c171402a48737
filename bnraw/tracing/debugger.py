"""Stopping inside one BN layer's moving-average update, at one step, in the Python debugger.

``Model.__call__(training=True, hook=...)`` hands the hook to every BN layer, which calls it
eagerly just before its training writer assigns the moving statistics
(``BatchNorm._update_moving_statistics`` in bnraw/core/layers.py). :class:`BreakAt`
is such a hook: at the chosen layer and step it runs ``action`` -- by default ``pdb.set_trace``,
which stops with ``layer``, ``moving`` and ``batch`` in scope; step with ``n`` twice to return
into ``_update_moving_statistics`` and watch the two assignments happen.
"""

from __future__ import annotations

import pdb
from typing import Callable, Optional

import tensorflow as tf


class BreakAt:
  """A BN update hook that runs ``action(layer, moving, batch)`` once, at ``layer`` and ``step``
  (0-based optimizer step, read from ``iterations`` before the update)."""

  def __init__(self, layer: str, step: int, iterations: tf.Variable,
               action: Optional[Callable] = None):
    self.layer, self.step, self.iterations = layer, step, iterations
    self.action = action or self.debugger
    self.hits = 0

  @staticmethod
  def debugger(layer, moving, batch):
    print(f"bnraw: stopped before {layer.name}'s moving-average update "
          f"(momentum {layer.momentum:g}). In scope: layer, moving (before), batch "
          f"(this batch's mean/variance). 'n' twice steps into the assignments, 'c' continues.")
    pdb.Pdb().set_trace(__import__("sys")._getframe(1))

  def __call__(self, layer, moving, batch) -> None:
    if layer.name == self.layer and int(self.iterations.numpy()) == self.step:
      self.hits += 1
      self.action(layer, moving, batch)
