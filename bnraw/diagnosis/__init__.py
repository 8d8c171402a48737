"""The diagnose tool: :func:`run` (a workload: the seed, trained raw or with Keras fit, or a user
model's raw twin, on one device or replicas) and :func:`run_saved` (a user's trained model as it
is, no training) split ``evaluate - fit`` into named causes (:mod:`~bnraw.diagnosis.decompose`,
with :mod:`~bnraw.diagnosis.precise_bn`) and write ``diagnosis.json``; :func:`report` is the
text."""

from bnraw.diagnosis.explain import report
from bnraw.diagnosis.tool import run, run_saved

__all__ = ["report", "run", "run_saved"]
