"""Every keras.applications family that has BatchNormalization, as a user brings it
(``weights=None``, the smallest input it allows and a small width, fit one epoch, saved): the twin's
synced steps are bit-identical to the model's own fit, the diagnosis's parts sum to the gap, and
the trained.keras that bnraw-train writes evaluates in Keras to the twin's own evaluate.

The cheap families run in the default suite. The heavy ones (minutes of compiling each on two
cores) carry the ``applications`` marker, which setup.cfg leaves out; run them with

  .venv/bin/python -m pytest -q -m applications tests/models/applications_test.py

Their timings at the measurements' sizes are in docs/measurements.md ("Real architectures")."""

import os
import tempfile

import numpy as np
import pytest

from bnraw.config import TrainConfig
from bnraw.models.workload import from_keras_file

# two full batches and a partial one; batch 8, not less: at 32x32 the last BN layers see 1x1
# maps, and EfficientNetB0 fit at batch 4 grows weights that overflow its inference in 3 steps
EXAMPLES, BATCH_SIZE, CLASSES = 20, 8, 3

HEAVY = pytest.mark.applications
# name, input size (the smallest each accepts), constructor arguments
FAMILIES = [
    pytest.param("MobileNet", 32, {"alpha": 0.25}, id="MobileNet"),
    pytest.param("MobileNetV2", 32, {"alpha": 0.35}, id="MobileNetV2", marks=HEAVY),
    pytest.param("MobileNetV3Small", 32, {"alpha": 0.75}, id="MobileNetV3Small"),
    pytest.param("EfficientNetB0", 32, {}, id="EfficientNetB0", marks=HEAVY),
    pytest.param("ResNet50", 32, {}, id="ResNet50", marks=HEAVY),
    pytest.param("ResNet50V2", 32, {}, id="ResNet50V2", marks=HEAVY),
    pytest.param("MobileNetV3Large", 32, {"alpha": 0.75}, id="MobileNetV3Large", marks=HEAVY),
    pytest.param("EfficientNetV2B0", 32, {}, id="EfficientNetV2B0", marks=HEAVY),
    pytest.param("DenseNet121", 32, {}, id="DenseNet121", marks=HEAVY),
    pytest.param("InceptionV3", 75, {}, id="InceptionV3", marks=HEAVY),
    pytest.param("InceptionResNetV2", 75, {}, id="InceptionResNetV2", marks=HEAVY),
    pytest.param("Xception", 71, {}, id="Xception", marks=HEAVY),
    pytest.param("NASNetMobile", 32, {}, id="NASNetMobile", marks=HEAVY),
]


def _save(name, size, kwargs, directory):
  import keras
  keras.utils.set_random_seed(0)
  model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3),
                                            classes=CLASSES, **kwargs)
  model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy",
                metrics=["accuracy"])
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 255, (EXAMPLES, size, size, 3)).astype(np.float32)
  y = rng.integers(0, CLASSES, EXAMPLES)
  model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, verbose=0)
  paths = os.path.join(directory, "model.keras"), os.path.join(directory, "data.npz")
  model.save(paths[0])
  np.savez(paths[1], x=x, y=y)
  return paths


@pytest.mark.parametrize("name,size,kwargs", FAMILIES)
def test_the_family_is_bit_identical_and_its_diagnosis_sums(name, size, kwargs):
  import keras
  from bnraw import diagnosis, parity, training
  train = TrainConfig(batch_size=BATCH_SIZE, epochs=1, mode="function")
  with tempfile.TemporaryDirectory() as directory:
    paths = _save(name, size, kwargs, directory)
    result = parity.run(from_keras_file(*paths, train), out_dir=None)
    assert result["bit_identical_steps"] == len(result["steps"]) == 3, result["steps"]
    assert result["evaluate"]["loss_rel_diff"] == 0
    assert "first_difference" not in result
    report = diagnosis.run(from_keras_file(*paths, train), out_dir=os.path.join(directory, "d"),
                           fix="precise_bn", tensorboard=False, progress=False)
    summary = training.run(from_keras_file(*paths, train), out_dir=os.path.join(directory, "t"),
                           progress=False)
    trained = keras.models.load_model(os.path.join(directory, "t", "trained.keras"))
    with np.load(paths[1]) as data:
      keras_eval = trained.evaluate(data["x"], data["y"], batch_size=BATCH_SIZE, verbose=0,
                                    return_dict=True)
  assert keras_eval["loss"] == pytest.approx(summary["evaluate"]["loss"], rel=1e-6)
  losses = report["losses"]
  gap = losses["evaluate"] - losses["fit"]
  assert sum(report["attribution"].values()) == pytest.approx(gap, abs=1e-6 * max(1, abs(gap)))
  assert sum(p["contribution"] for p in report["per_layer"]) == pytest.approx(
      losses["evaluate"] - losses["precise_bn"], abs=1e-5 * max(1, abs(gap)))
  assert report["fixed"]["evaluate"]["loss"] == pytest.approx(losses["precise_bn"], rel=1e-6)
