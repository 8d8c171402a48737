"""What ``--data`` points at, as ``x`` and ``y`` (checked against the model by
:func:`bnraw.models.user.load_data`):

* a ``.npz`` file with arrays ``x`` and ``y``, held in memory;
* a saved ``tf.data`` dataset (a folder ``Dataset.save`` wrote), elements ``(x, y)``, batched or
  not: :class:`SavedDataset`, read from disk in its own order, as ``fit`` reads a dataset;
* a folder of images, one sub-folder per class: :class:`ImageFolder`, read from disk as
  Keras's own ``keras.utils.image_dataset_from_directory`` reads it (its file order, labels,
  decoding and bilinear resize), at the model's input size (or ``--image_size``), colour mode
  from its channels, in the orders a shuffled Keras run on it draws. Labels are the class
  indices (``label_mode="int"``), or one-hot where the model's loss takes them so
  (``"categorical"``), or binary floats for two classes on a one-unit output (``"binary"``).
  Every image is opened first, so one unreadable file is one line naming it before any work.

Each format is recognised from the path; anything else is one line. The two read from disk
hold a few batches in memory, never the data (``y`` alone is read into memory)."""

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


def check_images(path: str, files: list[str]) -> None:
  """Decodes every image of ``files`` (:func:`image_files` of ``path``) with Pillow (a
  truncated file shows here, not in Keras's reader)."""
  from PIL import Image
  from bnraw.core.batching import report
  if not files:
    raise UsageError("data", f"{path}: its class sub-folders hold no images "
                     f"({', '.join(IMAGE_SUFFIXES)})")
  report("checking the images", 0, len(files))
  for done, file in enumerate(files, 1):
    try:
      with Image.open(file) as image:
        image.load()
    except Exception as e:
      raise UsageError("data", f"cannot read image {file}: {str(e).splitlines()[0]}") from None
    if done % 256 == 0 or done == len(files):  # (a progress line for a large folder)
      report("checking the images", done, len(files))


def read(path: str, model, image_size: Optional[tuple] = None) -> tuple:
  """``x`` and ``y`` from ``path`` as the format gives them (not yet checked against the
  model, except an image folder's size and labels, which come from it; its ``x`` is an
  :class:`ImageFolder`, read batch by batch; ``image_size``: the size to read it at, for a
  model that takes any)."""
  what = kind(path)
  if what == "npz":
    return _npz(path)
  if what == "dataset":
    return _saved_dataset(path, model)
  return _image_folder(path, model, image_size)


def _npz(path: str) -> tuple[np.ndarray, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as arrays:
      return arrays["x"], arrays["y"]
  except KeyError:
    raise UsageError("data", f"{path} needs arrays named x and y") from None
  except Exception as e:
    raise UsageError("data", f"cannot read {path}: {str(e).splitlines()[0]}") from None


def _saved_dataset(path: str, model) -> tuple:
  import tensorflow as tf
  try:
    dataset = tf.data.Dataset.load(path)
  except Exception as e:
    raise UsageError("data", f"cannot load the saved dataset {path}: "
                     f"{str(e).splitlines()[0]}") from None
  return SavedDataset.read(dataset, model, path)


def examples(dataset, model, what: str):
  """A ``tf.data.Dataset`` of ``(x, y)`` as one example per element (a batched one, saved
  from a ``.batch()``ed dataset, unbatched: told from the rank of ``x`` against the model's
  input); a UsageError naming ``what`` for any other element."""
  import tensorflow as tf
  spec = dataset.element_spec
  if not (isinstance(spec, tuple) and len(spec) == 2
          and all(isinstance(s, tf.TensorSpec) for s in spec)):
    raise UsageError("data", f"{what}: elements must be (x, y) pairs of tensors, got {spec}")
  rank = len(model.inputs[0].shape) - 1
  if spec[0].shape.rank == rank + 1:  # batched: Dataset.save of a .batch()ed dataset
    return dataset.unbatch()
  if spec[0].shape.rank != rank:
    raise UsageError("data", f"{what}: x elements have shape {spec[0].shape}, the model takes "
                     f"{tuple(model.inputs[0].shape[1:])}")
  return dataset


def dataset_arrays(dataset, model, what: str) -> tuple[np.ndarray, np.ndarray]:
  """The ``(x, y)`` elements of a ``tf.data.Dataset`` (batched or not, :func:`examples`) as
  two arrays; a UsageError naming ``what`` otherwise."""
  dataset = examples(dataset, model, what)
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


def _image_folder(path: str, model, image_size: Optional[tuple] = None) -> tuple:
  shape = tuple(model.inputs[0].shape[1:])
  if len(shape) != 3:
    raise UsageError("data", f"{path} is a folder of images; the model takes {shape}, not "
                     "images (height, width, channels)")
  if shape[2] not in COLOR_MODES:
    raise UsageError("data", f"{path} is a folder of images; the model takes {shape[2]} "
                     "channels, not 1, 3 or 4")
  size = tuple(image_size) if image_size else shape[:2]
  if None in size:
    raise UsageError("image_size", f"the model takes images of any height or width {shape}: "
                     "give the size to read them at, e.g. --image_size=64,64")
  if any(given is not None and given != want for given, want in zip(shape[:2], size)):
    raise UsageError("image_size", f"{size[0]},{size[1]} is not the model's input size "
                     f"{shape[0]},{shape[1]}")
  files = image_files(path)
  check_images(path, files)
  classes = class_folders(path)
  index = {folder: k for k, folder in enumerate(classes)}
  labels = np.array([index[os.path.relpath(f, path).split(os.sep)[0]] for f in files],
                    np.int32)
  x = ImageFolder(path, files, size, shape[2])
  # Keras's label modes, in the order tried: binary (two classes, one unit), int, categorical
  units = model.outputs[0].shape[-1]
  modes = ([labels.astype(np.float32)[:, None]] if len(classes) == 2 and units == 1 else [])
  modes += [labels, np.eye(len(classes), dtype=np.float32)[labels]]
  for y in modes:
    if label_problem(model, x, y) is None:
      return x, y
  return x, labels  # load_data's check says why they do not fit


class _Streamed:
  """What :class:`SavedDataset` and :class:`ImageFolder` share: array-like where the tools
  index them (``len``, ``shape``, ``x[index]`` as numpy indexes, through ``_take`` of the
  example numbers asked), never one array by accident."""

  dtype = np.dtype(np.float32)
  path: str
  shape: tuple

  def __len__(self) -> int:
    return self.shape[0]

  def __array__(self, dtype=None, copy=None):
    raise TypeError(f"{self.path} is read batch by batch, not as one array")

  def __getitem__(self, index) -> np.ndarray:
    single = not isinstance(index, slice) and np.ndim(index) == 0
    index = np.atleast_1d(np.arange(len(self))[index])  # slices, negatives, masks: as numpy
    if len(index) == 0:
      return np.zeros((0, *self.shape[1:]), np.float32)
    out = self._take(index)
    return out[0] if single else out

  @staticmethod
  def _one_size(sizes: list[int]) -> bool:
    """Whether chunks of ``sizes`` are one ``.batch()`` of a run: all one size but the last,
    which may be short."""
    return all(size == sizes[0] for size in sizes[:-1]) and sizes[-1] <= sizes[0]


class SavedDataset(_Streamed):
  """A saved ``tf.data`` dataset, read from disk batch by batch in its own order: what
  ``fit`` reads from ``tf.data.Dataset.load(path)`` each epoch (it never shuffles a dataset),
  cut into batches of the run's batch size (a dataset saved batched at that size reads to the
  same batches). Array-like where the tools index it, as :class:`ImageFolder`: reading it in
  order is one pass; other indices scan it (a few examples only). ``y`` is read once, into
  memory (:meth:`read`)."""

  def __init__(self, path: str, dataset, shape: tuple):
    self.path, self.examples, self.shape = path, dataset, tuple(shape)
    self.ndim = len(self.shape)

  @classmethod
  def read(cls, dataset, model, path: str) -> tuple:
    """``(x, y)``: x a :class:`SavedDataset`, y its labels. One pass checks every element
    (same shapes, finite x) and keeps only the labels."""
    import tensorflow as tf
    flat = examples(dataset, model, path)
    ys, shape = [], None
    try:
      for k, (x, y) in enumerate(flat.as_numpy_iterator()):
        if shape is None:
          shape = x.shape
        elif x.shape != shape:
          raise UsageError("data", f"{path}: element {k} has x of shape {x.shape}, element 0 "
                           f"{shape}")
        if x.dtype.kind not in "biuf" or not np.isfinite(x).all():
          raise UsageError("data", f"{path}: element {k} has x that is not finite numbers")
        ys.append(y)
    except tf.errors.OpError as e:
      raise UsageError("data", f"cannot read {path}: {str(e.message).splitlines()[0]}") from None
    if not ys:
      raise UsageError("data", f"{path}: the dataset is empty")
    try:
      y = np.stack(ys)
    except ValueError:
      raise UsageError("data", f"{path}: its elements differ in the shape of y") from None
    # its length known (an unbatched dataset's is not): fit then runs exactly its batches
    x = flat.map(lambda x, _: tf.cast(x, tf.float32)).apply(
        tf.data.experimental.assert_cardinality(len(ys)))
    return cls(path, x, (len(ys), *shape)), y

  def _take(self, index: np.ndarray) -> np.ndarray:
    import tensorflow as tf
    if np.array_equal(index, np.arange(index[0], index[0] + len(index))):  # a run: skip, take
      out = next(iter(self.examples.skip(int(index[0])).take(len(index)).batch(len(index))))
    else:  # one scan for the examples asked, then put in the order asked
      wanted = tf.constant(np.unique(index))
      found = self.examples.enumerate().filter(lambda i, _: tf.reduce_any(i == wanted))
      found = next(iter(found.map(lambda _, x: x).batch(len(wanted))))
      out = tf.gather(found, np.searchsorted(np.unique(index), index))
    return out.numpy()

  def batches(self, chunks):
    """Each chunk's examples (numpy), in order: one pass, read ahead, where the chunks are
    consecutive runs in the dataset's order (every pass the tools make over it); else each
    chunk apart."""
    import tensorflow as tf
    chunks = [np.asarray(chunk) for chunk in chunks]
    if not chunks:
      return
    flat = np.concatenate(chunks)
    sizes = [len(chunk) for chunk in chunks]
    if np.array_equal(flat, np.arange(flat[0], flat[0] + len(flat))) and self._one_size(sizes):
      run = self.examples.skip(int(flat[0])).take(len(flat)).batch(sizes[0])
      for batch in run.prefetch(tf.data.AUTOTUNE):
        yield batch.numpy()
    else:
      for chunk in chunks:
        yield self[chunk]

  def dataset(self, y: np.ndarray, order, batch_size: int):
    """``(x, y)`` batches of the examples in ``order`` (the dataset's own order: what the
    tools give it) for Keras's ``fit`` and ``evaluate``."""
    import tensorflow as tf
    order = np.asarray(order)
    if not np.array_equal(order, np.arange(len(self))):
      raise ValueError(f"{self.path} is read in its own order")
    pairs = tf.data.Dataset.zip((self.examples, tf.data.Dataset.from_tensor_slices(y)))
    return pairs.batch(batch_size).prefetch(tf.data.AUTOTUNE)

  def epoch_order(self, seed: int, batch_size: int, epoch: int) -> np.ndarray:
    """Every epoch in the dataset's own order, as ``fit`` reads a dataset."""
    return np.arange(len(self))


class ImageFolder(_Streamed):
  """The images of a folder of class sub-folders, read from disk batch by batch as
  ``keras.utils.image_dataset_from_directory`` reads them (the same ops: ``read_file``,
  ``decode_image(channels, expand_animations=False)``, ``resize(size, bilinear)``, in float32),
  so memory holds a few batches, never the data. Array-like where the tools index it
  (``len``, ``shape``, ``x[indices]``); ``batches(chunks)`` reads a pass through ``tf.data``,
  decoding in parallel and reading ahead (:func:`bnraw.core.batching.read_batches`).

  ``files`` are in Keras's unshuffled order (class folders sorted, then each one walked
  sorted); the orders a shuffled Keras run draws are :meth:`epoch_order`."""

  ndim = 4

  def __init__(self, path: str, files: list, size: tuple, channels: int,
               interpolation: str = "bilinear"):
    self.path, self.files = path, list(files)
    self._paths = np.asarray(self.files)
    self.size, self.channels, self.interpolation = tuple(size), channels, interpolation
    self.shape = (len(self.files), *self.size, channels)
    self._orders: dict = {}

  def _load(self, file):
    import tensorflow as tf
    image = tf.image.decode_image(tf.io.read_file(file), channels=self.channels,
                                  expand_animations=False)
    image = tf.image.resize(image, self.size, method=self.interpolation)
    image.set_shape((*self.size, self.channels))
    return image

  def images(self, index):
    """The images of examples ``index`` in that order, one element each, decoded in parallel."""
    import tensorflow as tf
    files = tf.data.Dataset.from_tensor_slices(self._paths[np.asarray(index)])
    return files.map(self._load, num_parallel_calls=tf.data.AUTOTUNE)

  def _take(self, index: np.ndarray) -> np.ndarray:
    return next(iter(self._read(self.images(index).batch(len(index)))))

  def batches(self, chunks):
    """Each chunk's images (numpy), in order, the next ones decoding while one is used."""
    import tensorflow as tf
    chunks = [np.asarray(chunk) for chunk in chunks]
    if not chunks:
      return
    sizes = [len(chunk) for chunk in chunks]
    if self._one_size(sizes):
      dataset = self.images(np.concatenate(chunks)).batch(sizes[0])
    else:  # batches of several sizes: one per chunk, still read ahead
      bounds = np.cumsum([0] + sizes)
      flat = np.concatenate(chunks)
      dataset = tf.data.Dataset.range(len(chunks)).map(
          lambda k: tf.map_fn(self._load, tf.gather(self._paths[flat],
                                                    tf.range(tf.gather(bounds, k),
                                                             tf.gather(bounds, k + 1))),
                              fn_output_signature=tf.float32))
    yield from self._read(dataset.prefetch(tf.data.AUTOTUNE))

  def _read(self, dataset):
    import tensorflow as tf
    try:
      for batch in dataset:
        yield batch.numpy()
    except tf.errors.OpError as e:  # what Pillow opened but TensorFlow cannot decode
      raise UsageError("data", f"cannot decode an image of {self.path}: "
                       f"{str(e.message).splitlines()[0]}") from None

  def dataset(self, y: np.ndarray, order, batch_size: int):
    """``(x, y)`` batches of the examples in ``order``, read ahead: what Keras's ``fit`` and
    ``evaluate`` take in place of arrays (the same batches as ``x[order]``, ``y[order]``)."""
    import tensorflow as tf
    order = np.asarray(order)
    pairs = tf.data.Dataset.zip((self.images(order), tf.data.Dataset.from_tensor_slices(y[order])))
    return pairs.batch(batch_size).prefetch(tf.data.AUTOTUNE)

  def epoch_order(self, seed: int, batch_size: int, epoch: int) -> np.ndarray:
    """The examples of epoch ``epoch`` (0-based) in the order ``fit`` draws them from
    ``image_dataset_from_directory(path, shuffle=True, seed=seed, batch_size=batch_size)``:
    the file list shuffled once by ``np.random.RandomState(seed)``, then each epoch by the
    dataset's ``shuffle(8 * batch_size, seed=seed)``, which draws a new order for every
    iterator made of it. Keras 3's epoch iterator makes two per epoch (the second, made when
    an epoch of a dataset of known length ends, is never read), so epoch e reads the
    (2e)-th (measured with Keras 3.15; the tests replay a real fit). The shuffle's seeds
    depend on TensorFlow's global seed as Keras's do: bnraw sets none."""
    import tensorflow as tf
    key = (seed, batch_size)
    if key not in self._orders:
      first = np.arange(len(self))
      np.random.RandomState(seed).shuffle(first)
      shuffled = tf.data.Dataset.range(len(self)).shuffle(8 * batch_size, seed=seed)
      self._orders[key] = (first, shuffled, [])
    first, shuffled, orders = self._orders[key]
    while len(orders) <= epoch:  # (the whole order in one batch: one call, not n)
      orders.append(first[next(iter(shuffled.batch(len(self)))).numpy()])
      iter(shuffled)  # the iterator Keras makes at the epoch's end and never reads
    return orders[epoch]


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
