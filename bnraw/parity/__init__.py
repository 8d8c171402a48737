"""The compare tool: :func:`run` trains a workload's raw side and its Keras model's real ``fit``
in lockstep and writes ``compare.json``; :func:`check` refuses settings first; :func:`report` is
the text."""

from bnraw.parity.compare import check, report, run

__all__ = ["check", "report", "run"]
