"""A zoo of small user-style Keras models with BN, each saved as a user would save it (compiled,
``model.save``) with its data (``.npz``, arrays ``x`` and ``y``): what every ``--keras_model``
tool is tested on. None of them is the seed network, and each stresses a different part of the
conversion. Widths are tiny so that the whole zoo trains in seconds on two cores."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

EXAMPLES = 40  # with batch 16: two full batches and a partial one per epoch
BATCH_SIZE = 16


def _data(rng, x_shape, y):
  return rng.normal(size=(EXAMPLES, *x_shape)).astype(np.float32), y


def resnet(keras, rng):
  """Residual CNN: strided 'same' convs without bias, BN before ReLU, an Add shortcut."""
  L = keras.layers
  inp = keras.Input((8, 8, 3))
  h = L.Conv2D(4, 3, strides=2, padding="same", use_bias=False, name="stem")(inp)
  h = L.BatchNormalization(name="stem_bn")(h)
  h = L.ReLU()(h)
  r = L.Conv2D(4, 3, padding="same", use_bias=False, name="block_conv1")(h)
  r = L.BatchNormalization(name="block_bn1")(r)
  r = L.ReLU()(r)
  r = L.Conv2D(4, 3, padding="same", use_bias=False, name="block_conv2")(r)
  r = L.BatchNormalization(name="block_bn2")(r)
  h = L.ReLU()(L.Add()([h, r]))
  h = L.GlobalAveragePooling2D()(h)
  model = keras.Model(inp, L.Dense(3, activation="softmax", name="head")(h), name="resnet")
  model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                metrics=["accuracy"])
  return model, _data(rng, (8, 8, 3), rng.integers(0, 3, EXAMPLES))


def mlp_dropout(keras, rng):
  """MLP with BN and Dropout, SGD with Nesterov momentum, one-hot labels."""
  L = keras.layers
  model = keras.Sequential([keras.Input((6,)), L.Dense(8, name="fc1"),
                            L.BatchNormalization(name="bn1"), L.Activation("relu"),
                            L.Dropout(0.3, seed=3), L.Dense(3, activation="softmax", name="out")],
                           name="mlp")
  model.compile(keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
                "categorical_crossentropy", metrics=["accuracy"])
  return model, _data(rng, (6,), np.eye(3, dtype=np.float32)[rng.integers(0, 3, EXAMPLES)])


def nested(keras, rng):
  """BN inside a Sequential inside a functional sub-model inside the model."""
  L = keras.layers
  block = keras.Sequential([keras.Input((6, 6, 2)), L.Conv2D(3, 3, name="conv"),
                            L.BatchNormalization(name="bn"), L.ReLU()], name="block")
  inner_in = keras.Input((6, 6, 2))
  inner = keras.Model(inner_in, L.Flatten()(block(inner_in)), name="backbone")
  inp = keras.Input((6, 6, 2))
  h = L.BatchNormalization(name="top_bn")(L.Dense(4, name="fc")(inner(inp)))
  model = keras.Model(inp, L.Dense(2, activation="softmax", name="head")(h), name="nested")
  model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                metrics=["accuracy"])
  return model, _data(rng, (6, 6, 2), rng.integers(0, 2, EXAMPLES))


def bn_axis1(keras, rng):
  """BN over axis 1 without center and scale; a regression head (MSE, no metric)."""
  L = keras.layers
  model = keras.Sequential([keras.Input((4, 5, 3)), L.Conv2D(3, 1, name="conv"),
                            L.BatchNormalization(axis=1, center=False, scale=False, name="bn"),
                            L.Flatten(), L.Dense(1, name="out")], name="axis1")
  model.compile(keras.optimizers.Adam(1e-2), "mse")
  return model, _data(rng, (4, 5, 3), rng.normal(size=(EXAMPLES, 1)).astype(np.float32))


def frozen_bn(keras, rng):
  """A fine-tune: a frozen base (conv + BN, trainable=False) under a trainable head."""
  L = keras.layers
  base = keras.Sequential([keras.Input((6, 6, 3)), L.Conv2D(4, 3, name="conv"),
                           L.BatchNormalization(name="bn"), L.ReLU(),
                           L.GlobalAveragePooling2D()], name="base")
  gamma, beta, _, _ = base.layers[1].get_weights()  # statistics a pretrained base would carry
  base.layers[1].set_weights([gamma, beta, np.linspace(-0.5, 0.5, 4).astype(np.float32),
                              np.linspace(0.5, 2.0, 4).astype(np.float32)])
  base.trainable = False
  inp = keras.Input((6, 6, 3))
  h = L.BatchNormalization(name="head_bn")(L.Dense(5, name="fc")(base(inp)))
  model = keras.Model(inp, L.Dense(3, activation="softmax", name="head")(h), name="finetune")
  model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                metrics=["accuracy"])
  return model, _data(rng, (6, 6, 3), rng.integers(0, 3, EXAMPLES))


def separable(keras, rng):
  """Depthwise-separable convs with ReLU6, a sigmoid head, binary cross-entropy, RMSprop."""
  L = keras.layers
  model = keras.Sequential([
      keras.Input((8, 8, 3)), L.SeparableConv2D(4, 3, padding="same", name="sep"),
      L.BatchNormalization(name="bn1"), L.ReLU(max_value=6.0),
      L.DepthwiseConv2D(3, strides=2, name="dw"), L.BatchNormalization(name="bn2"),
      L.ReLU(6.0), L.GlobalAveragePooling2D(), L.Dense(1, activation="sigmoid", name="out")],
      name="separable")
  model.compile(keras.optimizers.RMSprop(1e-2), "binary_crossentropy", metrics=["accuracy"])
  return model, _data(rng, (8, 8, 3), rng.integers(0, 2, (EXAMPLES, 1)).astype(np.float32))


def synchronized(keras, rng):
  """``synchronized=True`` BN on inputs with a large mean (its one-pass moments show), logits
  with a from_logits loss, AdamW, an L2 kernel regularizer."""
  L = keras.layers
  model = keras.Sequential([
      keras.Input((6,)), L.Dense(5, kernel_regularizer=keras.regularizers.l2(1e-3), name="fc"),
      L.BatchNormalization(synchronized=True, name="sync_bn"), L.ReLU(),
      L.Dense(3, name="logits")], name="sync")
  model.compile(keras.optimizers.AdamW(1e-2),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
  x, y = _data(rng, (6,), rng.integers(0, 3, EXAMPLES))
  return model, (x + 20.0, y)


def hard_swish_se(keras, rng):
  """MobileNetV3's idioms as its source writes them: Python operators and keras.ops calls on
  symbolic tensors (the hard sigmoid ``ReLU(6)(x + 3.0) * (1.0 / 6.0)``, a hard swish as
  ``x * hard_sigmoid(x)``, a ``keras.ops.mean`` squeeze), a squeeze-and-excite gate multiplied
  in, a Rescaling in front."""
  L, ops = keras.layers, keras.ops

  def hard_sigmoid(x):
    return L.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)

  inp = keras.Input((8, 8, 3))
  h = L.Rescaling(1.0 / 2.0, offset=-0.5)(inp)
  h = L.Conv2D(6, 3, padding="same", use_bias=False, name="stem")(h)
  h = L.BatchNormalization(name="stem_bn")(h)
  h = h * hard_sigmoid(h)
  s = ops.mean(h, axis=(1, 2), keepdims=True)
  s = L.Conv2D(3, 1, name="squeeze")(s)
  s = L.ReLU()(s)
  s = hard_sigmoid(L.Conv2D(6, 1, name="excite")(s))
  h = L.Multiply(name="excite_mul")([h, s])
  h = L.BatchNormalization(name="out_bn")(ops.subtract(h, 0.25))
  h = L.GlobalAveragePooling2D()(h)
  model = keras.Model(inp, L.Dense(3, activation="softmax", name="head")(h), name="hswish")
  model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                metrics=["accuracy"])
  return model, _data(rng, (8, 8, 3), rng.integers(0, 3, EXAMPLES))


def dense_blocks(keras, rng):
  """DenseNet's idiom at a tiny size and many BN layers (13): pre-activation BN-ReLU-Conv units
  whose outputs are concatenated onto their input, a transition with average pooling, SGD with
  momentum; the model where a cost per BN layer would show."""
  L = keras.layers
  inp = keras.Input((6, 6, 2))
  h = L.Conv2D(3, 3, padding="same", use_bias=False, name="stem")(inp)
  for block in range(2):
    for unit in range(3):
      u = L.Activation("relu")(L.BatchNormalization(name=f"b{block}_u{unit}_bn1")(h))
      u = L.Conv2D(4, 1, use_bias=False, name=f"b{block}_u{unit}_conv1")(u)
      u = L.Activation("relu")(L.BatchNormalization(name=f"b{block}_u{unit}_bn2")(u))
      u = L.Conv2D(2, 3, padding="same", use_bias=False, name=f"b{block}_u{unit}_conv2")(u)
      h = L.Concatenate(name=f"b{block}_u{unit}_concat")([h, u])
    if block == 0:
      h = L.BatchNormalization(name="transition_bn")(h)
      h = L.Conv2D(4, 1, use_bias=False, name="transition_conv")(L.Activation("relu")(h))
      h = L.AveragePooling2D(2, name="transition_pool")(h)
  h = L.GlobalAveragePooling2D()(L.ReLU()(h))
  model = keras.Model(inp, L.Dense(3, activation="softmax", name="head")(h), name="densenet")
  model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy",
                metrics=["accuracy"])
  return model, _data(rng, (6, 6, 2), rng.integers(0, 3, EXAMPLES))


_CUSTOM: dict = {}


def custom_classes(keras) -> dict:
  """A user's own layers, registered as Keras loads them (once per process): ``Scale``
  (InceptionResNetV2's ``CustomScaleLayer``: ``a + b * scale`` on two inputs) and ``Gain`` (a
  weight of its own, L2-regularised, a branch on ``training``)."""
  if not _CUSTOM:
    @keras.saving.register_keras_serializable(package="bnraw_zoo")
    class Scale(keras.layers.Layer):
      def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

      def get_config(self):
        return {**super().get_config(), "scale": self.scale}

      def call(self, inputs):
        return inputs[0] + inputs[1] * self.scale

    @keras.saving.register_keras_serializable(package="bnraw_zoo")
    class Gain(keras.layers.Layer):
      def build(self, shape):
        self.gain = self.add_weight(shape=(shape[-1],), initializer="ones", regularizer="l2")

      def call(self, x, training=None):
        return x * self.gain if training else x * (self.gain * 1.0)

    _CUSTOM.update(Scale=Scale, Gain=Gain)
  return _CUSTOM


def opaque(keras, rng):
  """Layers bnraw has no hand-written twin for, run as opaque nodes: a Normalization with its
  own mean and variance in front (EfficientNet's), Conv2DTranspose, LayerNormalization and two
  custom layers (:func:`custom_classes`)."""
  L, custom = keras.layers, custom_classes(keras)
  inp = keras.Input((6, 6, 3))
  h = L.Normalization(mean=[0.5, -0.2, 1.0], variance=[2.0, 0.5, 1.0])(inp)
  # no bias before BN: its true gradient is 0 (BN subtracts the mean), so what it gets is
  # rounding noise that Adam scales to lr-sized steps; XLA's noise differs by CPU (AMD EPYC)
  h = L.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(h)
  h = L.BatchNormalization(name="bn")(h)
  up = L.Conv2DTranspose(4, 3, padding="same", name="transpose")(L.ReLU()(h))
  h = custom["Scale"](0.17, name="scale")([h, up])
  h = L.LayerNormalization(name="ln")(custom["Gain"](name="gain")(h))
  h = L.BatchNormalization(name="bn_2")(h)
  h = L.GlobalAveragePooling2D()(h)
  model = keras.Model(inp, L.Dense(3, activation="softmax", name="head")(h), name="opaque")
  model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                metrics=["accuracy"])
  return model, _data(rng, (6, 6, 3), rng.integers(0, 3, EXAMPLES))


ZOO: dict[str, Callable] = {f.__name__: f for f in (
    resnet, mlp_dropout, nested, bn_axis1, frozen_bn, separable, synchronized, hard_swish_se,
    opaque, dense_blocks)}


def save(name: str, directory: str, seed: int = 0, fit_epochs: int = 1) -> tuple[str, str]:
  """Builds zoo model ``name``, trains it ``fit_epochs`` epochs with its own ``fit`` (so the
  saved optimizer has moments and iterations, the BN statistics and dropout seeds have moved,
  as in a user's file), saves it and its data in ``directory``; returns both paths."""
  import keras
  keras.utils.set_random_seed(seed)
  model, (x, y) = ZOO[name](keras, np.random.default_rng(seed))
  if fit_epochs:
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=fit_epochs, verbose=0)
  model_path = os.path.join(directory, f"{name}.keras")
  data_path = os.path.join(directory, f"{name}.npz")
  model.save(model_path)
  np.savez(data_path, x=x, y=y)
  return model_path, data_path
