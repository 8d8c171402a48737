"""bnraw: the seed's BatchNorm network and training, written out by hand in TensorFlow 2.

Why does ``model.evaluate`` on the training data disagree with what ``model.fit`` printed?
bnraw reproduces the Keras path op for op and splits that gap into named causes.

Public names are imported lazily so that ``import bnraw`` (and every script's flag parsing) does
not pay for importing TensorFlow until something needs it.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "DataConfig": "bnraw.config", "ModelConfig": "bnraw.config", "TrainConfig": "bnraw.config",
    "Dataset": "bnraw.data", "make_dataset": "bnraw.data",
    "UsageError": "bnraw.errors",
    "History": "bnraw.loop", "evaluate": "bnraw.loop", "fit": "bnraw.loop",
    "make_eval_step": "bnraw.loop", "make_train_step": "bnraw.loop", "resolve_mode": "bnraw.loop",
    "SeedNet": "bnraw.model",
    "Adam": "bnraw.optim", "SGD": "bnraw.optim", "make_optimizer": "bnraw.optim",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
  if name in _PUBLIC:
    return getattr(importlib.import_module(_PUBLIC[name]), name)
  raise AttributeError(f"module 'bnraw' has no attribute {name!r}")
