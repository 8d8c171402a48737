"""What ``--data`` points at, read into arrays ``x`` and ``y`` (checked against the model by
:func:`bnraw.models.user.load_data`):

* a ``.npz`` file with arrays ``x`` and ``y``;
* a saved ``tf.data`` dataset (a folder ``Dataset.save`` wrote), elements ``(x, y)``, batched or
  not;
* a folder of images, one sub-folder per class, read by Keras's own
  ``keras.utils.image_dataset_from_directory`` (so file order, labels, decoding and resizing
  are the ones a Keras run reading that folder gets): unshuffled, at the model's input size,
  bilinear, colour mode from its channels. Labels are the class indices (``label_mode="int"``),
  or one-hot where the model's loss takes them so (``"categorical"``), or binary floats for two
  classes on a one-unit output (``"binary"``). Every image is opened first, so one unreadable
  file is one line naming it before any work.

Each format is recognised from the path; anything else is one line. The arrays are held in
memory."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from bnraw.errors import UsageError

# keras.utils.image_dataset_from_directory's ALLOWLIST_FORMATS
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
COLOR_MODES = {1: "grayscale", 3: "rgb", 4: "rgba"}


def kind(path: str) -> str:
  """``"npz"``, ``"dataset"`` (a saved tf.data dataset) or ``"images"`` (class sub-folders);
  a UsageError for anything else."""
  if os.path.isfile(path):
    if path.endswith(".npz"):
      return "npz"
    raise UsageError("data", f"{path} is not a .npz file, a saved tf.data dataset or a folder "
                     "of class sub-folders of images")
  if not os.path.isdir(path):
    raise UsageError("data", f"no such file or folder: {path}")
  if os.path.isfile(os.path.join(path, "dataset_spec.pb")):
    return "dataset"
  classes = class_folders(path)
  if not classes:
    raise UsageError("data", f"{path} is a folder without class sub-folders (one per class, "
                     "images inside) and not a saved tf.data dataset")
  return "images"


def class_folders(path: str) -> list[str]:
  """The class sub-folders, as Keras lists them (sorted, hidden ones skipped)."""
  return sorted(d for d in os.listdir(path)
                if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))


def image_files(path: str) -> list[str]:
  """Every image a Keras run would read from ``path`` (walked as Keras walks it)."""
  found = []
  for folder in class_folders(path):
    for root, _, names in sorted(os.walk(os.path.join(path, folder))):
      found.extend(os.path.join(root, n) for n in sorted(names)
                   if n.lower().endswith(IMAGE_SUFFIXES))
  return found


def check_images(path: str) -> int:
  """Decodes every image with Pillow (a truncated file shows here, not in Keras's reader);
  returns their count."""
  from PIL import Image
  files = image_files(path)
  if not files:
    raise UsageError("data", f"{path}: its class sub-folders hold no images "
                     f"({', '.join(IMAGE_SUFFIXES)})")
  for file in files:
    try:
      with Image.open(file) as image:
        image.load()
    except Exception as e:
      raise UsageError("data", f"cannot read image {file}: {str(e).splitlines()[0]}") from None
  return len(files)


def read(path: str, model) -> tuple[np.ndarray, np.ndarray]:
  """``x`` and ``y`` from ``path`` as the format gives them (not yet checked against the
  model, except an image folder's size and labels, which come from it)."""
  what = kind(path)
  if what == "npz":
    return _npz(path)
  if what == "dataset":
    return _saved_dataset(path, model)
  return _image_folder(path, model)


def _npz(path: str) -> tuple[np.ndarray, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as arrays:
      return arrays["x"], arrays["y"]
  except KeyError:
    raise UsageError("data", f"{path} needs arrays named x and y") from None
  except Exception as e:
    raise UsageError("data", f"cannot read {path}: {str(e).splitlines()[0]}") from None


def _saved_dataset(path: str, model) -> tuple[np.ndarray, np.ndarray]:
  import tensorflow as tf
  try:
    dataset = tf.data.Dataset.load(path)
  except Exception as e:
    raise UsageError("data", f"cannot load the saved dataset {path}: "
                     f"{str(e).splitlines()[0]}") from None
  return dataset_arrays(dataset, model, path)


def dataset_arrays(dataset, model, what: str) -> tuple[np.ndarray, np.ndarray]:
  """The ``(x, y)`` elements of a ``tf.data.Dataset`` (batched or not: told from the rank of
  ``x`` against the model's input) as two arrays; a UsageError naming ``what`` otherwise."""
  import tensorflow as tf
  spec = dataset.element_spec
  if not (isinstance(spec, tuple) and len(spec) == 2
          and all(isinstance(s, tf.TensorSpec) for s in spec)):
    raise UsageError("data", f"{what}: elements must be (x, y) pairs of tensors, got {spec}")
  rank = len(model.inputs[0].shape) - 1
  if spec[0].shape.rank == rank + 1:  # batched: Dataset.save of a .batch()ed dataset
    dataset = dataset.unbatch()
  elif spec[0].shape.rank != rank:
    raise UsageError("data", f"{what}: x elements have shape {spec[0].shape}, the model takes "
                     f"{tuple(model.inputs[0].shape[1:])}")
  xs, ys = [], []
  try:
    for x, y in dataset.as_numpy_iterator():
      xs.append(x)
      ys.append(y)
  except Exception as e:
    raise UsageError("data", f"cannot read {what}: {str(e).splitlines()[0]}") from None
  if not xs:
    raise UsageError("data", f"{what}: the dataset is empty")
  try:
    return np.stack(xs), np.stack(ys)
  except ValueError:
    raise UsageError("data", f"{what}: its elements differ in shape (x or y)") from None


def _image_folder(path: str, model) -> tuple[np.ndarray, np.ndarray]:
  import keras
  shape = tuple(model.inputs[0].shape[1:])
  if len(shape) != 3 or shape[0] is None or shape[1] is None:
    raise UsageError("data", f"{path} is a folder of images; the model takes {shape}, not "
                     "images of a fixed height and width")
  if shape[2] not in COLOR_MODES:
    raise UsageError("data", f"{path} is a folder of images; the model takes {shape[2]} "
                     "channels, not 1, 3 or 4")
  check_images(path)
  classes = class_folders(path)
  dataset = keras.utils.image_dataset_from_directory(
      path, label_mode="int", color_mode=COLOR_MODES[shape[2]], batch_size=None,
      image_size=shape[:2], shuffle=False, verbose=False)
  try:
    pairs = list(dataset.as_numpy_iterator())
  except Exception as e:  # what Pillow opened but TensorFlow cannot decode
    raise UsageError("data", f"cannot decode the images of {path}: "
                     f"{str(e).splitlines()[0]}") from None
  x = np.stack([image for image, _ in pairs]).astype(np.float32)
  labels = np.array([label for _, label in pairs])
  # Keras's label modes, in the order tried: binary (two classes, one unit), int, categorical
  units = model.outputs[0].shape[-1]
  modes = ([labels.astype(np.float32)[:, None]] if len(classes) == 2 and units == 1 else [])
  modes += [labels, np.eye(len(classes), dtype=np.float32)[labels]]
  for y in modes:
    if label_problem(model, x, y) is None:
      return x, y
  return x, labels  # load_data's check says why they do not fit


def extreme_rows(y: np.ndarray) -> np.ndarray:
  """The first example and those with the smallest and the largest label: where a label that
  does not fit the model's output (a class index out of range) shows."""
  flat = y.reshape(len(y), -1)
  return np.unique([0, int(flat.min(1).argmin()), int(flat.max(1).argmax())])


def label_problem(model, x: np.ndarray, y: np.ndarray) -> Optional[str]:
  """Why the model's loss does not take labels ``y`` (None: it does), on
  :func:`extreme_rows`. Where the model's own output on them is not finite (inference
  overflows: the extreme case of the gap bnraw measures), on a finite output of its shape,
  uniform over the units, so that only the labels are judged."""
  shape, rows = y.shape, extreme_rows(y)
  x, y = x[rows], y[rows]
  y_pred = model(x, training=False)
  if not np.isfinite(np.asarray(y_pred, np.float32)).all():
    y_pred = np.full(y_pred.shape, 1 / y_pred.shape[-1], np.float32)
  try:
    loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=False)
  except Exception as e:
    return (f"y (shape {shape}) does not fit the model's output (shape "
            f"{tuple(y_pred.shape)[1:]}) under its loss: {str(e).splitlines()[0]}")
  if not np.isfinite(np.asarray(loss)).all():
    return (f"y (shape {shape}) gives a non-finite loss with the model's "
            "output: labels out of range for the loss?")
  return None
