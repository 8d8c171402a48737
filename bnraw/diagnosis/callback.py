"""Where users already are: a Keras callback that diagnoses their own ``model.fit``.

  model.fit(x, y, epochs=50, callbacks=[BNDiagnosis(x[:512], y[:512], every=5,
                                                                   log_dir="runs/bn")])

Every ``every`` epochs, on the sample ``(x, y)`` the user chooses, it records the parts of
``evaluate - fit`` that need no step-by-step history (evaluate, the training branch at the
final weights, PreciseBN, the per-layer split of the moving-statistics part, frozen BN layers
named) into the same TensorBoard dashboard as ``bnraw-diagnose`` (:mod:`bnraw.diagnosis.board`);
at the end of training it prints the report with the gap to what fit printed, and the
``weight_update`` part that fit's logs allow.

It never touches the model being trained: the diagnoses run on a clone, made once when training
begins (with Python's ``random`` state restored: Keras seeds new layers from it) and given a copy
of the weights and moving statistics each time (running the user's model in training mode would
advance its Dropout seed generators and its moving statistics), so training stays bit-identical
with and without the callback. In the clone, Dropout and noise layers are identities, so the
training-branch parts measure BatchNorm alone. Frozen BN layers (``trainable=False``) keep their
statistics (they contribute nothing) and are named. Its cost is a few passes over the sample per
diagnosis, outside the training step; ``history[i]["seconds"]`` records it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

import keras
import numpy as np

from bnraw.models.keras_bridge import keras_bn_layers, quiet_clone


class BNDiagnosis(keras.callbacks.Callback):
  """Diagnoses BatchNorm's fit/evaluate gap during ``model.fit``; see the module docstring.

  Args:
    x, y: the sample to diagnose on (arrays in the form the model's compiled loss takes), or
      ``x`` a ``tf.data.Dataset`` of ``(x, y)`` elements, batched or not, and no ``y``.
    every: diagnose every K epochs (and at the end of training).
    log_dir: TensorBoard directory (None: no TensorBoard output).
    batch_size: batches for the diagnosis passes (as ``evaluate`` would take them).
    precise_bn_batches: PreciseBN's statistics from the sample's first K batches (None: all).
    stream: where the final report goes (None: not printed).
  """

  def __init__(self, x, y=None, *, every: int = 1, log_dir: Optional[str] = None,
               batch_size: int = 32, precise_bn_batches: Optional[int] = None,
               stream=sys.stdout):
    super().__init__()
    if every < 1:
      raise ValueError(f"every must be >= 1, got {every}")
    if precise_bn_batches is not None and precise_bn_batches < 1:
      raise ValueError(f"precise_bn_batches must be >= 1, got {precise_bn_batches}")
    self.precise_bn_batches = precise_bn_batches
    self._dataset = x if y is None else None  # read when the model is known
    if self._dataset is not None:
      import tensorflow as tf
      if not isinstance(x, tf.data.Dataset):
        raise ValueError("BNDiagnosis: give arrays x and y, or a tf.data.Dataset of (x, y) "
                         f"as x alone, not a {type(x).__name__} without y")
    else:
      self.x, self.y = np.asarray(x, np.float32), np.asarray(y)
    self.every, self.log_dir, self.batch_size, self.stream = every, log_dir, batch_size, stream
    self.history: list[dict] = []  # {"epoch", "losses", "attribution", "frozen", "seconds"}
    self.result: Optional[dict] = None
    self._board = None
    self._clone = None
    self._last_logs: dict = {}
    self._epoch = 0

  def on_train_begin(self, logs=None):
    self._clone = self._check_and_clone()  # before anything is written
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

  def _check_and_clone(self):
    """The model and sample checked (one ValueError naming the problem), and the clone."""
    model = self.model
    if getattr(model, "loss", None) is None:
      raise ValueError("BNDiagnosis: the model has no compiled loss")
    if len(model.outputs) != 1:
      raise ValueError(f"BNDiagnosis: the model has {len(model.outputs)} outputs; "
                       "single-output models only")
    if len(model.inputs) != 1:
      raise ValueError(f"BNDiagnosis: the model takes {len(model.inputs)} inputs; single-input "
                       "models only")
    if self._dataset is not None:
      from bnraw.errors import UsageError
      from bnraw.models.data import dataset_arrays
      try:
        x, y = dataset_arrays(self._dataset, model, "the dataset")
      except UsageError as e:
        raise ValueError(f"BNDiagnosis: {e.problem}") from None
      self.x, self.y = x.astype(np.float32), y
    if not len(self.x) or len(self.x) != len(self.y):
      raise ValueError(f"BNDiagnosis: x has {len(self.x)} examples and y {len(self.y)}; need "
                       "the same, > 0")
    if not keras_bn_layers(model):  # also refuses BN inside a nested model
      raise ValueError("BNDiagnosis: the model has no BatchNormalization layer")
    return quiet_clone(model)

  def _diagnose(self) -> None:
    from bnraw.diagnosis import board
    from bnraw.diagnosis.decompose import diagnose_keras
    began = time.perf_counter()
    clone = self._clone
    clone.set_weights(self.model.get_weights())  # moving statistics included
    logs = self._last_logs
    result = diagnose_keras(clone, self.x, self.y, batch_size=min(self.batch_size, len(self.x)),
                            fit_loss=logs.get("loss"),
                            precise_bn_batches=self.precise_bn_batches,
                            last_order=np.random.default_rng(0).permutation(len(self.x)))
    if result["metric"]:  # what fit logged for that same metric, under its name
      result["accuracy"]["fit"] = logs.get(result["metric"]["name"])
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
