"""The diagnose tool: :func:`run` (the seed, trained raw or with Keras fit) and
:func:`run_keras_model` (a user's trained model) split ``evaluate - fit`` into named causes
(:mod:`~bnraw.diagnosis.decompose`, with :mod:`~bnraw.diagnosis.precise_bn`) and write
``diagnosis.json``; :func:`report` is the text."""

from bnraw.diagnosis.explain import report
from bnraw.diagnosis.tool import run, run_keras_model, run_twin

__all__ = ["report", "run", "run_keras_model", "run_twin"]
