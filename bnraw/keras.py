"""Where users already are: a Keras callback that diagnoses their own ``model.fit``.

  model.fit(x, y, epochs=50, callbacks=[bnraw.keras.BNDiagnosis(x[:512], y[:512], every=5,
                                                                   log_dir="runs/bn")])

Every ``every`` epochs, on the sample ``(x, y)`` the user chooses, it records the parts of
``evaluate - fit`` that need no step-by-step history (evaluate, the training branch at the
final weights, PreciseBN, the per-layer split of the moving-statistics part, frozen BN layers
named) into the same TensorBoard dashboard as ``bnraw-diagnose`` (:mod:`bnraw.diagnosis.board`);
at the end of training it prints the report with the gap to what fit printed, and the
``weight_update`` part that fit's logs allow.

It never touches the model being trained: each diagnosis runs on a clone that receives a copy of
the weights and moving statistics (running the user's model in training mode would advance its
Dropout seed generators and its moving statistics), so training stays bit-identical with and
without the callback. Its cost is the clone plus a few passes over the sample, outside the
training step; ``seconds`` records it per diagnosis.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

import keras
import numpy as np


class BNDiagnosis(keras.callbacks.Callback):
  """Diagnoses BatchNorm's fit/evaluate gap during ``model.fit``; see the module docstring.

  Args:
    x, y: the sample to diagnose on (arrays in the form the model's compiled loss takes).
    every: diagnose every K epochs (and at the end of training).
    log_dir: TensorBoard directory (None: no TensorBoard output).
    batch_size: batches for the diagnosis passes (as ``evaluate`` would take them).
    stream: where the final report goes (None: not printed).
  """

  def __init__(self, x, y, *, every: int = 1, log_dir: Optional[str] = None,
               batch_size: int = 32, stream=sys.stdout):
    super().__init__()
    if every < 1:
      raise ValueError(f"every must be >= 1, got {every}")
    self.x, self.y = np.asarray(x, np.float32), np.asarray(y)
    self.every, self.log_dir, self.batch_size, self.stream = every, log_dir, batch_size, stream
    self.history: list[dict] = []  # {"epoch", "losses", "attribution", "frozen", "seconds"}
    self.result: Optional[dict] = None
    self._board = None
    self._last_logs: dict = {}
    self._epoch = 0

  def on_train_begin(self, logs=None):
    if self.log_dir:
      from bnraw.tracing.tensorboard import TensorBoardWriter
      os.makedirs(self.log_dir, exist_ok=True)
      self._board = TensorBoardWriter("", [], 0.0, log_dir=self.log_dir)

  def on_epoch_end(self, epoch, logs=None):
    self._last_logs, self._epoch = dict(logs or {}), epoch + 1
    if self._epoch % self.every == 0:
      self._diagnose()

  def on_train_end(self, logs=None):
    try:
      if self._epoch and (not self.history or self.history[-1]["epoch"] != self._epoch):
        self._diagnose()
      if self.result is not None and self.stream is not None:
        from bnraw.diagnosis.explain import report
        print(report(self.result, f"bnraw diagnosis of {self.model.name} after "
                                  f"{self._epoch} epochs (fit's logs: last epoch's mean)"),
              file=self.stream)
    finally:
      if self._board is not None:
        self._board.close()

  def _clone(self):
    clone = keras.models.clone_model(self.model)
    clone.set_weights(self.model.get_weights())  # moving statistics included
    clone.compile(loss=self.model.loss)
    return clone

  def _diagnose(self) -> None:
    from bnraw.diagnosis import board
    from bnraw.diagnosis.decompose import diagnose_keras
    from bnraw.diagnosis.precise_bn import keras_bn_layers
    began = time.perf_counter()
    clone = self._clone()
    logs = self._last_logs
    result = diagnose_keras(clone, self.x, self.y, batch_size=min(self.batch_size, len(self.x)),
                            fit_loss=logs.get("loss"),
                            fit_accuracy=logs.get("accuracy", logs.get("sparse_categorical_"
                                                                       "accuracy")),
                            last_order=np.random.default_rng(0).permutation(len(self.x)))
    result.pop("precise_statistics")
    layers = keras_bn_layers(clone)
    result["frozen"] = [layer.name for layer in layers if not layer.trainable]
    self.result = result
    self.history.append({"epoch": self._epoch, "losses": result["losses"],
                         "attribution": result["attribution"], "frozen": result["frozen"],
                         "seconds": time.perf_counter() - began})
    if self._board is not None:
      board.write(self._board, result, epoch=self._epoch,
                  title=f"{self.model.name}, epoch {self._epoch}",
                  amplification=board.amplification(layers))
