"""--data beyond .npz (bnraw.models.data): a folder of class sub-folders of real-format JPEG and
PNG files reads as Keras's own image_dataset_from_directory reads it, a saved tf.data dataset
as its elements, and bad data is one line naming the file or element."""

import os

import numpy as np
import pytest

from bnraw.errors import UsageError
from bnraw.models import data, user

SIZE = 6
EXACT = np.arange(SIZE * SIZE * 3, dtype=np.uint8).reshape(SIZE, SIZE, 3)


def model(units=3, loss="sparse_categorical_crossentropy", channels=3):
  import keras
  L = keras.layers
  inp = keras.Input((SIZE, SIZE, channels))
  h = L.Conv2D(2, 3, use_bias=False, name="conv")(L.Rescaling(1 / 255)(inp))
  h = L.GlobalAveragePooling2D()(L.ReLU()(L.BatchNormalization(name="bn")(h)))
  out = L.Dense(units, activation="softmax" if units > 1 else "sigmoid", name="head")(h)
  m = keras.Model(inp, out, name="folder_model")
  m.compile("adam", loss)
  return m


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Three classes of images of other sizes than the model's (so Keras resizes), JPEG and PNG,
  RGB and greyscale, and a text file Keras skips."""
  from PIL import Image
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for c, name in enumerate(["cat", "dog", "emu"]):
    os.makedirs(root / name)
    for i in range(3 + c):
      pixels = rng.integers(0, 256, (9 + i, 7 + c, 3), dtype=np.uint8)
      image = Image.fromarray(pixels)
      if i == 1:
        image.convert("L").save(root / name / f"{i}.png")
      else:
        image.save(root / name / f"{i}.{'jpg' if i % 2 == 0 else 'png'}")
    (root / name / "notes.txt").write_text("not an image")
  # at the model's size, lossless: read back exactly (an oracle apart from Keras's reader)
  Image.fromarray(EXACT).save(root / "cat" / "z_exact.png")
  os.makedirs(root / ".ipynb_checkpoints" / "hidden")  # Keras skips hidden folders
  Image.fromarray(EXACT).save(root / ".ipynb_checkpoints" / "hidden" / "0.png")
  return str(root)


def keras_arrays(path, label_mode):
  import keras
  dataset = keras.utils.image_dataset_from_directory(
      path, label_mode=label_mode, image_size=(SIZE, SIZE), shuffle=False, batch_size=None,
      verbose=False)
  xs, ys = zip(*dataset.as_numpy_iterator())
  return np.stack(xs), np.stack(ys)


def test_an_image_folder_reads_as_keras_reads_it(folder):
  from bnraw.core import batching
  heard = []
  with batching.observing(lambda *args: heard.append(args)):
    x, y = user.load_data(folder, model())
    list(batching.read_batches(x, y, [np.arange(8), np.arange(8, 13)], "a pass"))
  assert ("checking the images", 0, 13) in heard and ("checking the images", 13, 13) in heard
  assert heard[-3:] == [("a pass", 0, 13), ("a pass", 8, 13), ("a pass", 13, 13)]
  kx, ky = keras_arrays(folder, "int")
  assert isinstance(x, data.ImageFolder)  # read from disk batch by batch
  assert x.shape == (13, SIZE, SIZE, 3) and x.dtype == np.float32
  np.testing.assert_array_equal(x[:], kx)
  np.testing.assert_array_equal(y, ky)
  assert list(np.bincount(y)) == [4, 4, 5]  # cat, dog, emu; the hidden folder is no class
  np.testing.assert_array_equal(x[3], EXACT)  # cat's files in name order: 0, 1, 2, z_exact
  order = np.random.default_rng(2).permutation(13)
  even = [order[i:i + 4] for i in range(0, 13, 4)]  # 4, 4, 4, 1
  uneven = [order[:3], order[3:10], order[10:]]
  for chunks in (even, uneven):
    got = list(x.batches(chunks))
    assert [len(b) for b in got] == [len(c) for c in chunks]
    np.testing.assert_array_equal(np.concatenate(got), kx[order])
  with pytest.raises(TypeError, match="batch by batch"):
    np.asarray(x)  # never the whole folder in memory by accident


def test_two_classes_on_one_unit_are_binary_labels(folder, tmp_path):
  import shutil
  two = tmp_path / "two"
  for name in ("cat", "dog"):
    shutil.copytree(os.path.join(folder, name), two / name)
  x, y = user.load_data(str(two), model(units=1, loss="binary_crossentropy"))
  assert y.shape == (8, 1) and y.dtype == np.float32
  assert list(y[:, 0]) == [0.0] * 4 + [1.0] * 4


def test_one_hot_labels_where_the_loss_takes_them(folder):
  x, y = user.load_data(folder, model(loss="categorical_crossentropy"))
  np.testing.assert_array_equal(y, keras_arrays(folder, "categorical")[1])
  assert y.shape == (13, 3)


def test_a_saved_dataset_batched_or_not_reads_as_its_elements(tmp_path):
  import tensorflow as tf
  rng = np.random.default_rng(1)
  x = rng.normal(size=(10, SIZE, SIZE, 3)).astype(np.float32)
  y = rng.integers(0, 3, 10)
  for name, dataset in (("flat", tf.data.Dataset.from_tensor_slices((x, y))),
                        ("batched", tf.data.Dataset.from_tensor_slices((x, y)).batch(4))):
    dataset.save(str(tmp_path / name))
    got_x, got_y = user.load_data(str(tmp_path / name), model())
    assert isinstance(got_x, data.SavedDataset)  # read from disk batch by batch
    np.testing.assert_array_equal(got_x[:], x)
    np.testing.assert_array_equal(got_y, y)
    np.testing.assert_array_equal(got_x[[7, 2, 7]], x[[7, 2, 7]])  # a scan, in the order asked
    np.testing.assert_array_equal(got_x[-1], x[-1])
    np.testing.assert_array_equal(got_x[[5, -1]], x[[5, -1]])
    np.testing.assert_array_equal(got_x[y == 1], x[y == 1])
    got = list(got_x.batches([np.arange(0, 4), np.arange(4, 8), np.arange(8, 10)]))
    np.testing.assert_array_equal(np.concatenate(got), x)


def test_a_run_from_a_folder_stopped_mid_epoch_resumes_bit_for_bit(folder, tmp_path):
  from bnraw.config import TrainConfig
  from bnraw.core import loop
  from bnraw.models.workload import from_keras_file
  model().save(tmp_path / "m.keras")
  train = TrainConfig(batch_size=4, epochs=2, seed=3, mode="function")
  runs = [from_keras_file(str(tmp_path / "m.keras"), folder, train) for _ in range(2)]
  fit = lambda w, **kw: loop.fit(w.model, w.optimizer, w.images, w.labels, batch_size=4,
                                 epochs=2, seed=3, mode="function", **kw)
  whole = fit(runs[0])
  steps = []
  stopped = fit(runs[1], on_step=lambda r: steps.append(r.step),
                should_stop=lambda: len(steps) == 6)  # epoch 2 of 4 steps each, step 2 of it
  assert stopped.status == "interrupted" and stopped.state.next_batch == 2
  resumed = fit(runs[1], resume=stopped.state)
  assert resumed.loss == whole.loss
  for a, b in zip(runs[0].raw_state()["weights"], runs[1].raw_state()["weights"]):
    np.testing.assert_array_equal(a, b)


def test_training_from_a_saved_dataset_is_fit_on_it(folder, tmp_path):
  """fit never shuffles a dataset: it reads Dataset.load(path) in order every epoch, and so
  does the twin (2 epochs, batches as saved, the last one short), bit for bit."""
  import tensorflow as tf
  from bnraw.config import TrainConfig
  from bnraw.core import loop
  from bnraw.models.workload import from_keras_file
  rng = np.random.default_rng(4)
  x = rng.uniform(0, 255, (14, SIZE, SIZE, 3)).astype(np.float32)
  y = rng.integers(0, 3, 14)
  tf.data.Dataset.from_tensor_slices((x, y)).batch(4).save(str(tmp_path / "saved"))
  model().save(tmp_path / "m.keras")
  workload = from_keras_file(str(tmp_path / "m.keras"), str(tmp_path / "saved"),
                             TrainConfig(batch_size=4, epochs=2, seed=5, mode="function"))
  kmodel = workload.keras_model(jit_compile=False)
  history = loop.fit(workload.model, workload.optimizer, workload.images, workload.labels,
                     batch_size=4, epochs=2, seed=5, mode="function")
  keras_history = kmodel.fit(tf.data.Dataset.load(str(tmp_path / "saved")), epochs=2, verbose=0)
  assert [list(p) for p in history.permutations] == [list(range(14))] * 2
  for a, b in zip(workload.raw_state()["weights"], workload.keras_state(kmodel)["weights"]):
    np.testing.assert_array_equal(a, b)
  assert history.loss == keras_history.history["loss"]
  from bnraw import parity  # compare reads it in order too, on both sides
  again = from_keras_file(str(tmp_path / "m.keras"), str(tmp_path / "saved"),
                          TrainConfig(batch_size=4, epochs=1, mode="function"))
  result = parity.run(again, out_dir=None)
  assert result["bit_identical_steps"] == len(result["steps"]) == 4


def test_a_run_from_an_image_folder_is_bit_identical_to_fit(folder, tmp_path):
  """The twin trained from the folder against the model's own fit on the same arrays."""
  from bnraw import parity
  from bnraw.config import TrainConfig
  from bnraw.models.workload import from_keras_file
  m = model()
  x, y = keras_arrays(folder, "int")
  m.fit(x, y, batch_size=4, epochs=1, verbose=0)
  m.save(tmp_path / "m.keras")
  workload = from_keras_file(str(tmp_path / "m.keras"), folder,
                             TrainConfig(batch_size=5, epochs=1, mode="function"))
  result = parity.run(workload, out_dir=None)
  assert result["bit_identical_steps"] == len(result["steps"]) == 3


def test_training_from_a_folder_is_fit_on_keras_s_shuffled_dataset_of_it(folder, tmp_path):
  """The twin trained from the folder with --seed=S draws the batches a real ``fit`` draws from
  ``image_dataset_from_directory(folder, shuffle=True, seed=S)`` (its file-list shuffle, then
  its buffer shuffle, a new order every epoch): 3 epochs, bit for bit."""
  import keras
  from bnraw.config import TrainConfig
  from bnraw.core import loop
  from bnraw.models.workload import from_keras_file
  model().save(tmp_path / "m.keras")
  seed, batch, epochs = 11, 4, 3
  workload = from_keras_file(str(tmp_path / "m.keras"), folder,
                             TrainConfig(batch_size=batch, epochs=epochs, seed=seed,
                                         mode="function"))
  kmodel = workload.keras_model(jit_compile=False)  # the initial state, before the raw run
  history = loop.fit(workload.model, workload.optimizer, workload.images, workload.labels,
                     batch_size=batch, epochs=epochs, seed=seed, mode="function")
  dataset = keras.utils.image_dataset_from_directory(
      folder, image_size=(SIZE, SIZE), batch_size=batch, shuffle=True, seed=seed, verbose=False)
  keras_history = kmodel.fit(dataset, epochs=epochs, verbose=0)
  assert len({tuple(p) for p in history.permutations}) == epochs  # reshuffled every epoch
  raw, fitted = workload.raw_state(), workload.keras_state(kmodel)
  for a, b in zip(raw["weights"], fitted["weights"]):
    np.testing.assert_array_equal(a, b)
  assert history.loss == keras_history.history["loss"]


def test_image_size_reads_a_folder_for_a_model_of_any_size(folder, tmp_path):
  import keras
  inputs = keras.Input((None, None, 3))
  h = keras.layers.BatchNormalization()(keras.layers.Conv2D(2, 3)(inputs))
  free = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(
      keras.layers.GlobalAveragePooling2D()(h)))
  free.compile("adam", "sparse_categorical_crossentropy")
  x, y = user.load_data(folder, free, (SIZE, SIZE))
  np.testing.assert_array_equal(x[:], keras_arrays(folder, "int")[0])
  with pytest.raises(UsageError, match="any height or width"):
    user.load_data(folder, free)
  with pytest.raises(UsageError, match="not the model's input size"):
    user.load_data(folder, model(), (SIZE + 1, SIZE))
  np.savez(tmp_path / "a.npz", x=np.zeros((2, SIZE, SIZE, 3)), y=np.zeros(2))
  with pytest.raises(UsageError, match="is not one"):
    user.load_data(str(tmp_path / "a.npz"), model(), (SIZE, SIZE))


def test_bad_data_is_one_line_naming_it(folder, tmp_path):
  import shutil
  import tensorflow as tf
  broken = tmp_path / "broken"
  shutil.copytree(folder, broken)
  good = (broken / "dog" / "2.jpg").read_bytes()
  (broken / "dog" / "2.jpg").write_bytes(good[:len(good) // 2])  # truncated: header intact
  with pytest.raises(UsageError, match=r"cannot read image .*dog/2\.jpg") as error:
    user.load_data(str(broken), model())
  assert "\n" not in str(error.value)
  flat = tmp_path / "flat"
  os.makedirs(flat)
  shutil.copy(os.path.join(folder, "cat", "0.jpg"), flat / "0.jpg")
  with pytest.raises(UsageError, match="without class sub-folders"):
    user.load_data(str(flat), model())
  tf.data.Dataset.from_tensor_slices(np.zeros((4, SIZE, SIZE, 3), np.float32)).save(
      str(tmp_path / "x_only"))
  with pytest.raises(UsageError, match=r"elements must be \(x, y\)"):
    user.load_data(str(tmp_path / "x_only"), model())
  with pytest.raises(UsageError, match="does not fit|non-finite"):
    user.load_data(folder, model(units=2))  # three classes, two outputs
  with pytest.raises(UsageError, match="not a .npz file"):
    user.load_data(os.path.join(folder, "cat", "notes.txt"), model())


def test_the_digest_of_a_folder_follows_its_contents(folder, tmp_path):
  import shutil
  from bnraw import machine
  copy = tmp_path / "copy"
  shutil.copytree(folder, copy)
  assert machine.file_digest(str(copy)) == machine.file_digest(folder)
  (copy / "cat" / "0.jpg").write_bytes((copy / "cat" / "0.jpg").read_bytes() + b"\0")
  assert machine.file_digest(str(copy)) != machine.file_digest(folder)


def test_each_format_is_told_from_its_path(folder, tmp_path):
  import tensorflow as tf
  tf.data.Dataset.range(3).map(lambda i: (i, i)).save(str(tmp_path / "saved"))
  np.savez(tmp_path / "a.npz", x=np.zeros(1), y=np.zeros(1))
  assert [data.kind(p) for p in (folder, str(tmp_path / "saved"), str(tmp_path / "a.npz"))] == [
      "images", "dataset", "npz"]
  with pytest.raises(UsageError, match="no such file or folder"):
    data.kind(str(tmp_path / "missing"))
