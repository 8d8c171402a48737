"""The train tool: :func:`run` trains the raw seed network and writes ``summary.json``;
:func:`resume` continues a stored run; checkpoints live in :mod:`bnraw.training.checkpoint`."""

from bnraw.training.run import resume, run

__all__ = ["resume", "run"]
