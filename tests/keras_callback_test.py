"""bnraw.diagnosis.callback.BNDiagnosis in a user's own fit: training unchanged, the parts right."""

import io
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from bnraw.diagnosis.callback import BNDiagnosis
from tests.tracing.trace_test import read_events


def user_model():
  inputs = keras.Input((6, 6, 2))
  h = keras.layers.Conv2D(4, 3, name="conv")(inputs)
  h = keras.layers.BatchNormalization(momentum=0.9, name="bn_conv")(h)
  h = keras.layers.ReLU()(h)
  h = keras.layers.Flatten()(h)
  h = keras.layers.Dropout(0.3)(h)
  h = keras.layers.Dense(8, activation="relu")(h)
  frozen = keras.layers.BatchNormalization(name="bn_frozen")
  h = frozen(h)
  frozen.trainable = False  # a fine-tune's frozen BN: inference branch inside fit
  model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(h), name="user")
  model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
  return model


def train(callbacks):
  keras.utils.set_random_seed(1)
  rng = np.random.default_rng(0)
  x = rng.normal(1.0, 2.0, (48, 6, 6, 2)).astype(np.float32)
  y = rng.integers(0, 3, 48)
  model = user_model()
  model.fit(x, y, batch_size=16, epochs=3, shuffle=True, verbose=0,
            callbacks=callbacks(x, y))
  return model, x, y


class BNDiagnosisTest(tf.test.TestCase):

  def test_unsupported_models_are_refused_before_anything_is_written(self):
    inner = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.BatchNormalization()],
                             name="backbone")
    model = keras.Sequential([keras.Input((6, 6, 2)), inner, keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    x, y = np.zeros((4, 6, 6, 2), np.float32), np.zeros(4)
    with tempfile.TemporaryDirectory() as tmp:
      log_dir = os.path.join(tmp, "bn")
      with self.assertRaisesRegex(ValueError, "nested model 'backbone'"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[BNDiagnosis(x, y, log_dir=log_dir)])
      self.assertFalse(os.path.exists(log_dir))
    with self.assertRaisesRegex(ValueError, "x has 4 examples and y 3"):
      model.fit(x, y, epochs=1, verbose=0, callbacks=[BNDiagnosis(x, y[:3])])


  def test_training_is_bit_identical_and_the_parts_are_keras_own(self):
    plain, _, _ = train(lambda x, y: [])
    with tempfile.TemporaryDirectory() as log_dir:
      report = io.StringIO()
      made = []

      def with_callback(x, y):
        made.append(BNDiagnosis(x, y, every=1, log_dir=log_dir, batch_size=16, stream=report))
        return made

      model, x, y = train(with_callback)
      for a, b in zip(model.weights, plain.weights):  # moving statistics included
        self.assertAllEqual(a.numpy(), b.numpy(), msg=a.path)
      callback, = made
      self.assertEqual([h["epoch"] for h in callback.history], [1, 2, 3])
      result = callback.result
      self.assertEqual(result["frozen"], ["bn_frozen"])
      frozen_part, = [p["contribution"] for p in result["per_layer"] if p["layer"] == "bn_frozen"]
      self.assertEqual(frozen_part, 0.0)  # fit used its moving statistics: nothing to blame
      evaluate = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
      self.assertAllClose(result["losses"]["evaluate"], evaluate["loss"], rtol=1e-5)
      self.assertEqual(result["losses"]["fit"], model.history.history["loss"][-1])
      # the model's own metric, read from fit's logs under its name; evaluate's value beside it
      self.assertEqual(result["metric"], {"name": "accuracy",
                                          "class": "SparseCategoricalAccuracy"})
      self.assertEqual(result["accuracy"]["fit"], model.history.history["accuracy"][-1])
      self.assertAllClose(result["accuracy"]["evaluate"], evaluate["accuracy"], rtol=1e-6)
      self.assertAllClose(result["attribution"]["weight_update"],
                          result["losses"]["train_mode_final"] - result["losses"]["fit"])
      self.assertIn("evaluate - fit, split by cause", report.getvalue())
      self.assertIn("frozen BN layers", report.getvalue())
      events = read_events(log_dir)
      self.assertEqual(sorted(events["diagnosis/evaluate"]), [1, 2, 3])
      self.assertAllClose(events["diagnosis/evaluate"][3], result["losses"]["evaluate"])
      self.assertIn("diagnosis/report", events)

  def test_a_dataset_gives_the_arrays_result_and_a_bad_one_is_one_line(self):
    """BNDiagnosis(dataset) with (x, y) elements, batched: the same losses as on the arrays."""
    results = []

    def callbacks(x, y, dataset):
      results.append(BNDiagnosis(dataset(x, y)) if dataset else BNDiagnosis(x, y))
      results[-1].stream = None
      return results[-1:]

    batched = lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    for dataset in (None, batched):
      train(lambda x, y: callbacks(x, y, dataset))
    self.assertEqual(results[0].result["losses"], results[1].result["losses"])
    with self.assertRaisesRegex(ValueError, r"BNDiagnosis: the dataset: elements must be \(x, y\)"):
      train(lambda x, y: [BNDiagnosis(tf.data.Dataset.from_tensor_slices(x))])


if __name__ == "__main__":
  tf.test.main()
