"""The decomposition's targets, PreciseBN in closed form, and user Keras models."""

import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from bnraw import diagnosis, training
from bnraw.core import loop
from bnraw.diagnosis import decompose
from bnraw.models import seed
from bnraw.config import DataConfig, ModelConfig, TrainConfig
from bnraw.diagnosis.decompose import ATTRIBUTION, LOSS_KEYS
from bnraw.errors import UsageError
from tests.tracing.trace_test import read_events
from bnraw.diagnosis.precise_bn import aggregate, raw_population_statistics
from bnraw.models.workload import from_seed

TINY = dict(width=1 / 32)


def run(tmp, impl="raw", momentum=0.9, batch_size=256, epochs=3, bessel=False, fix=None,
        every=0, trace=False):
  return diagnosis.run(from_seed(
                       DataConfig(), ModelConfig(momentum=momentum, bessel=bessel, **TINY),
                       TrainConfig(batch_size=batch_size, epochs=epochs, mode="function")),
                       out_dir=tmp, impl=impl, fix=fix, every=every, trace=trace, progress=False)


class DecompositionTest(tf.test.TestCase):

  def test_fit_and_evaluate_match_a_separate_training_run(self):
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as other:
      d = run(tmp, batch_size=96, epochs=2)  # batches of 96, 96, 64
      losses = d["losses"]
      # the same setup trained by the train tool: fit's history and model.evaluate's loop
      summary = training.run(from_seed(DataConfig(), ModelConfig(momentum=0.9, **TINY),
                                       TrainConfig(batch_size=96, epochs=2, mode="function")),
                             out_dir=other, progress=False)
      self.assertEqual(losses["fit"], summary["history"]["loss"][-1])
      self.assertAllClose(losses["evaluate"], summary["evaluate"]["loss"], rtol=1e-6)
      self.assertAllClose(d["accuracy"]["evaluate"], summary["evaluate"]["accuracy"])
      self.assertNotEqual(d["attribution"]["batch_vs_population"], 0.0)
      with open(os.path.join(tmp, "diagnosis.json")) as f:
        saved = json.load(f)
      self.assertEqual(set(saved["losses"]), set(LOSS_KEYS))
      self.assertEqual(set(saved["attribution"]), {k for k, _, _ in ATTRIBUTION})
      self.assertEqual(set(saved["accuracy"]), set(LOSS_KEYS))
      self.assertLen(saved["per_layer"], 8)

  def test_full_batch_momentum_zero(self):
    with tempfile.TemporaryDirectory() as tmp:
      d = run(tmp, momentum=0.0, fix="precise_bn")
      losses, parts = d["losses"], d["attribution"]
      self.assertAllClose(losses["precise_bn"], losses["train_mode_final"], rtol=1e-6)
      self.assertAllClose(parts["ema_lag"], 0.0, atol=1e-6 * losses["evaluate"])
      self.assertAllClose(parts["bessel"], 0.0, atol=1e-6 * losses["evaluate"])
      self.assertNotEqual(parts["stale_statistics"], 0.0)  # what momentum 0 cannot remove
      self.assertAllClose(d["fixed"]["evaluate"]["loss"], losses["precise_bn"], rtol=1e-6)
      self.assertTrue(os.path.exists(os.path.join(tmp, "fixed", "ckpt.index")))

  def test_bessel_part_and_replayed_variance(self):
    with tempfile.TemporaryDirectory() as tmp:
      d = run(tmp, momentum=0.0, bessel=True)
      # momentum 0: the moving statistics are the last batch's, so only the Bessel factor remains
      self.assertAllClose(d["losses"]["no_bessel"], d["losses"]["last_batch_stats"], rtol=1e-6)
      self.assertNotEqual(d["attribution"]["bessel"], 0.0)

  def test_keras_and_raw_agree(self):
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
      raw, ker = run(a, epochs=3), run(b, impl="keras", epochs=3)
      for key in LOSS_KEYS:
        self.assertAllClose(ker["losses"][key], raw["losses"][key], rtol=1e-6, msg=key)
      for key, _, _ in ATTRIBUTION:
        self.assertAllClose(ker["attribution"][key], raw["attribution"][key],
                            atol=1e-6 * raw["losses"]["evaluate"], msg=key)
      # the per-layer split, computed by swapping statistics inside real Keras BN layers
      for a, b in zip(ker["per_layer"], raw["per_layer"]):
        self.assertEqual(a["layer"], b["layer"])
        self.assertAllClose(a["contribution"], b["contribution"],
                            atol=1e-5 * raw["losses"]["evaluate"], msg=a["layer"])

  def test_over_time_and_trace(self):
    with tempfile.TemporaryDirectory() as tmp:
      d = run(tmp, epochs=4, every=2, trace=True)
      self.assertEqual([row["epoch"] for row in d["over_time"]], [2])
      self.assertTrue(os.path.exists(os.path.join(tmp, "trace.npz")))
      events = read_events(os.path.join(tmp, "tensorboard"))
      for key, value in d["over_time"][0]["losses"].items():
        self.assertAllClose(events[f"diagnosis/{key}"][2], value, msg=key)


class MixedPrecisionDiagnosisTest(tf.test.TestCase):

  def test_watcher_replays_the_statistics_without_skipped_steps(self):
    from bnraw.core.loop import StepRecord
    from bnraw.diagnosis.decompose import StatisticsWatcher
    net = seed.seed_network(ModelConfig(width=1 / 64, momentum=0.5))
    watcher = StatisticsWatcher(net)
    rng = np.random.default_rng(0)
    sizes = [layer.moving_mean.shape[0] for layer in net.batch_norms]
    real = [(np.zeros(c), np.ones(c)) for c in sizes]  # what the writer does: every step
    without = [(np.zeros(c), np.ones(c)) for c in sizes]  # the oracle: applied steps only
    for step, skipped in enumerate([False, True, False, True, True, False]):
      batch = [(rng.normal(size=c), rng.uniform(0.5, 2, size=c)) for c in sizes]
      ema = lambda old, new: [(0.5 * m + 0.5 * bm, 0.5 * v + 0.5 * bv)
                              for (m, v), (bm, bv) in zip(old, new)]
      real = ema(real, batch)
      if not skipped:
        without = ema(without, batch)
      trace = {"batch_mean": [b[0].astype(np.float32) for b in batch],
               "batch_variance": [b[1].astype(np.float32) for b in batch],
               "moving_mean_after": [r[0].astype(np.float32) for r in real],
               "moving_variance_after": [r[1].astype(np.float32) for r in real]}
      watcher(StepRecord(0, step, np.arange(4), 1.0, 0.0, trace, 1.0, skipped))
    self.assertEqual((watcher.steps, watcher.skipped_steps), (6, 3))
    self.assertEqual(watcher.skipped_at, [1, 3, 4])
    for replayed, (mean, variance) in zip(watcher.without_skipped, without):
      self.assertAllClose(replayed.mean, mean, rtol=1e-6, atol=1e-7)
      self.assertAllClose(replayed.variance, variance, rtol=1e-6)

  def test_every_step_skipped_prices_the_statistics_against_the_untouched_model(self):
    # A scale of 1e30 overflows every float16 gradient: the weights never move, so without the
    # skipped steps' statistics the model is the untrained one, evaluated independently here.
    model = ModelConfig(width=1 / 64, dtype_policy="mixed_float16")
    train = TrainConfig(batch_size=256, epochs=2, mode="function", loss_scale=1e30)
    with tempfile.TemporaryDirectory() as tmp:
      d = diagnosis.run(from_seed(DataConfig(), model, train), out_dir=tmp, progress=False,
                        tensorboard=False)
    scaling = d["loss_scaling"]
    self.assertEqual((scaling["steps"], scaling["skipped_steps"]), (2, 2))
    fresh = seed.build(DataConfig(), model, train)
    untrained, _ = loop.evaluate(fresh.model, fresh.data.images, fresh.data.labels,
                                 batch_size=256, mode="function")
    self.assertAllClose(scaling["evaluate_without_skipped_updates"], untrained, rtol=1e-6)
    self.assertNotAllClose(d["losses"]["evaluate"], untrained, rtol=1e-4)  # the stats moved
    rows = d["precision"]["statistics_vs_float32"]
    self.assertLen(rows, 8)
    for row in rows:  # float16 rounding: visible, and far below 1
      self.assertBetween(row["mean_max_rel"], 1e-7, 0.05)
      self.assertBetween(row["variance_max_rel"], 1e-7, 0.05)

  def test_a_saved_mixed_model_is_measured_against_its_float32_twin(self):
    from bnraw.diagnosis.precision import keras_twin
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
      keras.utils.set_random_seed(0)
      model = user_model()
    finally:
      keras.mixed_precision.set_global_policy("float32")
    twin = keras_twin(model)
    self.assertEqual({layer.compute_dtype for layer in twin.layers}, {"float32"})
    for a, b in zip(twin.weights, model.weights):
      self.assertAllEqual(a, b)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, (20, 8, 8, 3)).astype(np.float32), rng.integers(0, 5, 20)
    with tempfile.TemporaryDirectory() as tmp:
      model.save(os.path.join(tmp, "m.keras"))
      np.savez(os.path.join(tmp, "d.npz"), x=x, y=y)
      d = diagnosis.run_saved(os.path.join(tmp, "m.keras"), os.path.join(tmp, "d.npz"),
                                    batch_size=20, out_dir=os.path.join(tmp, "out"),
                                    tensorboard=False)
    self.assertEqual(d["precision"]["dtype_policy"], "mixed_bfloat16")
    rows = d["precision"]["statistics_vs_float32"]
    self.assertEqual([r["layer"] for r in rows], [r["layer"] for r in d["per_layer"]])
    for row in rows:  # bfloat16 keeps 8 bits of mantissa: visible, well below 1
      self.assertBetween(row["mean_max_rel"], 1e-6, 0.1)


class KerasModelMetricTest(tf.test.TestCase):
  """The report's second column is the user's own compiled metric, at Keras fit's batch size."""

  def diagnose(self, model, x, y, **kwargs):
    with tempfile.TemporaryDirectory() as tmp:
      model.save(os.path.join(tmp, "m.keras"))
      np.savez(os.path.join(tmp, "d.npz"), x=x, y=y)
      return diagnosis.run_saved(os.path.join(tmp, "m.keras"), os.path.join(tmp, "d.npz"),
                                       out_dir=os.path.join(tmp, "out"), tensorboard=False,
                                       **kwargs)

  def test_sigmoid_head_over_a_frozen_base(self):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(48, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)[:, None]  # half ones: not the fraction of zeros
    keras.utils.set_random_seed(1)
    base = keras.layers.BatchNormalization(name="base_bn")
    base.trainable = False
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), base,
                              keras.layers.ReLU(), keras.layers.Dense(4),
                              keras.layers.BatchNormalization(name="head_bn"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    d = self.diagnose(model, x, y, batch_size=None)
    self.assertIn("batch 32 (Keras fit's default", d["title"])
    self.assertEqual(d["metric"], {"name": "accuracy", "class": "BinaryAccuracy"})
    evaluate = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    self.assertAllClose(d["accuracy"]["evaluate"], evaluate["accuracy"], rtol=1e-6)
    self.assertAllClose(d["losses"]["evaluate"], evaluate["loss"], rtol=1e-5)
    # the frozen layer ran its inference branch in fit: nothing of the gap is its own
    self.assertEqual(d["frozen"], ["base_bn"])
    self.assertEqual(d["per_layer"][0], {"layer": "base_bn", "contribution": 0.0})

  def test_a_metric_of_the_whole_data_is_accumulated_as_evaluate_does(self):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=40) > 0).astype(np.float32)[:, None]
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4),
                              keras.layers.BatchNormalization(),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy", metrics=[keras.metrics.AUC(name="auc")])
    d = self.diagnose(model, x, y, batch_size=10, fix="precise_bn")
    self.assertEqual(d["metric"], {"name": "auc", "class": "AUC"})
    evaluate = model.evaluate(x, y, batch_size=10, verbose=0, return_dict=True)
    self.assertAllClose(d["accuracy"]["evaluate"], evaluate["auc"], rtol=1e-6)  # not per batch
    self.assertIn("fixed model: evaluate loss", diagnosis.explain.fixed_line(d))

  def test_dropout_is_measured_apart_from_bn(self):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    keras.utils.set_random_seed(4)
    layers = keras.layers
    model = keras.Sequential([keras.Input((5,)), layers.Dense(8, name="d1"),
                              layers.BatchNormalization(name="bn"), layers.ReLU(),
                              layers.Dropout(0.5, name="drop"),
                              layers.Dense(3, activation="softmax", name="d2")])
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=10, epochs=2, verbose=0)
    first, again = (self.diagnose(model, x, y, batch_size=10) for _ in range(2))
    self.assertEqual(first["losses"], again["losses"])  # deterministic, dropout and all
    self.assertEqual(first["dropout"], again["dropout"])
    self.assertEqual(first["dropout"]["layers"], ["drop"])
    # the oracle: the same weights in a model built without the Dropout layer at all
    plain = keras.Sequential([keras.Input((5,)), layers.Dense(8), layers.BatchNormalization(),
                              layers.ReLU(), layers.Dense(3, activation="softmax")])
    plain.compile(loss="sparse_categorical_crossentropy")
    plain.set_weights(model.get_weights())
    order = np.random.default_rng(0).permutation(40)  # the diagnosis's shuffled batches
    train_mode, _ = decompose.keras_loss(plain, x, y, 10, training=True, order=order)
    self.assertAllClose(first["losses"]["train_mode_final"], train_mode, rtol=1e-6)
    self.assertNotAllClose(first["dropout"]["train_mode_with_dropout"], train_mode, rtol=1e-3)

  def test_regression_model_has_no_metric(self):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 5)).astype(np.float32)
    y = x.sum(1, keepdims=True)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4),
                              keras.layers.BatchNormalization(), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    d = self.diagnose(model, x, y, batch_size=10, fix="precise_bn")
    self.assertIsNone(d["metric"])
    self.assertIsNone(d["accuracy"]["evaluate"])
    self.assertIn("(the model has no compiled metric)", diagnosis.report(d))
    self.assertIn("no metric n/a", diagnosis.explain.fixed_line(d))


class PreciseBNTest(tf.test.TestCase):

  def test_aggregate_closed_form(self):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((50, 3)) * [1, 2, 3] + [0, 1, -1]
    parts = [(chunk.mean(0), chunk.var(0), len(chunk)) for chunk in np.split(data, [20, 35])]
    stats = aggregate(parts)
    self.assertAllClose(stats.mean, data.mean(0), rtol=1e-6)
    self.assertAllClose(stats.variance, data.var(0), rtol=1e-6)

  def test_batched_against_float64_truth(self):
    parts = seed.build(DataConfig(), ModelConfig(**TINY), TrainConfig())
    net, images = parts.model, parts.data.images
    whole = raw_population_statistics(net, images, 256)  # one tf.nn.moments pass, as Keras
    batched = raw_population_statistics(net, images, 100)  # float64 aggregation of 3 batches
    first = net.layer("relu_1")(net.layer("conv_1")(tf.constant(images), training=False),
                                training=False)
    flat = first.numpy().reshape(-1, first.shape[-1]).astype(np.float64)
    # Layer 1: the batched aggregate is accurate; a single float32 reduction over 135k values
    # per channel (tf.nn.moments, what Keras uses) is measurably off (3e-3 seen).
    self.assertAllClose(batched[0].mean, flat.mean(0), rtol=1e-5)
    self.assertAllClose(batched[0].variance, flat.var(0), rtol=1e-4)
    self.assertAllClose(whole[0].variance, flat.var(0), rtol=1e-2)
    # Deeper layers inherit the differences, magnified by small-variance channels.
    for a, b in zip(whole, batched):
      self.assertAllClose(a.mean, b.mean, rtol=1e-2, atol=1e-6)
      self.assertAllClose(a.variance, b.variance, rtol=1e-2, atol=1e-6)

  def test_the_first_k_batches_alone(self):
    """``precise_bn_batches=K``: the statistics of the data's first K batches and nothing
    else. The first BN layer of the seed normalises relu_1's output, so its truth is the
    float64 moments of that output over those examples alone; on a Keras model whose first
    layer is BN on the input, the float64 moments of the input rows."""
    from bnraw.diagnosis.precise_bn import keras_population_statistics, precise_bn_data
    parts = seed.build(DataConfig(), ModelConfig(**TINY), TrainConfig())
    net, images = parts.model, parts.data.images
    got = raw_population_statistics(net, images, 40, most=2)
    first = net.layer("relu_1")(net.layer("conv_1")(tf.constant(images[:80]), training=False),
                                training=False)
    flat = first.numpy().reshape(-1, first.shape[-1]).astype(np.float64)
    self.assertAllClose(got[0].mean, flat.mean(0), rtol=1e-5)
    self.assertAllClose(got[0].variance, flat.var(0), rtol=1e-4)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((30, 4)) * [1, 2, 3, 4] + [0, 1, 2, 3]).astype(np.float32)
    x[12:] += 100.0  # what PreciseBN must not read
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.BatchNormalization()(inputs)))
    (stats,) = keras_population_statistics(model, x, 4, most=3)  # the first 12 rows
    self.assertAllClose(stats.mean, x[:12].astype(np.float64).mean(0), rtol=1e-6)
    self.assertAllClose(stats.variance, x[:12].astype(np.float64).var(0), rtol=1e-5)
    self.assertEqual(precise_bn_data(30, 4, 3), {"batches": 3, "examples": 12,
                                                  "of_examples": 30})
    self.assertEqual(precise_bn_data(30, 4, None), {"batches": 8, "examples": 30,
                                                     "of_examples": 30})


def user_model():
  inputs = keras.Input((8, 8, 3))
  h = keras.layers.Conv2D(4, 3)(inputs)
  h = keras.layers.BatchNormalization(momentum=0.5)(h)
  h = keras.layers.ReLU()(h)
  h = keras.layers.GlobalAveragePooling2D()(h)
  h = keras.layers.Dense(6, activation="relu")(h)
  h = keras.layers.BatchNormalization(momentum=0.5)(h)
  outputs = keras.layers.Dense(5, activation="softmax")(h)
  model = keras.Model(inputs, outputs)
  model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
  return model


class UserKerasModelTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.x = rng.uniform(0, 1, (40, 8, 8, 3)).astype(np.float32)
    self.y = rng.integers(0, 5, 40)
    keras.utils.set_random_seed(0)
    self.model = user_model()
    self.model.fit(self.x, self.y, batch_size=10, epochs=2, verbose=0)
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp)
    self.model_path = os.path.join(self.tmp, "m.keras")
    self.data_path = os.path.join(self.tmp, "d.npz")
    self.model.save(self.model_path)
    np.savez(self.data_path, x=self.x, y=self.y)

  def test_functional_model_diagnosis(self):
    out = os.path.join(self.tmp, "out")
    d = diagnosis.run_saved(self.model_path, self.data_path, batch_size=16,
                                  out_dir=out, fix="precise_bn")
    evaluate = self.model.evaluate(self.x, self.y, batch_size=16, verbose=0, return_dict=True)
    self.assertAllClose(d["losses"]["evaluate"], evaluate["loss"], rtol=1e-5)
    self.assertIsNone(d["losses"]["fit"])
    self.assertLen(d["per_layer"], 2)
    self.assertAllClose(d["fixed"]["evaluate"]["loss"], d["losses"]["precise_bn"], rtol=1e-6)
    # The fixed model's first BN holds the population moments of the conv output.
    fixed = keras.models.load_model(d["fixed"]["saved"])
    conv_out = fixed.layers[1](self.x).numpy().reshape(-1, 4)
    bn = fixed.layers[2]
    self.assertAllClose(bn.moving_mean, conv_out.mean(0), rtol=1e-4, atol=1e-6)
    self.assertAllClose(bn.moving_variance, conv_out.var(0), rtol=1e-4, atol=1e-6)
    # The first layer's part: Keras's own evaluate with only that layer's statistics swapped.
    swapped = keras.models.load_model(self.model_path)
    swapped.layers[2].set_weights(bn.get_weights())
    loss = swapped.evaluate(self.x, self.y, batch_size=16, verbose=0, return_dict=True)["loss"]
    self.assertAllClose(d["per_layer"][0]["contribution"], evaluate["loss"] - loss,
                        rtol=1e-4, atol=1e-6)

  def save(self, model, name):
    path = os.path.join(self.tmp, name)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.save(path)
    return path

  def npz(self, name, *unnamed, **arrays):
    path = os.path.join(self.tmp, name)
    np.savez(path, *unnamed, **arrays)
    return path

  def test_bad_inputs(self):
    layers = keras.layers
    no_bn = self.save(keras.Sequential([keras.Input((8, 8, 3)), layers.Flatten(),
                                        layers.Dense(5, activation="softmax")]), "nobn.keras")
    inner = keras.Sequential([keras.Input((8, 8, 3)), layers.BatchNormalization()],
                             name="inner")
    nested = self.save(keras.Sequential([keras.Input((8, 8, 3)), inner, layers.Flatten(),
                                         layers.Dense(5, activation="softmax")]),
                       "nested.keras")
    a, b = keras.Input((8, 8, 3), name="left"), keras.Input((8, 8, 3), name="right")
    h = layers.BatchNormalization()(layers.Add()([a, b]))
    two_inputs = self.save(keras.Model([a, b], layers.Dense(5, activation="softmax")(
        layers.Flatten()(h))), "two.keras")
    channels_first = self.save(keras.Sequential([
        keras.Input((3, 8, 8)), layers.Conv2D(4, 3, data_format="channels_first", name="cf"),
        layers.BatchNormalization(axis=1), layers.Flatten(),
        layers.Dense(5, activation="softmax")]), "cf.keras")
    corrupt = os.path.join(self.tmp, "corrupt.keras")
    with open(corrupt, "wb") as f:
      f.write(b"PK\x03\x04 not really a zip")
    x = np.zeros((4, 8, 8, 3), np.float32)
    nan_x = x.copy()
    nan_x[0, 0, 0, :2] = np.nan
    cases = [
        ((no_bn, self.data_path), "keras_model: .* no BatchNormalization"),
        ((nested, self.data_path), "keras_model: .*nested model 'inner'"),
        ((two_inputs, self.data_path), r"keras_model: .* takes 2 inputs \(left, right\)"),
        ((channels_first, self.data_path),
         "keras_model: layer 'cf' \\(Conv2D\\) uses data_format='channels_first'"),
        ((corrupt, self.data_path), "keras_model: .* not a valid .keras file"),
        ((self.tmp, self.data_path), "keras_model: .* is a directory"),
        ((os.path.join(self.tmp, "nope.keras"), self.data_path), "keras_model: no such"),
        ((self.data_path, self.data_path), "keras_model: .* is not a .keras"),
        ((self.model_path, self.npz("wrong.npz", x=np.zeros((4, 9, 9, 3)), y=np.zeros(4))),
         r"data: x examples have shape \(9, 9, 3\)"),
        ((self.model_path, self.npz("unnamed.npz", np.zeros(3))), "data: .* arrays named x"),
        ((self.model_path, self.npz("shape.npz", x=x, y=np.zeros((4, 7)))),
         r"data: y \(shape \(4, 7\)\) does not fit the model's output"),
        ((self.model_path, self.npz("strings.npz", x=x, y=np.array(["a", "b", "c", "d"]))),
         "data: y holds <U1 values; bnraw needs numbers"),
        ((self.model_path, self.npz("nan.npz", x=nan_x, y=np.zeros(4))),
         r"data: x holds 2 non-finite values"),
        ((self.model_path, self.npz("nan_y.npz", x=x, y=np.array([0, np.inf, 1, 2]))),
         r"data: y holds 1 non-finite values"),
        ((self.model_path, self.npz("short.npz", x=x, y=np.zeros(3))),
         "data: x has 4 examples and y 3"),
    ]
    for (model_path, data_path), pattern in cases:
      with self.subTest(pattern=pattern):
        with self.assertRaisesRegex(UsageError, pattern):
          diagnosis.run_saved(model_path, data_path, batch_size=8,
                                    out_dir=os.path.join(self.tmp, "never"))
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "never")))

  def test_an_earlier_run_is_refused_unless_overwritten(self):
    out = os.path.join(self.tmp, "run")
    run = lambda **kw: diagnosis.run_saved(self.model_path, self.data_path, batch_size=16,
                                                 out_dir=out, **kw)
    run(fix="precise_bn")
    with open(os.path.join(out, "notes.txt"), "w") as f:
      f.write("mine")
    with self.assertRaisesRegex(UsageError, "out_dir: .* holds an earlier run "
                                r"\(diagnosis.json, tensorboard, fixed.keras\)"):
      run()
    run(overwrite=True)
    self.assertEqual(sorted(os.listdir(out)), ["diagnosis.json", "notes.txt", "tensorboard"])


class ReportTest(tf.test.TestCase):

  def diagnosis(self, losses, accuracy=0.5):
    from bnraw.diagnosis.decompose import attribution
    return {"losses": losses, "attribution": attribution(losses),
            "accuracy": {k: accuracy for k in LOSS_KEYS},
            "per_layer": [{"layer": "bn_1", "contribution": losses["evaluate"] -
                           losses["precise_bn"]}]}

  def test_dominant_cause_and_fix(self):
    from bnraw.diagnosis.explain import report
    text = report(self.diagnosis({"fit": 1.0, "train_mode_final": 0.9, "precise_bn": 0.9,
                                  "last_batch_stats": 3.0, "no_bessel": 3.2, "evaluate": 3.2}))
    self.assertIn("gap            loss +2.2000", text)
    self.assertIn("stale_statistics       +2.1000  (87.5% of |parts|)", text)
    self.assertIn("dominant cause: stale_statistics (+2.1000)", text)
    self.assertIn("--fix precise_bn", text)

  def test_no_gap(self):
    from bnraw.diagnosis.explain import report
    same = dict.fromkeys(LOSS_KEYS, 5.5452)
    text = report(self.diagnosis(same, accuracy=1 / 256))
    self.assertIn("no gap to explain", text)
    self.assertIn("chance level", text)
    self.assertNotIn("dominant cause", text)


if __name__ == "__main__":
  tf.test.main()
