"""bnraw: BatchNorm training written out by hand in TensorFlow 2, bit-identical to Keras fit.

Why does ``model.evaluate`` on the training data disagree with what ``model.fit`` printed?
bnraw reproduces the Keras path op for op and splits that gap into named causes.

Public names are imported lazily so that ``import bnraw`` (and every script's flag parsing) does
not pay for importing TensorFlow until something needs it.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "DataConfig": "bnraw.config", "ModelConfig": "bnraw.config", "TrainConfig": "bnraw.config",
    "UsageError": "bnraw.errors",
    "BATCH": "bnraw.core.layers", "BatchNorm": "bnraw.core.layers",
    "Model": "bnraw.core.graph",
    "History": "bnraw.core.loop", "NonFiniteError": "bnraw.core.loop",
    "evaluate": "bnraw.core.loop", "fit": "bnraw.core.loop",
    "make_eval_step": "bnraw.core.step", "make_train_step": "bnraw.core.step",
    "resolve_mode": "bnraw.core.step",
    "Adam": "bnraw.core.optim", "SGD": "bnraw.core.optim", "make_optimizer": "bnraw.core.optim",
    "make_dataset": "bnraw.models.seed", "seed_network": "bnraw.models.seed",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
  if name in _PUBLIC:
    return getattr(importlib.import_module(_PUBLIC[name]), name)
  raise AttributeError(f"module 'bnraw' has no attribute {name!r}")
