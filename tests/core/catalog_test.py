"""Every raw twin of bnraw.core.catalog against its Keras 3 layer, converted by
bnraw.models.twin_layers.raw_layer: outputs and gradients (input and every trainable variable)
bit for bit, inference and training, eager and in tf.function; Dropout's masks and seed state
over consecutive calls; and what the converter refuses."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from bnraw.core import catalog
from bnraw.errors import UsageError
from bnraw.models import twin_layers

L = keras.layers
IMG, SEQ, VEC = (2, 6, 6, 4), (2, 7, 4), (3, 5)


def case(name, make, *shapes, dtype="float32"):
  return dict(testcase_name=name, make=make, shapes=shapes or (IMG,), dtype=dtype)


CASES = [
    # Convolutions
    case("conv2d_valid", lambda: L.Conv2D(3, 3)),
    case("conv2d_same_strided", lambda: L.Conv2D(3, 3, strides=2, padding="same")),
    case("conv2d_dilated", lambda: L.Conv2D(3, 2, dilation_rate=2, padding="same")),
    case("conv2d_grouped", lambda: L.Conv2D(6, 3, groups=2, activation="relu")),
    case("conv2d_no_bias", lambda: L.Conv2D(3, 2, use_bias=False, activation="sigmoid")),
    case("conv2d_one_filter", lambda: L.Conv2D(1, 3)),
    case("conv1d_causal", lambda: L.Conv1D(3, 3, padding="causal", dilation_rate=2), SEQ),
    case("conv1d_strided", lambda: L.Conv1D(3, 3, strides=2, padding="same",
                                            activation="tanh"), SEQ),
    case("depthwise2d_same", lambda: L.DepthwiseConv2D(3, depth_multiplier=2, padding="same")),
    case("depthwise2d_strided_no_bias", lambda: L.DepthwiseConv2D(2, strides=2,
                                                                  use_bias=False)),
    case("depthwise2d_stride_and_dilation", lambda: L.DepthwiseConv2D(
        2, strides=2, dilation_rate=2, padding="same")),
    case("depthwise2d_dilated", lambda: L.DepthwiseConv2D(2, dilation_rate=2)),
    case("depthwise1d", lambda: L.DepthwiseConv1D(3, padding="same", activation="relu"), SEQ),
    case("separable2d_same", lambda: L.SeparableConv2D(3, 3, padding="same",
                                                       depth_multiplier=2)),
    case("separable2d_strided", lambda: L.SeparableConv2D(3, 2, strides=2, activation="relu")),
    case("separable2d_stride_and_dilation", lambda: L.SeparableConv2D(
        3, 2, strides=2, dilation_rate=2, padding="same")),
    case("separable1d", lambda: L.SeparableConv1D(3, 3), SEQ),
    # Dense
    case("dense_rank2", lambda: L.Dense(4), VEC),
    case("dense_rank3_softmax", lambda: L.Dense(4, activation="softmax"), SEQ),
    case("dense_rank4", lambda: L.Dense(2), IMG),
    case("dense_one_unit_sigmoid", lambda: L.Dense(1, activation="sigmoid"), VEC),
    case("dense_one_unit_rank3", lambda: L.Dense(1), SEQ),
    case("dense_no_bias", lambda: L.Dense(3, use_bias=False, activation="relu"), VEC),
    # Activation layers
    case("relu", lambda: L.ReLU()),
    case("relu_max6", lambda: L.ReLU(max_value=6.0)),
    case("relu_max", lambda: L.ReLU(max_value=0.7)),
    case("relu_slope", lambda: L.ReLU(negative_slope=0.1)),
    case("relu_slope_max", lambda: L.ReLU(max_value=0.8, negative_slope=0.2)),
    case("relu_threshold", lambda: L.ReLU(threshold=0.3)),
    case("relu_all", lambda: L.ReLU(max_value=1.2, negative_slope=0.1, threshold=0.4)),
    case("leaky_relu", lambda: L.LeakyReLU(negative_slope=0.2)),
    case("elu", lambda: L.ELU()),
    case("elu_alpha", lambda: L.ELU(alpha=0.5)),
    case("softmax", lambda: L.Softmax()),
    case("softmax_axis1", lambda: L.Softmax(axis=1)),
    case("softmax_two_axes", lambda: L.Softmax(axis=(1, 2))),
    # Pooling
    case("max_pool2d", lambda: L.MaxPooling2D(2)),
    case("max_pool2d_same", lambda: L.MaxPooling2D(3, strides=2, padding="same")),
    case("avg_pool2d_same", lambda: L.AveragePooling2D(2, padding="same")),
    case("avg_pool2d_stride1", lambda: L.AveragePooling2D(3, strides=1)),
    case("max_pool1d", lambda: L.MaxPooling1D(2), SEQ),
    case("avg_pool1d_same", lambda: L.AveragePooling1D(3, strides=2, padding="same"), SEQ),
    case("global_avg2d", lambda: L.GlobalAveragePooling2D()),
    case("global_avg2d_keepdims", lambda: L.GlobalAveragePooling2D(keepdims=True)),
    case("global_max2d", lambda: L.GlobalMaxPooling2D()),
    case("global_avg1d", lambda: L.GlobalAveragePooling1D(), SEQ),
    case("global_max1d_keepdims", lambda: L.GlobalMaxPooling1D(keepdims=True), SEQ),
    # Reshaping
    case("flatten", lambda: L.Flatten()),
    case("reshape", lambda: L.Reshape((4, -1))),
    case("permute", lambda: L.Permute((2, 1, 3))),
    case("zero_padding", lambda: L.ZeroPadding2D(((1, 2), (0, 1)))),
    case("cropping", lambda: L.Cropping2D(((1, 0), (1, 2)))),
    case("cropping_all_sides", lambda: L.Cropping2D(1)),
    case("rescaling", lambda: L.Rescaling(1 / 255.0, offset=-0.5)),
    case("rescaling_per_channel", lambda: L.Rescaling([0.5, 2.0, 1.5, 3.0])),
    case("identity", lambda: L.Identity()),
    # Merging
    case("add", lambda: L.Add(), IMG, IMG),
    case("add_three", lambda: L.Add(), VEC, VEC, VEC),
    case("add_batch_of_one", lambda: L.Add(), (1, 4), (1, 4)),
    case("add_ranks_differ", lambda: L.Add(), (2, 4), (2, 3, 4)),
    case("subtract", lambda: L.Subtract(), SEQ, SEQ),
    case("multiply", lambda: L.Multiply(), SEQ, SEQ, SEQ),
    case("average", lambda: L.Average(), VEC, VEC, VEC),
    case("maximum", lambda: L.Maximum(), SEQ, SEQ),
    case("minimum", lambda: L.Minimum(), SEQ, SEQ),
    case("concatenate", lambda: L.Concatenate(), IMG, (2, 6, 6, 2)),
    case("concatenate_axis1", lambda: L.Concatenate(axis=1), SEQ, (2, 3, 4)),
    # Dropout
    case("dropout", lambda: L.Dropout(0.5, seed=7)),
    case("dropout_noise_shape", lambda: L.Dropout(0.3, noise_shape=(None, 1, 4)), SEQ),
    case("dropout_unseeded", lambda: L.Dropout(0.6), VEC),
    case("dropout_rate_one", lambda: L.Dropout(1.0), VEC),
    case("dropout_rate_zero", lambda: L.Dropout(0.0), VEC),
    case("spatial_dropout2d", lambda: L.SpatialDropout2D(0.5, seed=3)),
    case("spatial_dropout1d", lambda: L.SpatialDropout1D(0.4), SEQ),
    # Mixed precision: float16 compute, float32 variables
    case("mixed_conv2d", lambda: L.Conv2D(3, 3, padding="same", dtype="mixed_float16")),
    case("mixed_dense_softmax", lambda: L.Dense(4, activation="softmax",
                                                dtype="mixed_float16"), VEC),
    case("mixed_separable2d", lambda: L.SeparableConv2D(3, 2, dtype="mixed_float16")),
    case("mixed_global_avg", lambda: L.GlobalAveragePooling2D(dtype="mixed_float16")),
    case("mixed_dropout", lambda: L.Dropout(0.5, dtype="mixed_float16")),
    case("mixed_rescaling", lambda: L.Rescaling(1 / 255.0, dtype="mixed_float16")),
    case("bfloat16_dense", lambda: L.Dense(3, dtype="mixed_bfloat16"), SEQ),
    case("float32_softmax_on_float16", lambda: L.Activation("softmax", dtype="float32"),
         dtype="float16"),
    case("mixed_add", lambda: L.Add(dtype="mixed_float16"), VEC, VEC),
]


def step(layer, xs, weight, training):
  """Output and gradients of ``sum(output * weight)`` w.r.t. inputs and trainable variables."""
  with tf.GradientTape() as tape:
    tape.watch(xs)
    out = layer(xs if len(xs) > 1 else xs[0], training=training)
    loss = tf.reduce_sum(out * weight)
  return out, tape.gradient(loss, [*xs, *layer.trainable_variables])


def assert_same(actual, expected, what):
  if expected is None:
    assert actual is None, f"{what}: raw has a gradient where Keras has none"
    return
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} vs {expected.dtype}"
  np.testing.assert_array_equal(actual, expected, err_msg=what)


class CatalogAgainstKerasTest(tf.test.TestCase, parameterized.TestCase):

  def convert(self, make, shapes, dtype):
    rng = np.random.default_rng(sum(map(sum, shapes)))
    xs = [tf.constant(rng.standard_normal(s), dtype) for s in shapes]
    layer = make()
    out = layer(xs if len(xs) > 1 else xs[0], training=False)  # builds it
    for v in layer.weights:  # non-trivial weights (biases start at 0)
      v.assign((rng.standard_normal(v.shape) * 0.5).astype(v.dtype))
    raw = twin_layers.raw_layer(layer)
    weight = tf.constant(rng.standard_normal(out.shape), out.dtype)
    return layer, raw, xs, weight

  @parameterized.named_parameters(*CASES)
  def test_matches_keras(self, make, shapes, dtype):
    for in_function in (False, True):
      layer, raw, xs, weight = self.convert(make, shapes, dtype)
      self.assertEqual([v.name for v in raw.variables], [v.path + ":0" for v in layer.weights])
      self.assertLen(raw.trainable_variables, len(layer.trainable_weights))
      keras_states = twin_layers.keras_state_variables(layer)
      self.assertLen(raw.state_variables, len(keras_states))
      run = tf.function(step) if in_function else step
      for training in (False, True):
        for call in range(3 if training and raw.state_variables else 1):  # new masks each
          what = f"function={in_function} training={training} call={call}"
          expected, expected_grads = run(layer, xs, weight, training)
          actual, grads = run(raw, xs, weight, training)
          assert_same(actual, expected, f"{what}: output")
          for i, (g, e) in enumerate(zip(grads, expected_grads)):
            assert_same(g, e, f"{what}: gradient {i}")
      for raw_state, keras_state in zip(raw.state_variables, keras_states):
        np.testing.assert_array_equal(raw_state.numpy(), keras_state.numpy())
        # drawn once per training call, never at rate 1
        self.assertEqual(keras_state.numpy()[1], 0 if layer.rate == 1 else 3)

  @parameterized.parameters(*sorted(catalog.ACTIVATIONS))
  def test_activation(self, name):
    layer, raw, xs, weight = self.convert(lambda: L.Activation(name), (SEQ,), "float32")
    self.assertEqual(raw.activation, name if name not in ("swish", "hard_swish")
                     else {"swish": "silu", "hard_swish": "hard_silu"}[name])
    for run in (step, tf.function(step)):
      expected, expected_grads = run(layer, xs, weight, True)
      actual, grads = run(raw, xs, weight, True)
      assert_same(actual, expected, f"{name}: output")
      assert_same(grads[0], expected_grads[0], f"{name}: gradient")

  def test_preactivation_is_the_logits(self):
    layer, raw, xs, _ = self.convert(lambda: L.Dense(4, activation="softmax"), (VEC,),
                                     "float32")
    logits = raw.preactivation(xs[0], training=False)
    self.assertEqual(raw.activation, "softmax")
    assert_same(logits, layer(xs[0])._keras_logits, "logits")
    assert_same(catalog.activate("softmax", logits), layer(xs[0]), "softmax")

  def test_softmax_layer_exposes_its_logits(self):
    layer, raw, xs, _ = self.convert(L.Softmax, (VEC,), "float32")
    self.assertEqual(raw.activation, "softmax")
    logits = raw.preactivation(xs[0], training=True)
    assert_same(catalog.activate(raw.activation, logits), layer(xs[0]), "softmax")
    self.assertIsNone(twin_layers.raw_layer(L.Softmax(axis=1)).activation)

  def test_regularizable_and_state(self):
    layer, raw, _, _ = self.convert(lambda: L.SeparableConv2D(3, 2), (IMG,), "float32")
    self.assertEqual(list(raw.regularizable), ["depthwise_kernel", "pointwise_kernel", "bias"])
    self.assertEqual(raw.kernels, list(raw.variables[:2]))
    dropout = L.Dropout(0.5, seed=11)
    raw = twin_layers.raw_layer(dropout)
    self.assertEqual(raw.variables, ())
    self.assertEqual(raw.state_variables[0].dtype, tf.int64)
    np.testing.assert_array_equal(raw.state_variables[0].numpy(), [11, 0])
    self.assertIs(twin_layers.keras_state_variables(dropout)[0], dropout.seed_generator.state)

  def test_frozen_layer_has_no_trainable_variables(self):
    layer, raw, _, _ = self.convert(lambda: L.Dense(3, trainable=False), (VEC,), "float32")
    self.assertLen(raw.variables, 2)
    self.assertEqual(raw.trainable_variables, ())

  @parameterized.named_parameters(
      ("no_hand_written_twin", lambda: L.Conv2DTranspose(2, 2), IMG),
      ("subclass", lambda: type("MyDense", (L.Dense,), {})(2), VEC),
  )
  def test_other_layers_are_opaque_and_compute_what_keras_computes(self, make, shape):
    """A class without a hand-written twin (a subclass too: it may override call) runs as its
    own call on the raw copies of its weights: the same values forward and backward."""
    layer = make()
    x = tf.random.stateless_normal(shape, seed=(1, 2))
    keras.Model(inp := keras.Input(shape[1:]), layer(inp))  # a node to read the call from
    raw = twin_layers.raw_layer(layer)
    self.assertIsInstance(raw, twin_layers.OpaqueLayer)
    self.assertEqual([v.name.split(":")[0] for v in raw.variables],
                     [v.path for v in layer.weights])
    results = []
    for weights, call in ((layer.trainable_weights, lambda: layer(x)),
                          (raw.trainable_variables, lambda: raw(x, training=True))):
      with tf.GradientTape() as tape:
        y = call()
        total = tf.reduce_sum(y * y)
      results.append([y.numpy()] + [g.numpy() for g in tape.gradient(total, weights)])
    self.assertLen(results[1], 1 + len(layer.trainable_weights))
    for got, want in zip(results[1], results[0]):
      np.testing.assert_array_equal(got, want)

  def test_callers_layers_give_none(self):
    model = keras.Sequential([keras.Input((4,)), L.BatchNormalization()])
    self.assertIsNone(twin_layers.raw_layer(model))
    self.assertIsNone(twin_layers.raw_layer(model.layers[0]))
    self.assertIsNone(twin_layers.raw_layer(L.InputLayer(shape=(4,))))

  @parameterized.named_parameters(
      ("channels_first", lambda: L.MaxPooling2D(2, data_format="channels_first"), IMG,
       "channels_first"),
      ("constraint", lambda: L.Dense(2, kernel_constraint="non_neg"), VEC, "constraint"),
      ("custom_activation", lambda: L.Dense(2, activation=lambda x: 2 * x), VEC, "activation"),
      ("activity_regularizer", lambda: L.Dense(2, activity_regularizer="l2"), VEC,
       "activity regularizer"),
  )
  def test_refuses(self, make, shape, problem):
    layer = make()
    layer(tf.zeros(shape))
    with self.assertRaisesRegex(UsageError, f"keras_model: layer .*{problem}.*docs/your-model.md"):
      twin_layers.raw_layer(layer)


if __name__ == "__main__":
  tf.test.main()
