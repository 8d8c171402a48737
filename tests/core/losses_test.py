"""The raw losses and metrics (``bnraw.core.losses``, via ``bnraw.models.twin_loss``) against
Keras 3's compiled ones in a train step: the loss and its gradients bit for bit."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from bnraw.core import losses, ops
from bnraw.errors import UsageError
from bnraw.models.twin_loss import raw_loss, raw_metric

N, FEATURES = 6, 5


def head(units, activation, dtype=None, how="dense"):
  """Input(5) -> Dense(units) with ``activation`` put on by ``how``: the Dense itself
  ("dense"), an ``Activation`` layer ("layer") or ``keras.layers.Softmax`` ("softmax_layer")."""
  inputs = keras.Input((FEATURES,))
  if how == "dense":
    outputs = keras.layers.Dense(units, activation=activation, dtype=dtype)(inputs)
  else:
    outputs = keras.layers.Dense(units, dtype=dtype)(inputs)
    outputs = (keras.layers.Softmax() if how == "softmax_layer"
               else keras.layers.Activation(activation))(outputs)
  return keras.Model(inputs, outputs)


def labels(kind, units, rng):
  if kind == "sparse":
    return rng.integers(0, units, N)
  if kind == "sparse_column":
    return rng.integers(0, units, (N, 1))
  if kind == "one_hot":
    return np.eye(units, dtype=np.float32)[rng.integers(0, units, N)]
  if kind == "binary":
    return rng.integers(0, 2, N).astype(np.float32)
  if kind == "multi_binary":
    return rng.integers(0, 2, (N, units)).astype(np.float32)
  return rng.standard_normal((N, units) if kind == "real" else N).astype(np.float32)


ACTIVATIONS = {"softmax": tf.nn.softmax, "sigmoid": tf.nn.sigmoid, None: tf.identity}

CASES = (  # name, loss, units, labels, activation, how, logits reached the loss
    ("cce_softmax", "categorical_crossentropy", 3, "one_hot", "softmax", "dense", True),
    ("cce_smoothing", keras.losses.CategoricalCrossentropy(label_smoothing=0.1), 3, "one_hot",
     "softmax", "layer", True),
    ("cce_from_logits", keras.losses.CategoricalCrossentropy(from_logits=True), 3, "one_hot",
     None, "dense", False),
    ("cce_on_sigmoid", keras.losses.categorical_crossentropy, 3, "one_hot", "sigmoid", "dense",
     True),
    ("cce_tf_softmax", "categorical_crossentropy", 3, "one_hot", tf.nn.softmax, "dense", True),
    ("sparse_softmax_layer", "sparse_categorical_crossentropy", 3, "sparse", "softmax",
     "softmax_layer", True),
    ("sparse_from_logits", keras.losses.SparseCategoricalCrossentropy(from_logits=True), 3,
     "sparse_column", None, "dense", False),
    ("sparse_softmax_from_logits", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
     3, "sparse", "softmax", "dense", True),
    ("bce_sigmoid", "binary_crossentropy", 1, "binary", "sigmoid", "dense", True),
    ("bce_sigmoid_layer", "binary_crossentropy", 3, "multi_binary", "sigmoid", "layer", True),
    ("bce_from_logits_smoothing",
     keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=0.2), 1, "binary", None,
     "dense", False),
    ("bce_tf_softmax_probabilities", "binary_crossentropy", 3, "multi_binary", tf.nn.softmax,
     "dense", False),
    ("crossentropy_alias", "crossentropy", 3, "sparse", "softmax", "dense", True),
    ("mse", "mse", 1, "scalar", None, "dense", False),
    ("mae", keras.losses.MeanAbsoluteError(), 3, "real", None, "dense", False),
    ("huber", keras.losses.Huber(delta=0.5), 1, "scalar", None, "dense", False),
)


def dense_logits(x, kernel, bias):
  """Keras's Dense without activation: matmul, then ``ops.add`` of the bias."""
  return ops.add(tf.matmul(x, kernel), bias)


class LossesTest(tf.test.TestCase, parameterized.TestCase):

  def setUp(self):
    super().setUp()
    keras.utils.set_random_seed(0)
    self.rng = np.random.default_rng(0)
    self.x = tf.constant(2.0 * self.rng.standard_normal((N, FEATURES)).astype(np.float32))

  def assert_same_step(self, model, raw_activation, logits_reached, y, low_precision=False):
    """The compiled loss and its gradients in a Keras train step (``compute_loss`` on the
    output of ``model(x, training=True)`` in one tf.function) against the raw ones, the raw
    forward pass using the model's own variables."""
    dense = model.layers[1]
    raw = raw_loss(model)
    y = tf.constant(y)

    @tf.function
    def keras_step(x, y):
      with tf.GradientTape() as tape:
        loss = model.compute_loss(x, y, model(x, training=True), training=True)
      return loss, tape.gradient(loss, [dense.kernel, dense.bias])

    @tf.function
    def raw_step(x, y):
      with tf.GradientTape() as tape:
        if low_precision:
          logits = dense_logits(tf.cast(x, tf.float16), tf.cast(dense.kernel, tf.float16),
                                   tf.cast(dense.bias, tf.float16))
        else:
          logits = dense_logits(x, dense.kernel, dense.bias)
        y_pred = ACTIVATIONS[raw_activation](logits)
        loss = raw(y, y_pred, logits if logits_reached or low_precision else None)
      return loss, tape.gradient(loss, [dense.kernel, dense.bias])

    want, got = keras_step(self.x, y), raw_step(self.x, y)
    self.assertEqual(got[0].dtype, tf.float32)
    self.assertTrue(np.array_equal(want[0].numpy(), got[0].numpy()),
                    f"{want[0].numpy()!r} != {got[0].numpy()!r}")
    for w, g in zip(want[1], got[1]):
      self.assertTrue(np.array_equal(w.numpy(), g.numpy()), f"gradient {w} != {g}")

  @parameterized.named_parameters(*CASES)
  def test_bit_identical_to_keras_train_step(self, loss, units, kind, activation, how,
                                             logits_reached):
    model = head(units, activation, how=how)
    model.compile(optimizer="sgd", loss=loss)
    name = {tf.nn.softmax: "softmax"}.get(activation, activation)
    y = labels(kind, units, self.rng)
    raw = raw_loss(model)
    tagged = activation in ("softmax", "sigmoid")
    self.assertEqual(raw.uses_logits(y, model.outputs[0], name, tagged), logits_reached)
    self.assert_same_step(model, name, logits_reached, y)

  def test_fit_step_follows_the_raw_gradient(self):
    # One real fit step (unknown batch size in its graph), SGD with lr=1: w -= gradient.
    model = head(3, "softmax", how="layer")
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="sparse_categorical_crossentropy")
    dense, raw, y = model.layers[1], raw_loss(model), labels("sparse", 3, self.rng)
    with tf.GradientTape() as tape:
      logits = dense_logits(self.x, dense.kernel, dense.bias)
      loss = raw(tf.constant(y), tf.nn.softmax(logits), logits)
    gradient = tape.gradient(loss, dense.kernel).numpy()
    want = dense.kernel.numpy() - gradient
    model.fit(self.x.numpy(), y, batch_size=N, epochs=1, shuffle=False, verbose=0)
    self.assertTrue(np.array_equal(dense.kernel.numpy(), want))

  def test_logits_make_a_difference(self):
    # Saturated softmax: the probability formula clips where the logits one does not.
    logits = tf.constant([[40.0, 0.0, -40.0]])
    y = tf.constant([2])
    from_logits = losses.sparse_categorical_crossentropy(y, tf.nn.softmax(logits), logits)
    from_probabilities = losses.sparse_categorical_crossentropy(y, tf.nn.softmax(logits))
    self.assertAllClose(from_logits, 80.0)
    self.assertAllClose(from_probabilities, -np.log(1e-7), rtol=1e-3)

  def test_mixed_float16_output_drops_the_logits(self):
    # Keras's loss casts the float16 softmax to float32: the cast loses the logits.
    model = head(3, "softmax", dtype="mixed_float16")
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    self.assert_same_step(model, "softmax", False, labels("sparse", 3, self.rng),
                          low_precision=True)

  def test_carries_logits_rule(self):
    self.assertTrue(losses.carries_logits("binary_crossentropy", "softmax", True))
    self.assertFalse(losses.carries_logits("binary_crossentropy", "softmax", False))
    self.assertTrue(losses.carries_logits("binary_crossentropy", "sigmoid", False))
    self.assertFalse(losses.carries_logits("categorical_crossentropy", "sigmoid", False))
    self.assertFalse(losses.carries_logits("mean_squared_error", "sigmoid", True))
    self.assertFalse(losses.carries_logits("categorical_crossentropy", "relu", True))

  @parameterized.named_parameters(
      ("kl_divergence", "kl_divergence", "kl_divergence"),
      ("ignore_class", keras.losses.SparseCategoricalCrossentropy(ignore_class=0),
       "ignore_class"),
      ("reduction", keras.losses.MeanSquaredError(reduction="sum"), "reduction='sum'"),
      ("focal", keras.losses.CategoricalFocalCrossentropy(), "CategoricalFocalCrossentropy"))
  def test_refuses_unsupported_losses(self, loss, needle):
    model = head(3, "softmax")
    model.compile(optimizer="sgd", loss=loss)
    with self.assertRaises(UsageError) as raised:
      raw_loss(model)
    message = str(raised.exception)
    self.assertIn(needle, message)
    self.assertIn("supported: categorical_crossentropy", message)
    self.assertEqual(len(message.splitlines()), 1)

  def test_refuses_loss_weights_and_no_loss(self):
    model = head(3, "softmax")
    model.compile(optimizer="sgd", loss="mse", loss_weights=0.5)
    with self.assertRaisesRegex(UsageError, "loss_weights"):
      raw_loss(model)
    with self.assertRaisesRegex(UsageError, "no compiled loss"):
      raw_loss(head(3, "softmax"))

  @parameterized.named_parameters(
      ("binary_accuracy", "sigmoid", 1, "binary_crossentropy", "accuracy", "binary",
       "BinaryAccuracy"),
      ("sparse_accuracy", "softmax", 4, "sparse_categorical_crossentropy", "accuracy", "sparse",
       "SparseCategoricalAccuracy"),
      ("categorical_accuracy", "softmax", 4, "categorical_crossentropy", "acc", "one_hot",
       "CategoricalAccuracy"),
      ("threshold", "sigmoid", 1, "binary_crossentropy",
       keras.metrics.BinaryAccuracy(threshold=0.7), "binary", "BinaryAccuracy"),
      ("mse", None, 1, "mse", "mse", "scalar", "MeanSquaredError"),
      ("mae", None, 3, "mse", keras.metrics.MeanAbsoluteError(), "real", "MeanAbsoluteError"))
  def test_metric_sum_matches_keras_total(self, activation, units, loss, metric, kind,
                                          class_name):
    model = head(units, activation)
    model.compile(optimizer="sgd", loss=loss, metrics=[metric, "mae"])
    y = labels(kind, units, self.rng)
    name, fn = raw_metric(model)
    self.assertEqual(raw_metric(model, y)[0], name)
    y_pred = model(self.x, training=True)
    keras_metric = keras.src.trainers.compile_utils.get_metric(
        model._compile_config.config["metrics"][0], tf.constant(y), y_pred)
    self.assertEqual(type(keras_metric).__name__, class_name)
    self.assertEqual(keras_metric.name, name)
    keras_metric.update_state(tf.constant(y), y_pred)
    values = fn(tf.constant(y), y_pred)
    self.assertEqual(values.shape, (N,))
    self.assertTrue(np.array_equal(tf.reduce_sum(values).numpy(), keras_metric.total.numpy()))
    self.assertEqual(float(keras_metric.count.numpy()), N)

  def test_unsupported_metric_is_none(self):
    model = head(1, "sigmoid")
    model.compile(optimizer="sgd", loss="binary_crossentropy", metrics=[keras.metrics.AUC()])
    self.assertIsNone(raw_metric(model))
    model.compile(optimizer="sgd", loss="binary_crossentropy")
    self.assertIsNone(raw_metric(model))


if __name__ == "__main__":
  tf.test.main()
