"""The train tool: :func:`run` trains the raw seed network and writes ``summary.json``;
:func:`resume` continues a stored run; :func:`report` is the text; checkpoints live in
:mod:`bnraw.training.checkpoint`."""

from bnraw.training.tool import report, resume, run

__all__ = ["report", "resume", "run"]
