"""Stopping inside one BN layer's moving-average update, at one step, in the Python debugger.

``Model.__call__(training=True, hook=...)`` hands the hook to every BN layer, which calls it
eagerly just before its training writer assigns the moving statistics
(``BatchNorm._update_moving_statistics`` in bnraw/core/layers.py). :class:`BreakAt`
is such a hook: at the chosen layer and step it runs ``action`` -- by default pdb, opened in the
frame of ``_update_moving_statistics`` with ``layer``, ``moving`` (before) and ``batch`` in scope;
``n`` steps through the two assignments. Only that step runs eagerly (``loop.fit``'s
``hook_step``); the others run in the run's own mode.
"""

from __future__ import annotations

import pdb
import sys
from typing import Callable, Optional


def writer_frame():
  """The innermost frame of ``BatchNorm._update_moving_statistics`` on the current stack."""
  from bnraw.core.layers import BatchNorm
  frame = sys._getframe(1)
  while frame is not None and frame.f_code is not BatchNorm._update_moving_statistics.__code__:
    frame = frame.f_back
  if frame is None:
    raise RuntimeError("writer_frame() called outside a BN moving-statistics update")
  return frame


class BreakAt:
  """A BN update hook that runs ``action(layer, moving, batch)`` once, at ``layer`` and ``step``
  (0-based optimizer step: ``steps_run()`` before the update, e.g.
  ``lambda: bnraw.core.optim.steps_run(optimizer)``, which counts loss-scale-skipped steps)."""

  def __init__(self, layer: str, step: int, steps_run: Callable[[], int],
               action: Optional[Callable] = None):
    self.layer, self.step, self.steps_run = layer, step, steps_run
    self.action = action or self.debugger
    self.hits = 0

  @staticmethod
  def debugger(layer, moving, batch):
    """pdb, opened in the frame of the training writer itself (not in this hook)."""
    print(f"bnraw: stopped before {layer.name}'s moving-average update "
          f"(momentum {layer.momentum:g}). In scope: layer, moving (before), batch "
          f"(this batch's mean/variance, Bessel factor applied if any). 'n' steps through the "
          f"assignments, 'c' continues.")
    pdb.Pdb().set_trace(writer_frame())

  def __call__(self, layer, moving, batch) -> None:
    if layer.name == self.layer and self.steps_run() == self.step:
      self.hits += 1
      self.action(layer, moving, batch)
