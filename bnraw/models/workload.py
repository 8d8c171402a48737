"""The Workload: what every tool runs, whatever built it.

A Workload is the raw model and its optimizer, the data, the loop's settings, the strategy (None
on one device), the state in and out (both sides: the raw twin and the Keras model it mirrors)
and its record (what outputs and checkpoints store to build it again). Two builders make one:

* :func:`from_seed` -- the seed network and dataset (bnraw.models.seed) from typed configs;
* :func:`from_keras_file` -- a user's saved ``.keras`` model and its data (``--data``), through
  its raw twin (bnraw.models.twin);

and :func:`from_record` builds either again from a stored record (``--resume``). Every tool
(bnraw.training, bnraw.parity, bnraw.diagnosis, bnraw.profiling) is one function of a Workload,
so seed/user-model and one-device/replicas are properties of the workload, not forks of a tool.
Every problem with the input is a :class:`bnraw.errors.UsageError` raised while building, before
any tool writes anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Optional

import numpy as np

from bnraw import config as configs
from bnraw.config import NUM_IMAGES, DataConfig, ModelConfig, TrainConfig


@dataclasses.dataclass
class Workload:
  """What a tool trains and compares (see the module docstring).

  ``labels`` are as the raw step takes them; ``keras_labels`` as the Keras model's ``fit``
  takes them (the seed's one-hot). ``source`` names the builder ("seed" or "keras_model");
  ``tuning_key`` is what decides the step time (the auto mode's cache key, with the machine).
  """

  source: str
  model: Any  # bnraw.core.graph.Model
  optimizer: Any
  images: np.ndarray
  labels: np.ndarray
  keras_labels: np.ndarray
  train: TrainConfig
  record: dict
  tuning_key: dict
  metric_name: Optional[str] = "accuracy"
  strategy: Any = None  # a tf.distribute strategy, or None on one device
  model_config: Optional[ModelConfig] = None  # the seed's
  data_config: Optional[DataConfig] = None
  reference: str = "keras3"  # the Keras the raw side mirrors (the seed may mirror tf_keras)
  twin: Any = None  # a user's model: its bnraw.models.twin.Twin (the Keras model and pairing)
  paths: Optional[tuple[str, str]] = None  # a user's model: (model file, data file)

  @property
  def replicas(self) -> int:
    return 1 if self.strategy is None else self.strategy.num_replicas_in_sync

  @property
  def batch_norms(self) -> list:
    return self.model.batch_norms

  @property
  def bn_names(self) -> list[str]:
    return [layer.name for layer in self.model.batch_norms]

  @property
  def epsilon(self):
    """What the trace stores per layer: the seed's one epsilon, or each layer's."""
    if self.source == "seed":
      return self.model_config.epsilon
    return [layer.epsilon for layer in self.model.batch_norms]

  @property
  def width(self) -> Optional[float]:
    return self.model_config.width if self.model_config is not None else None

  def replica_mode(self) -> str:
    """The mode replicas run in: Keras's jit auto is off under a strategy, so function unless
    xla (or eager) is asked for."""
    mode = self.train.mode
    return mode if mode in ("xla", "eager") else "function"

  def recorded(self, **options) -> dict:
    """The record with a tool's options: what its output's ``config`` holds."""
    return {**self.record, "options": dict(options)}

  # -- state, both sides, in Keras's ``model.weights`` order --------------------------------

  def raw_state(self) -> dict:
    """The raw side's weights, optimizer slots, iterations (and loss scale, seed states) as
    numpy; under a strategy every replica's copy of each weight in turn."""
    if self.twin is not None:
      return self.twin.raw_state()
    from bnraw.models import keras_bridge
    return keras_bridge.get_state(self.model.variables, self.optimizer,
                                  per_replica=self.strategy is not None)

  def set_raw_state(self, state: dict) -> None:
    if self.twin is not None:
      return self.twin.set_raw_state(state)
    from bnraw.models import keras_bridge
    keras_bridge.set_state(self.model.variables, self.optimizer, state,
                           per_replica=self.strategy is not None)

  def keras_model(self, *, jit_compile: bool, batch_loss: bool = False):
    """The Keras model this workload mirrors, compiled for a run beside the raw side (its jit
    setting and ``train.steps_per_execution``; ``batch_loss``: plus the metric holding the last
    batch's loss, :func:`bnraw.models.keras_bridge.batch_loss_metric`) and holding the raw
    side's state now; under the strategy when there is one."""
    from bnraw.models import keras_bridge
    scope = self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()
    keras = keras_bridge.keras_module(self.reference)
    with scope:
      if self.twin is not None:
        kmodel = self.twin.kmodel
        metrics = [keras_bridge.batch_loss_metric(keras, lambda: kmodel._compile_loss)]
        keras_bridge.recompile(kmodel, jit_compile=jit_compile,
                               steps_per_execution=self.train.steps_per_execution,
                               metrics=metrics if batch_loss else ())
      else:
        kmodel = keras_bridge.build_model(self.model_config, self.reference)
        keras_bridge.compile_model(kmodel, self.train, jit_compile=jit_compile,
                                   reference=self.reference,
                                   metrics=[keras_bridge.batch_loss_metric(keras)]
                                   if batch_loss else ())
    self.set_keras_state(kmodel, self.raw_state())
    return kmodel

  def keras_state(self, kmodel) -> dict:
    """The Keras model's state, in :meth:`raw_state`'s layout."""
    if self.twin is not None:
      return self.twin.keras_state()
    from bnraw.models import keras_bridge
    return keras_bridge.get_state(self._keras_weights(kmodel), kmodel.optimizer,
                                  per_replica=self.strategy is not None)

  def set_keras_state(self, kmodel, state: dict) -> None:
    if self.twin is not None:
      return self.twin.set_keras_state(state)
    from bnraw.models import keras_bridge
    keras_bridge.set_state(self._keras_weights(kmodel), kmodel.optimizer, state,
                           per_replica=self.strategy is not None)

  def _keras_weights(self, kmodel) -> list:
    from bnraw.models import keras_bridge
    weights = keras_bridge.model_weights(kmodel)
    # per replica: the tf.Variables under Keras's, which hold the copies
    return [v.value for v in weights] if self.strategy is not None else weights

  def state_names(self) -> list[str]:
    """A name per entry of a state's weights (``name@r`` per replica under a strategy)."""
    names = [v.name.split(":")[0] for v in self.model.variables]
    if self.strategy is None:
      return names
    return [f"{name}@{r}" for name in names for r in range(self.replicas)]

  def save_keras(self, path: str) -> str:
    """A user's model: writes its Keras model holding the raw side's whole state (weights,
    statistics, optimizer slots and iterations, seed states) to ``path``, atomically."""
    from bnraw.models import twin as twins
    return twins.save_trained(self.twin, path)


def from_seed(data: DataConfig, model: ModelConfig, train: TrainConfig, *,
              reference: str = "keras3") -> Workload:
  """The seed network and dataset (``train.replicas`` > 1: built under the strategy of
  :func:`bnraw.models.seed.replicated`). ``reference="tf_keras"``: the raw side mirrors
  tf_keras's fused BN (var*n/(n-1) into the conv layers' moving variance)."""
  from bnraw.models import seed
  if reference == "tf_keras":
    model = dataclasses.replace(model, bessel=True, bessel_scope="conv")
  model = model.resolved()
  seed.check(data, model, train)
  strategy = seed.replicated(train) if train.replicas > 1 else None
  with strategy.scope() if strategy is not None else contextlib.nullcontext():
    parts = seed.build(data, model, train)
  labels = parts.data.labels
  return Workload("seed", parts.model, parts.optimizer, parts.data.images, labels,
                  np.eye(NUM_IMAGES, dtype=np.float32)[labels], train,
                  record=_without_options(configs.record(data, model, train)),
                  tuning_key=seed.workload(model, train), strategy=strategy,
                  model_config=model, data_config=data, reference=reference)


def from_keras_file(model_path: str, data_path: str, train: TrainConfig,
                    image_size: Optional[tuple] = None) -> Workload:
  """A user's saved model and data, through its raw twin (``train.replicas`` > 1: both built
  under the strategy, the twin's states holding every replica's copy; ``image_size``: the
  size a folder of images is read at, for a model that takes any)."""
  from bnraw import machine
  from bnraw.models import twin as twins
  twin, parts, strategy = twins.setup(model_path, data_path, train, image_size)
  files = lambda path: {"path": os.path.abspath(path), "digest": machine.file_digest(path)}
  record = {"keras_model": files(model_path), "data": files(data_path),
            "train": dataclasses.asdict(train)}
  if image_size is not None:
    record["data"]["image_size"] = list(image_size)
  return Workload("keras_model", parts.model, parts.optimizer, parts.data.images,
                  parts.data.labels, parts.data.labels, train, record=record,
                  tuning_key={"keras_model": record["keras_model"]["digest"]},
                  metric_name=twin.metric_name, strategy=strategy, twin=twin,
                  paths=(model_path, data_path))


def from_record(saved: dict, **train_changes) -> tuple[Workload, dict]:
  """The workload a stored record (:meth:`Workload.recorded`) was made from, with
  ``train_changes`` applied to its loop settings; and the record's options."""
  options = dict(saved.get("options", {}))
  if "keras_model" in saved:
    train = dataclasses.replace(configs.from_values(TrainConfig, saved["train"]), **train_changes)
    return from_keras_file(saved["keras_model"]["path"], saved["data"]["path"], train,
                           saved["data"].get("image_size")), options
  data, model, train, _ = configs.from_record(saved)
  return from_seed(data, model, dataclasses.replace(train, **train_changes)), options


def _without_options(record: dict) -> dict:
  return {k: v for k, v in record.items() if k != "options"}


__all__ = ["Workload", "from_keras_file", "from_record", "from_seed"]
