"""bnraw: the seed's BatchNorm network and training, written out by hand in TensorFlow 2.

Why does ``model.evaluate`` on the training data disagree with what ``model.fit`` printed?
bnraw reproduces the Keras path op for op and splits that gap into named causes.
"""

from bnraw.config import DataConfig, ModelConfig, TrainConfig
from bnraw.data import Dataset, make_dataset
from bnraw.errors import UsageError
from bnraw.loop import History, evaluate, fit, make_eval_step, make_train_step, resolve_mode
from bnraw.model import SeedNet
from bnraw.optim import SGD, Adam, make_optimizer

__version__ = "0.1.0"
