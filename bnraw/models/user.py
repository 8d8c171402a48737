"""A user's own trained Keras model and its data, checked before any work: every problem is one
:class:`UsageError` naming the file (or layer) and what is wrong, never a traceback."""

from __future__ import annotations

import os
import warnings
import zipfile
from typing import Optional

import numpy as np

from bnraw.core.batching import streamed
from bnraw.errors import UsageError
from bnraw.models.keras_bridge import keras_bn_layers

KERAS_FIT_BATCH_SIZE = 32  # model.fit's batch_size when none is given


def load_keras_model(path: str, *, nested_bn: bool = False):
  """The compiled ``.keras`` (or ``.h5``) model at ``path``, with at least one top-level BN
  layer (``nested_bn``: at any depth, for the raw twin), one input, and no layer the CPU cannot
  run."""
  import keras
  if os.path.isdir(path):
    raise UsageError("keras_model", f"{path} is a directory; give the model's .keras file")
  if not os.path.isfile(path):
    raise UsageError("keras_model", f"no such file: {path}")
  if not path.endswith((".keras", ".h5")):
    raise UsageError("keras_model", f"{path} is not a .keras (or .h5) file")
  if path.endswith(".keras") and not zipfile.is_zipfile(path):
    raise UsageError("keras_model", f"{path} is not a valid .keras file (not a zip archive: "
                     "corrupt or truncated?)")
  try:
    with warnings.catch_warnings():  # "Skipping variable loading for optimizer": not needed here
      warnings.simplefilter("ignore")
      model = keras.models.load_model(path)
  except Exception as e:  # Keras raises many types for a bad file
    unknown = _unregistered_classes(path)
    if unknown:
      raise UsageError("keras_model", f"cannot load {path}: its custom layer class "
                       f"{unknown[0]!r} is not registered in this process; give "
                       "--custom_objects=<the .py file or module that registers it>") from None
    raise UsageError("keras_model", f"cannot load {path}: {str(e).splitlines()[0]}") from None
  try:
    has_bn = (any(type(layer).__name__ == "BatchNormalization" for layer in all_layers(model))
              if nested_bn else bool(keras_bn_layers(model)))
  except ValueError as e:
    raise UsageError("keras_model", f"{path}: {e}") from None
  if not has_bn:
    raise UsageError("keras_model", f"{path} has no BatchNormalization layer")
  if getattr(model, "loss", None) is None:
    raise UsageError("keras_model", f"{path} was saved without a compiled loss "
                     "(compile it before model.save)")
  if len(model.outputs) != 1:
    raise UsageError("keras_model", f"{path} has {len(model.outputs)} outputs; bnraw diagnoses "
                     "single-output models (one array y in the data file)")
  if len(model.inputs) != 1:
    names = ", ".join(t.name for t in model.inputs)
    raise UsageError("keras_model", f"{path} takes {len(model.inputs)} inputs ({names}); "
                     "bnraw diagnoses single-input models (one array x in the data file)")
  import tensorflow as tf
  if not tf.config.list_physical_devices("GPU"):
    for layer in all_layers(model):
      if getattr(layer, "data_format", None) == "channels_first":
        raise UsageError("keras_model", f"layer {layer.name!r} ({type(layer).__name__}) uses "
                         "data_format='channels_first', which TensorFlow cannot run on a CPU; "
                         "rebuild it channels_last or run on a GPU")
  return model


def _unregistered_classes(path: str) -> list[str]:
  """The registered names of the custom classes in a .keras file's config that this process
  cannot resolve (none for an .h5 file or an unreadable config)."""
  import json
  import keras
  try:
    with zipfile.ZipFile(path) as archive:
      config = json.loads(archive.read("config.json"))
  except Exception:  # not ours to diagnose: the caller reports Keras's own error
    return []
  found = []

  def walk(node):
    if isinstance(node, dict):
      name = node.get("registered_name")
      if (isinstance(name, str) and "class_name" in node and not str(
          node.get("module", "")).startswith("keras")
          and keras.saving.get_registered_object(name) is None):
        found.append(name)
      for value in node.values():
        walk(value)
    elif isinstance(node, list):
      for value in node:
        walk(value)
  walk(config)
  return found


def import_custom_objects(specs) -> None:
  """Imports each of ``specs`` (a ``.py`` file or a module name), so the custom classes it
  registers with Keras load from a ``.keras`` file."""
  import importlib
  import importlib.util
  for spec in specs:
    try:
      if spec.endswith(".py"):
        if not os.path.isfile(spec):
          raise UsageError("custom_objects", f"no such file: {spec}")
        found = importlib.util.spec_from_file_location(
            os.path.splitext(os.path.basename(spec))[0], spec)
        found.loader.exec_module(importlib.util.module_from_spec(found))
      else:
        importlib.import_module(spec)
    except UsageError:
      raise
    except Exception as e:  # a user's module may raise anything
      raise UsageError("custom_objects", f"importing {spec} raised {type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0]}") from None


def save_model(model, path: str) -> str:
  """``model.save(path)``, complete or absent (a temporary file, then a rename); returns it."""
  tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{os.path.basename(path)}")
  model.save(tmp)
  os.replace(tmp, path)
  return path


def all_layers(model):
  """Every layer of ``model``, nested models' layers included."""
  for layer in model.layers:
    yield layer
    if hasattr(layer, "layers"):
      yield from all_layers(layer)


def load_data(path: str, model, image_size: Optional[tuple] = None) -> tuple:
  """``x`` (float32) and ``y`` from ``path`` (a ``.npz``, a saved tf.data dataset or a
  folder of class sub-folders of images, read at ``image_size`` where the model takes any:
  :mod:`bnraw.models.data`), checked against ``model``: same length, x fits the input, y
  numeric, finite, and accepted by the model's loss. A folder's ``x`` is a
  :class:`bnraw.models.data.ImageFolder`, a saved dataset's a
  :class:`bnraw.models.data.SavedDataset`: read batch by batch (decoded images are finite; a
  saved dataset's elements were checked as it was read)."""
  from bnraw.models import data
  if image_size is not None and data.kind(path) != "images":
    raise UsageError("image_size", f"sets the size a folder of images is read at; {path} "
                     "is not one")
  x, y = data.read(path, model, image_size)
  if len(x) != len(y) or len(x) == 0:
    raise UsageError("data", f"x has {len(x)} examples and y {len(y)}; need the same, > 0")
  lazy = streamed(x)
  for name, array in ((("y", y),) if lazy else (("x", x), ("y", y))):
    if array.dtype.kind not in "biuf":
      raise UsageError("data", f"{name} holds {array.dtype} values; bnraw needs numbers "
                       "(encode labels as integers)")
    bad = int(np.size(array) - np.isfinite(array).sum())
    if bad:
      raise UsageError("data", f"{name} holds {bad} non-finite values (NaN or Inf)")
  expected = tuple(model.inputs[0].shape[1:])
  if len(expected) != x.ndim - 1 or any(e is not None and e != a for e, a in
                                        zip(expected, x.shape[1:])):
    raise UsageError("data", f"x examples have shape {x.shape[1:]}, the model takes "
                     f"{expected}")
  x = x if lazy else x.astype(np.float32)
  if y.dtype.kind == "f":  # Keras's data adapter casts float arrays to floatx; ints stay
    y = y.astype(np.float32)
  problem = data.label_problem(model, x, y)  # the model's own loss on a few examples
  if problem is not None:
    raise UsageError("data", problem)
  return x, y
