"""The profile tool: :func:`run` times the raw step per mode against Keras ``fit`` and writes
``profile.json``; :func:`report` is the table. FLOPs and the matmul ceiling live beside it."""

from bnraw.profiling.bench import report, report_keras_model, run, run_keras_model

__all__ = ["report", "report_keras_model", "run", "run_keras_model"]
