"""A user's Keras model and its raw twin: conversion and state transfer both ways.

:func:`convert` walks the model's graph in Keras's execution order (``_nodes_by_depth``, deepest
first, as ``Functional._run_through_graph``), inlines nested Sequential and functional models
(their layers named by path, ``backbone/bn_1``), and turns every layer into its raw twin: BN here
(:class:`bnraw.core.layers.BatchNorm` with the layer's axis, center, scale, synchronized and
trainable settings), every other layer by :func:`bnraw.models.twin_layers.raw_layer`. Each raw
variable starts as a copy of its Keras variable; :class:`Twin` keeps the pairing, so state moves
by position, checked by shape: ``model.weights``, the optimizer's slots, its iteration count and
loss scale, and every Dropout's seed-generator state.

The loss, the first metric and the optimizer come from the model's compile: see
:mod:`bnraw.models.twin_loss` and :mod:`bnraw.models.twin_optimizer`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import tensorflow as tf

from bnraw.core import ops
from bnraw.core.batching import streamed
from bnraw.core.graph import Model, Node
from bnraw.core.layers import BatchNorm
from bnraw.errors import UsageError

SUPPORTED = "docs/your-model.md, 'Supported layers and settings'"
BN_CLASSES = ("BatchNormalization",)
MODEL_CLASSES = ("Functional", "Sequential")
# A final activation whose input Keras's cross-entropy can recover as logits (_keras_logits).
LOGIT_ACTIVATIONS = ("softmax", "sigmoid")


def _refuse(layer, problem: str):
  raise UsageError("keras_model", f"layer {layer.name!r} ({type(layer).__name__}) {problem}; "
                   f"supported layers and settings: {SUPPORTED}")


def raw_batch_norm(layer, name: str) -> BatchNorm:
  """The raw twin of a Keras ``BatchNormalization`` layer, its values copied."""
  config = layer.get_config()
  if config.get("renorm"):
    _refuse(layer, "uses renorm")
  if not isinstance(config["axis"], int):
    _refuse(layer, f"normalises over several axes {config['axis']}")
  raw = BatchNorm(name, int(layer.moving_mean.shape[0]), momentum=float(config["momentum"]),
                  epsilon=float(config["epsilon"]), trainable=layer.trainable,
                  axis=int(config["axis"]), center=config["center"], scale=config["scale"],
                  synchronized=bool(config.get("synchronized", False)),
                  compute_dtype=layer.compute_dtype)
  for target, source in zip(raw.variables, layer.weights):
    target.assign(source.numpy())
  return raw


def penalty(regularizer) -> Callable[[tf.Tensor], tf.Tensor]:
  """A Keras kernel/bias regularizer (L1, L2, L1L2) as a raw function of the variable."""
  kind = type(regularizer).__name__
  if kind not in ("L1", "L2", "L1L2"):
    raise UsageError("keras_model", f"regularizer {kind} is not supported (L1, L2, L1L2 are)")
  config = regularizer.get_config()
  if kind == "L2":
    return lambda v: ops.l2_penalty(v, config["l2"])
  if kind == "L1":
    return lambda v: ops.l1_penalty(v, config["l1"])
  if kind == "L1L2":
    return lambda v: ops.l1_l2_penalty(v, config["l1"], config["l2"])
  raise UsageError("keras_model", f"regularizer {kind} is not supported (L1, L2, L1L2 are)")


def _graph_of(model):
  """The functional graph behind a model (a Sequential's own ``_functional``), or None. A
  subclass is refused: its own ``call`` or ``train_step`` could do anything."""
  kind = type(model).__name__
  if kind not in MODEL_CLASSES or not type(model).__module__.startswith("keras."):
    _refuse(model, "is a subclassed model; bnraw converts Sequential and functional models")
  if kind == "Sequential":
    return getattr(model, "_functional", None)
  return model if hasattr(model, "_nodes_by_depth") else None


@dataclasses.dataclass
class _Walk:
  nodes: list = dataclasses.field(default_factory=list)
  pairs: list = dataclasses.field(default_factory=list)  # (keras variable, raw variable)
  seeds: list = dataclasses.field(default_factory=list)  # (keras state, raw state)
  seen: set = dataclasses.field(default_factory=set)
  names: set = dataclasses.field(default_factory=set)  # node names (paths) so far


def _claim(name: str, walk: _Walk) -> None:
  """Records a node's name (its path), refusing a second node of the same name."""
  if name in walk.names:
    raise UsageError("keras_model", f"two layers or operations are named {name!r}; bnraw "
                     "needs unique names (rename one)")
  walk.names.add(name)


def _inline(model, input_ids: list[int], prefix: str, walk: _Walk) -> int:
  """Appends ``model``'s nodes to ``walk`` reading ``input_ids``; returns its output's id."""
  from bnraw.models import twin_layers
  graph = _graph_of(model)
  if graph is None:
    _refuse(model, "was never built on an input (call it on keras.Input first)")
  if len(graph.inputs) != len(input_ids) or len(graph.outputs) != 1:
    _refuse(model, f"has {len(graph.inputs)} inputs and {len(graph.outputs)} outputs; "
            "bnraw converts models with one of each")
  import keras
  ids = {id(t): i for t, i in zip(graph.inputs, input_ids)}
  for depth in sorted(graph._nodes_by_depth, reverse=True):
    for node in graph._nodes_by_depth[depth]:
      layer = node.operation
      if not layer or node.is_input:
        continue
      name = prefix + layer.name
      inputs = tuple(ids[id(t)] for t in node.input_tensors)
      if not isinstance(layer, keras.layers.Layer):  # x + 3.0, keras.ops.mean(x), ...
        _claim(name, walk)
        walk.nodes.append(Node(twin_layers.raw_operation(layer, node, name), inputs))
        ids[id(node.outputs[0])] = len(walk.nodes)
        continue
      kind = type(layer).__name__
      extra = {k: v for k, v in node.arguments.kwargs.items() if v is not None
               and k != "training"}
      if extra:
        _refuse(layer, f"is called with {sorted(extra)}")
      if id(layer) in walk.seen:
        _refuse(layer, "is called more than once (shared layers must be called once)")
      walk.seen.add(id(layer))
      _claim(name, walk)
      if kind in MODEL_CLASSES or hasattr(layer, "_nodes_by_depth") or hasattr(layer, "layers"):
        out = _inline(layer, list(inputs), name + "/", walk)
      else:
        if getattr(layer, "activity_regularizer", None) is not None:
          _refuse(layer, "has an activity regularizer")
        for variable in layer.weights:
          if getattr(variable, "constraint", None) is not None:
            _refuse(layer, f"constrains {variable.path}")
        if kind in BN_CLASSES:
          raw = raw_batch_norm(layer, name)
        else:
          raw = twin_layers.raw_layer(layer, node)
          if raw is None:
            _refuse(layer, "has no raw twin")
          raw.name = name
          if getattr(raw, "state_variables", ()):  # named by the layer's path, not by the
            raw.state = tf.Variable(raw.state.numpy(), trainable=False,  # generator's process-
                                    name=f"{name}/seed_generator_state")  # dependent auto name
            raw.state_variables = (raw.state,)
        walk.pairs += list(zip(layer.weights, raw.variables))
        walk.seeds += list(zip(twin_layers.keras_state_variables(layer),
                               getattr(raw, "state_variables", ())))
        walk.nodes.append(Node(raw, inputs))
        out = len(walk.nodes)
      for tensor in node.outputs:
        ids[id(tensor)] = out
  return ids[id(graph.outputs[0])]


PASS_THROUGH = ("Identity", "Dropout", "SpatialDropout")


def _check_output(nodes: list) -> None:
  """Refuses outputs whose loss Keras computes another way than the twin would: a softmax over
  another axis than the last (Keras's cross-entropy reads its logits over the last), and a
  pass-through layer after a final softmax or sigmoid (Keras keeps the logits through some of
  them and not others, by branch)."""
  last = nodes[-1].layer
  from bnraw.models.twin_layers import OpNode
  if isinstance(last, OpNode) and type(last.operation).__name__ in ("Softmax", "Sigmoid",
                                                                     "LogSoftmax"):
    raise UsageError("keras_model", f"the output is the operation {last.name!r} "
                     f"(keras.ops.{type(last.operation).__name__.lower()}), whose logits "
                     "Keras's loss recovers; make it an Activation layer (supported: "
                     f"{SUPPORTED})")
  if type(last).__name__ == "Softmax" and getattr(last, "activation", None) is None:
    raise UsageError("keras_model", f"the output layer {last.name!r} takes the softmax over "
                     f"axis {last.axis}, not the last one; supported: {SUPPORTED}")
  k = len(nodes) - 1
  while k > 0 and len(nodes[k].inputs) == 1 and (
      type(nodes[k].layer).__name__ in PASS_THROUGH
      or getattr(nodes[k].layer, "activation", None) == "linear"
      and type(nodes[k].layer).__name__ == "Activation"):
    k = nodes[k].inputs[0] - 1
    if k >= 0 and getattr(nodes[k].layer, "activation", None) in LOGIT_ACTIVATIONS:
      raise UsageError("keras_model", f"layer {last.name!r} ({type(last).__name__}) follows the "
                       f"final {nodes[k].layer.activation}; make that activation the output "
                       f"layer (supported: {SUPPORTED})")


class Twin:
  """A Keras model, its raw :class:`Model` twin and the pairing of their state.

  ``raw`` trains with ``optimizer`` (the compiled optimizer's raw twin, built over
  ``raw.trainable_variables`` in Keras's order, so slots pair by position).
  """

  def __init__(self, kmodel, raw: Model, seeds: list, metric_name: Optional[str]):
    self.kmodel, self.raw, self.optimizer = kmodel, raw, None
    self._seeds, self.metric_name = seeds, metric_name
    self.per_replica = False  # under a strategy: states hold every replica's copy in turn

  def _sides(self, keras: bool):
    """One side's weights, optimizer and seed states (Keras's or the raw twin's)."""
    seeds = [pair[0 if keras else 1] for pair in self._seeds]
    if keras:  # per replica: the tf.Variables under Keras's, which hold the copies
      weights = ([w.value for w in self.kmodel.weights] if self.per_replica
                 else self.kmodel.weights)
      return weights, self.kmodel.optimizer, seeds
    return self.raw.variables, self.optimizer, seeds

  def _state(self, keras: bool) -> dict:
    from bnraw.models import keras_bridge
    variables, optimizer, seeds = self._sides(keras)
    state = keras_bridge.get_state(variables, optimizer, per_replica=self.per_replica)
    state["seeds"] = [np.array(v.numpy()) for v in seeds]
    return state

  def _load(self, keras: bool, state: dict) -> None:
    from bnraw.models import keras_bridge
    variables, optimizer, seeds = self._sides(keras)
    keras_bridge.set_state(variables, optimizer, state, per_replica=self.per_replica)
    if "seeds" in state:
      keras_bridge.assign_all(seeds, state["seeds"], "seeds")

  def keras_state(self) -> dict:
    """The Keras model's state (weights, optimizer, seeds) as numpy."""
    return self._state(keras=True)

  def raw_state(self) -> dict:
    """The raw twin's state, in the same layout."""
    return self._state(keras=False)

  def set_raw_state(self, state: dict) -> None:
    self._load(False, state)

  def set_keras_state(self, state: dict) -> None:
    self._load(True, state)


def convert(kmodel, y: Optional[np.ndarray] = None, *, optimizer: bool = True) -> Twin:
  """The raw twin of a compiled Keras model (its values copied now; with ``optimizer``, the
  compiled optimizer's twin too, its slots and iterations copied). ``y``: the labels it will
  train on, which decide what Keras's ``"accuracy"`` means."""
  from bnraw.models import twin_loss
  walk = _Walk()
  if len(kmodel.inputs) != 1:
    raise UsageError("keras_model", f"the model takes {len(kmodel.inputs)} inputs; bnraw "
                     "converts single-input models")
  _inline(kmodel, [0], "", walk)
  by_keras = {id(k): r for k, r in walk.pairs}
  missing = [v.path for v in kmodel.weights if id(v) not in by_keras]
  if missing:
    raise UsageError("keras_model", f"weights {missing} belong to no converted layer")
  variables = [by_keras[id(v)] for v in kmodel.weights]
  trainable = [by_keras[id(v)] for v in kmodel.trainable_variables]
  regularizers = [(by_keras[id(v)], penalty(v.regularizer)) for v in kmodel.trainable_weights
                  if getattr(v, "regularizer", None) is not None]
  _check_output(walk.nodes)
  last = walk.nodes[-1].layer
  activation = getattr(last, "activation", None)
  output_activation = None
  if activation in LOGIT_ACTIVATIONS:  # tagged with _keras_logits; the raw losses drop them
    from bnraw.core import catalog     # where Keras's loss loses them (bnraw.core.losses)
    output_activation = lambda t, name=activation: catalog.activate(name, t)
  metric = twin_loss.raw_metric(kmodel, y)
  raw = Model(kmodel.name, walk.nodes, variables=variables, trainable_variables=trainable,
              state_variables=[r for _, r in walk.seeds], loss_fn=twin_loss.raw_loss(kmodel),
              metric_fn=metric[1] if metric else None, regularizers=regularizers,
              output_activation=output_activation,
              loss_uses_logits=output_activation is not None,
              compute_dtype=kmodel.dtype_policy.compute_dtype)
  twin = Twin(kmodel, raw, walk.seeds, metric[0] if metric else None)
  if optimizer:
    from bnraw.models import twin_optimizer
    twin.optimizer = twin_optimizer.raw_optimizer(kmodel.optimizer, raw.trainable_variables)
    twin.set_raw_state(twin.keras_state())
  return twin


class Parts(NamedTuple):
  """What a tool trains: the twin's raw model and optimizer and the data (as the seed's
  ``bnraw.models.seed.build`` gives them)."""

  model: Model
  optimizer: Any
  data: Any  # .images (x, float32) and .labels (y)


class Data(NamedTuple):
  images: np.ndarray
  labels: np.ndarray


def check_train(train) -> None:
  """The loop's settings for a user's model (a TrainConfig), before any work."""
  from bnraw.core.step import MODES
  for name, low in (("batch_size", 1), ("epochs", 0), ("steps_per_execution", 1)):
    if getattr(train, name) < low:
      raise UsageError(name, f"must be >= {low}, got {getattr(train, name)}")
  if train.mode not in MODES:
    raise UsageError("mode", f"must be one of {', '.join(MODES)}, got {train.mode!r}")


def setup(model_path: str, data_path: str, train=None,
          image_size: Optional[tuple] = None) -> tuple[Twin, Parts, Any]:
  """The user's model loaded, its data checked, its raw twin built (every problem a
  UsageError, before any output is written); ``train``: the loop's settings, checked too.
  With ``train.replicas`` > 1 both are built under the strategy of
  :func:`bnraw.models.seed.replicated` (returned last; None on one device), and the twin's
  states hold every replica's copy."""
  import contextlib
  from bnraw.models import seed, user
  strategy = None
  if train is not None:
    check_train(train)
    if train.replicas > 1:
      strategy = seed.replicated(train)
  with strategy.scope() if strategy else contextlib.nullcontext():
    kmodel = user.load_keras_model(model_path, nested_bn=True)
    x, y = user.load_data(data_path, kmodel, image_size)
    twin = convert(kmodel, y)
  if strategy is not None:
    x = x[:] if streamed(x) else x  # replicas: in memory, batches by --seed
    check_replicas(twin, len(x), train)
    twin.per_replica = True
  return twin, Parts(twin.raw, twin.optimizer, Data(x, y)), strategy


def check_replicas(twin: Twin, examples: int, train) -> None:
  """What a user's model on replicas needs: batches the replicas can split (as the seed's),
  and no part whose per-replica treatment is not written out and checked against Keras yet."""
  from bnraw.models.seed import check_shards
  check_shards(examples, train.batch_size, train.replicas)
  if twin.raw.state_variables:
    raise UsageError("replicas", "a model with Dropout runs on one device so far (each "
                     "replica's seed stream is not written out yet)")
  if twin.raw.regularizers:
    raise UsageError("replicas", "a model with weight regularizers runs on one device so far "
                     "(the per-replica scaling of the penalty is not checked against Keras yet)")
  if train.steps_per_execution > 1:
    raise UsageError("replicas", "runs one step per call (--steps_per_execution=1)")


def save_trained(twin: Twin, path: str) -> str:
  """Writes the user's Keras model holding the twin's whole state (weights, statistics,
  optimizer slots and iterations, seed states) to ``path`` (atomically); returns the path."""
  from bnraw.models import user
  twin.set_keras_state(twin.raw_state())  # weights, statistics, optimizer state and seeds
  return user.save_model(twin.kmodel, path)


__all__ = ["Parts", "Twin", "check_train", "convert", "penalty", "raw_batch_norm",
           "save_trained", "setup"]
