"""A user's Keras model's raw twin (bnraw.models.twin) against that model's own fit, on the zoo
(tests/models/zoo.py): compare, train's trained.keras, and the diagnosis with history."""

import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from bnraw.config import TrainConfig
from bnraw.errors import UsageError
from bnraw.models.workload import from_keras_file
from tests.models import zoo

TRAIN = TrainConfig(batch_size=zoo.BATCH_SIZE, epochs=1, mode="function")


@pytest.fixture(scope="module")
def saved():
  with tempfile.TemporaryDirectory() as directory:
    yield lambda name: zoo.save(name, directory)


# every model under tf.function; under XLA the convolution kinds, dropout and symbolic ops (the
# first seven were bit-identical under XLA too when measured by hand: closing note of issue 12)
PARITY = ([(name, "function") for name in sorted(zoo.ZOO)]
          + [(name, "xla") for name in ("mlp_dropout", "resnet", "separable",
                                        "hard_swish_se", "opaque")])


@pytest.mark.parametrize("name,mode", PARITY)
def test_every_step_is_bit_identical_to_the_models_own_fit(saved, name, mode):
  """Synced, every step (two full batches and a partial one): loss, every weight and moving
  statistic equal to the last bit, and evaluate too; fit with jit_compile as the raw mode."""
  import dataclasses
  from bnraw import parity
  from bnraw.models.workload import from_keras_file
  result = parity.run(from_keras_file(*saved(name), dataclasses.replace(TRAIN, mode=mode)),
                      out_dir=None)
  assert result["mode"] == mode
  assert len(result["steps"]) == 3
  assert result["first_divergent_step"] is None
  assert result["bit_identical_steps"] == 3, result["steps"]
  assert result["evaluate"]["loss_rel_diff"] == 0


def test_trained_keras_evaluates_to_the_raw_twins_evaluate(saved):
  """bnraw-train --keras_model writes trained.keras; Keras's own evaluate of it is the twin's."""
  import keras
  from bnraw import training
  model_path, data_path = saved("nested")
  with tempfile.TemporaryDirectory() as out:
    summary = training.run(from_keras_file(model_path, data_path, TRAIN), out_dir=out,
                           progress=False)
    trained = keras.models.load_model(os.path.join(out, "trained.keras"))
    with np.load(data_path) as data:
      keras_eval = trained.evaluate(data["x"], data["y"], batch_size=zoo.BATCH_SIZE, verbose=0,
                                    return_dict=True)
  assert summary["metric"] == "accuracy"
  assert int(trained.optimizer.iterations.numpy()) == summary["steps_done"] == 6  # 3 saved + 3
  assert abs(keras_eval["loss"] - summary["evaluate"]["loss"]) <= 1e-6 * keras_eval["loss"]
  assert keras_eval["accuracy"] == pytest.approx(summary["evaluate"]["accuracy"], abs=1e-7)


# The one-pass moments of a synchronized BN on inputs with mean 20 (E[x^2] - E[x]^2 in float32)
# lose about 400 ulps of the variance: the statistics fit uses there are that far from exact.
ORACLE_RTOL = {"synchronized": 2e-3}


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_diagnosis_with_history_sums_and_precise_bn_is_the_population(saved, name):
  """--epochs=K on every zoo model: the five parts sum to the gap, the per-layer parts to
  evaluate - precise_bn, and every top-level BN layer's PreciseBN statistics (written into
  fixed.keras) are the float64 moments of its input over the whole data, computed here with a
  Keras probe of fixed.keras (layers before it already holding theirs)."""
  import keras
  from bnraw import diagnosis
  model_path, data_path = saved(name)
  with tempfile.TemporaryDirectory() as out:
    result = diagnosis.run(from_keras_file(model_path, data_path, TRAIN), out_dir=out,
                           fix="precise_bn", tensorboard=False, progress=False)
    fixed = keras.models.load_model(result["fixed"]["saved"])
  losses = result["losses"]
  gap = losses["evaluate"] - losses["fit"]
  assert sum(result["attribution"].values()) == pytest.approx(gap, abs=1e-6 * max(1, abs(gap)))
  assert sum(p["contribution"] for p in result["per_layer"]) == pytest.approx(
      losses["evaluate"] - losses["precise_bn"], abs=1e-6)
  assert result["fixed"]["evaluate"]["loss"] == pytest.approx(losses["precise_bn"], rel=1e-6)
  with np.load(data_path) as data:
    x = data["x"]
  top = [layer for layer in fixed.layers
         if type(layer).__name__ == "BatchNormalization" and layer.trainable]
  for layer in top:
    h = np.asarray(keras.Model(fixed.inputs, layer.input)(x, training=False), np.float64)
    axis = layer.axis % h.ndim
    axes = tuple(a for a in range(h.ndim) if a != axis)
    rtol = ORACLE_RTOL.get(name, 1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), h.mean(axes), rtol=rtol, atol=1e-5,
                               err_msg=f"{name} {layer.name} mean")
    np.testing.assert_allclose(layer.moving_variance.numpy(), h.var(axes), rtol=rtol,
                               err_msg=f"{name} {layer.name} variance")


def test_frozen_bn_fine_tune_diagnosis(saved):
  """--epochs=K on a frozen base: the frozen layer is named, contributes nothing and keeps its
  statistics in the fix."""
  import keras
  from bnraw import diagnosis
  model_path, data_path = saved("frozen_bn")
  with tempfile.TemporaryDirectory() as out:
    result = diagnosis.run(from_keras_file(model_path, data_path, TRAIN), out_dir=out,
                           fix="precise_bn", tensorboard=False, progress=False)
    fixed = keras.models.load_model(result["fixed"]["saved"])
  assert result["frozen"] == ["base/bn"]
  frozen = next(p for p in result["per_layer"] if p["layer"] == "base/bn")
  assert frozen["contribution"] == 0
  base_bn = fixed.get_layer("base").get_layer("bn")
  original = keras.models.load_model(model_path).get_layer("base").get_layer("bn")
  np.testing.assert_array_equal(base_bn.moving_mean.numpy(), original.moving_mean.numpy())
  np.testing.assert_array_equal(base_bn.moving_variance.numpy(),
                                original.moving_variance.numpy())


def test_dropout_is_priced_apart_and_the_split_is_repeatable(saved):
  from bnraw import diagnosis
  model_path, data_path = saved("mlp_dropout")
  runs = []
  for _ in range(2):
    with tempfile.TemporaryDirectory() as out:
      runs.append(diagnosis.run(from_keras_file(model_path, data_path, TRAIN), out_dir=out,
                                tensorboard=False, progress=False))
  assert runs[0]["losses"] == runs[1]["losses"]
  assert runs[0]["dropout"] == runs[1]["dropout"]
  assert [name.split("_")[0] for name in runs[0]["dropout"]["layers"]] == ["dropout"]
  assert runs[0]["dropout"]["effect"] != 0


def test_an_unsupported_layer_is_one_line_naming_it(tmp_path):
  import keras
  from bnraw.models import twin
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                            keras.layers.BatchNormalization(),
                            keras.layers.GaussianNoise(0.1, name="noise"),
                            keras.layers.Dense(2, activation="softmax")])
  model.compile("adam", "sparse_categorical_crossentropy")
  with pytest.raises(UsageError) as error:
    twin.convert(model)
  message = str(error.value)
  assert "\n" not in message
  assert "'noise' (keras.src.layers.regularization.gaussian_noise.GaussianNoise)" in message
  assert "random numbers" in message and "docs/your-model.md" in message


def _custom(keras, name, call, build=None):
  methods = {"call": call, **({"build": build} if build else {})}
  return type(name, (keras.layers.Layer,), methods)(name=name.lower())


@pytest.mark.parametrize("make,problem", [
    (lambda keras: _custom(keras, "Counter", lambda self, x: (
        self.count.assign_add(1.0), x)[1], lambda self, shape: setattr(
            self, "count", self.add_weight(shape=(), initializer="zeros", trainable=False))),
     "writes counter/"),
    (lambda keras: _custom(keras, "Penalised", lambda self, x: (
        self.add_loss(keras.ops.mean(x)), x)[1]), "adds a loss"),
    (lambda keras: type("Holder", (keras.layers.Layer,), {
        "__init__": lambda self, **kw: (keras.layers.Layer.__init__(self, **kw), setattr(
            self, "bn", keras.layers.BatchNormalization()))[0],
        "call": lambda self, x, training=None: self.bn(x, training=training)})(name="holder"),
     "holds BatchNormalization"),
])
def test_an_opaque_layer_that_is_not_a_pure_function_is_refused(make, problem):
  """A layer without a hand-written twin runs as its own call only if that call is a pure
  function of its inputs and weights: state writes, losses and BN inside are one line."""
  import keras
  from bnraw.models import twin
  inp = keras.Input((4,))
  h = make(keras)(keras.layers.BatchNormalization()(keras.layers.Dense(3)(inp)))
  model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(h))
  model.compile("adam", "sparse_categorical_crossentropy")
  with pytest.raises(UsageError) as error:
    twin.convert(model)
  message = str(error.value)
  assert "\n" not in message and problem in message and "opaque node" in message


@pytest.mark.parametrize("make,named", [
    (lambda keras, x: keras.ops.image.resize(x, (2, 2)), "keras.src.ops.image.Resize"),
    (lambda keras, x: keras.ops.split(x, 2, axis=-1)[0], "returns 2 tensors"),
])
def test_an_unsupported_operation_is_one_line_naming_it(make, named):
  import keras
  from bnraw.models import twin
  inp = keras.Input((4, 4, 2))
  h = keras.layers.BatchNormalization()(keras.layers.Conv2D(2, 1)(inp))
  out = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(make(keras, h)))
  model = keras.Model(inp, out)
  model.compile("adam", "sparse_categorical_crossentropy")
  with pytest.raises(UsageError) as error:
    twin.convert(model)
  message = str(error.value)
  assert "\n" not in message and named in message and "operation '" in message


@pytest.mark.parametrize("tool,flag", [("bnraw-train", "--width=1/16"),
                                       ("bnraw-compare", "--optimizer=sgd"),
                                       ("bnraw-diagnose", "--momentum=0.5")])
def test_seed_flags_with_keras_model_are_refused_before_any_work(tmp_path, tool, flag):
  script = os.path.join(os.path.dirname(sys.executable), tool)
  done = subprocess.run([script, "--keras_model=m.keras", "--data=d.npz", flag,
                         f"--out_dir={tmp_path / 'out'}"], capture_output=True, text=True)
  assert done.returncode == 2
  assert done.stderr.strip().count("\n") == 0, done.stderr
  assert flag.split("=")[0][2:] in done.stderr and "--keras_model" in done.stderr
  assert not (tmp_path / "out").exists()


def test_saved_optimizer_state_reaches_the_twin(saved):
  """The zoo's files were fit one epoch: the twin starts from their moments and iterations."""
  import keras
  from bnraw.models import keras_bridge, twin
  model_path, _ = saved("separable")  # RMSprop: velocities
  kmodel = keras.models.load_model(model_path)
  converted = twin.convert(kmodel)
  keras_state = keras_bridge.get_state(kmodel.weights, kmodel.optimizer)
  assert keras_state["iterations"] == 3
  raw_state = converted.raw_state()
  assert raw_state["iterations"] == 3
  assert any(np.abs(slot).max() > 0 for group in keras_state["slots"] for slot in group)
  for raw_group, keras_group in zip(raw_state["slots"], keras_state["slots"]):
    for a, b in zip(raw_group, keras_group):
      np.testing.assert_array_equal(a, b)


def test_trace_break_at_and_inspect_name_nested_layers_by_path(saved):
  """--trace, --break_at and bnraw-inspect on a BN two models deep: the break sees the values the
  traced run recorded for that step. Step numbers go on from the saved optimizer's (3 steps)."""
  from bnraw import training
  from bnraw.tracing.store import Trace
  model_path, data_path = saved("nested")
  seen = []
  with tempfile.TemporaryDirectory() as traced, tempfile.TemporaryDirectory() as stopped:
    training.run(from_keras_file(model_path, data_path, TRAIN), out_dir=traced, trace=True,
                 progress=False)
    training.run(from_keras_file(model_path, data_path, TRAIN), out_dir=stopped, progress=False,
                 break_at=("backbone/block/bn", 4),
                 break_action=lambda layer, moving, batch: seen.append((layer.name, batch)))
    trace = Trace.load(traced)
    at = trace.at("backbone/block/bn", 4).values
    script = os.path.join(os.path.dirname(sys.executable), "bnraw-inspect")
    shown = subprocess.run([script, f"--run_dir={traced}", "--layer=backbone/block/bn",
                            "--step=4"], capture_output=True, text=True)
  assert list(trace.layers) == ["backbone/block/bn", "top_bn"]
  assert [name for name, _ in seen] == ["backbone/block/bn"]
  np.testing.assert_array_equal(seen[0][1].mean, at["batch_mean"])
  assert shown.returncode == 0, shown.stderr
  assert "backbone/block/bn at step 4" in shown.stdout


def test_an_interrupted_user_model_run_resumes_to_the_uninterrupted_one(saved):
  from bnraw import training
  model_path, data_path = saved("mlp_dropout")  # dropout: the seed states must resume too
  two = TrainConfig(batch_size=zoo.BATCH_SIZE, epochs=2, mode="function")
  with tempfile.TemporaryDirectory() as whole, tempfile.TemporaryDirectory() as parts:
    full = training.run(from_keras_file(model_path, data_path, two), out_dir=whole,
                        progress=False)
    training.run(from_keras_file(model_path, data_path, TRAIN), out_dir=parts, progress=False)
    resumed = training.resume(parts, epochs=2, progress=False)
  assert resumed["history"] == full["history"]
  assert resumed["evaluate"] == full["evaluate"]


def test_profile_times_the_twin_and_the_models_fit(saved):
  from bnraw import profiling
  result = profiling.run_keras_model(
      from_keras_file(*saved("bn_axis1"), TrainConfig(batch_size=zoo.BATCH_SIZE)), steps=2,
      warmup=0, rounds=1, raw_modes=["function"], keras_jit=[False])
  assert [(r["impl"], r["mode"]) for r in result["results"]] == [("raw", "function"),
                                                                   ("keras", "fit")]
  assert all(r["steps_timed"] == 2 and r["step_s_median"] > 0 for r in result["results"])
  assert result["ratio"]["exact_raw_over_best_keras"] > 0


CUSTOM_MODULE = '''
import keras


@keras.saving.register_keras_serializable(package="bnraw_cli_test")
class Shift(keras.layers.Layer):
  def build(self, shape):
    self.shift = self.add_weight(shape=(shape[-1],), initializer="zeros")

  def call(self, x):
    return x - self.shift
'''


def test_a_registered_custom_layer_loads_with_custom_objects_and_is_exact(tmp_path):
  """The user's module that registers the layer, imported by --custom_objects: the compare is
  bit-identical; without it, loading fails in one line, exit 2."""
  import keras
  from bnraw.models import user
  module = tmp_path / "my_layers.py"
  module.write_text(CUSTOM_MODULE)
  user.import_custom_objects([str(module)])
  shift = keras.saving.get_registered_object("bnraw_cli_test>Shift")
  inp = keras.Input((5,))
  h = shift(name="shift")(keras.layers.BatchNormalization()(keras.layers.Dense(4)(inp)))
  model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(h))
  model.compile("adam", "sparse_categorical_crossentropy")
  rng = np.random.default_rng(3)
  model.save(tmp_path / "m.keras")
  np.savez(tmp_path / "d.npz", x=rng.normal(size=(20, 5)).astype("float32"),
           y=rng.integers(0, 3, 20))
  script = os.path.join(os.path.dirname(sys.executable), "bnraw-compare")
  args = [script, f"--keras_model={tmp_path / 'm.keras'}", f"--data={tmp_path / 'd.npz'}",
          "--batch_size=8", "--mode=function"]
  done = subprocess.run(args + [f"--out_dir={tmp_path / 'no'}"], capture_output=True, text=True)
  assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
  assert "Shift" in done.stderr and not (tmp_path / "no").exists()
  done = subprocess.run(args + [f"--custom_objects={module}", f"--out_dir={tmp_path / 'out'}"],
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  import json
  result = json.loads((tmp_path / "out" / "compare.json").read_text())
  assert result["bit_identical_steps"] == len(result["steps"]) == 3


def test_the_report_names_the_first_layer_whose_output_differs(saved, capsys):
  """A twin broken on purpose (one conv's output scaled by 1 + 2^-20 in the raw model only):
  compare names that conv as the first layer whose output differs, and the weights that differ
  after step 0, deepest first; a bit-identical run has no first_difference."""
  from bnraw import parity
  from bnraw.parity.compare import summary_lines
  workload = from_keras_file(*saved("resnet"), TRAIN)
  layer = workload.model.layer("block_conv2")
  cls = type(layer)

  class Nudged(cls):
    def __call__(self, inputs, *, training):
      return cls.__call__(self, inputs, training=training) * (1 + 2.0 ** -20)

  layer.__class__ = Nudged
  try:
    result = parity.run(workload, out_dir=None)
  finally:
    layer.__class__ = cls
  found = result["first_difference"]
  assert found["step"] == 0
  assert found["forward"]["layer"] == "block_conv2"
  assert 0 < found["forward"]["max_rel_diff"] < 1e-5
  names = [w["name"] for w in found["weights"]]
  assert names[0].startswith("head/") and any(n.startswith("stem/") for n in names)
  assert "first layer whose output differs: block_conv2" in summary_lines(result)
  assert "first_difference" not in parity.run(from_keras_file(*saved("resnet"), TRAIN),
                                              out_dir=None)
