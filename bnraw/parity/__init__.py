"""The compare tool: :func:`run` trains the raw path and real Keras ``fit`` in lockstep and
writes ``compare.json``; :func:`report` is the text."""

from bnraw.parity.compare import report, run, run_keras_model

__all__ = ["report", "run", "run_keras_model"]
