"""Output files that are complete or absent (write to a temporary name, then rename), the output
directory check every tool makes before it starts, and the environment every output records."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from typing import Any, Callable

import numpy as np

from bnraw.errors import UsageError


def jsonable(value: Any) -> Any:
  """``value`` with numpy arrays/scalars as lists/numbers, tuples as lists, NaN as null."""
  if isinstance(value, dict):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return jsonable(value.tolist())
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, float) and not np.isfinite(value):
    return None if np.isnan(value) else ("inf" if value > 0 else "-inf")
  return value


def write_atomic(path: str, write: Callable[[Any], None], mode: str = "w") -> None:
  """Calls ``write(file)`` on a temporary file beside ``path``, then renames it into place."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
  umask = os.umask(0)
  os.umask(umask)
  try:
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files
    with os.fdopen(fd, mode) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str, obj: Any) -> None:
  """``obj`` as indented JSON (numpy values converted; NaN -> null), atomically."""
  write_atomic(path, lambda f: json.dump(jsonable(obj), f, indent=2, sort_keys=False))


# What bnraw writes into an output directory: the marks of an earlier run there.
RUN_OUTPUTS = ("summary.json", "diagnosis.json", "compare.json", "profile.json", "sweep.json",
               "run_state.json", "trace.npz", "checkpoints", "tensorboard", "fixed",
               "fixed.keras")


def check_out_dir(out_dir: str, *, overwrite: bool = False, resume: bool = False) -> list[str]:
  """Refuses an ``out_dir`` that cannot be an output folder, writing nothing; returns the
  earlier run's outputs found there.

  A folder that holds an earlier run's outputs is refused, so runs never mix (an old ``ckpt-30``
  beside a new ``ckpt-5``), unless ``resume`` (continue it) or ``overwrite`` (replace it).
  """
  if not out_dir:
    raise UsageError("out_dir", "must not be empty")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UsageError("out_dir", f"exists and is not a directory: {out_dir}")
  earlier = ([name for name in RUN_OUTPUTS if os.path.lexists(os.path.join(out_dir, name))]
             if os.path.isdir(out_dir) else [])
  if earlier and not (overwrite or resume):
    raise UsageError("out_dir", f"{out_dir} holds an earlier run ({', '.join(earlier)}); "
                     "choose another folder, or overwrite it")
  parent = out_dir
  while not os.path.exists(parent):  # the nearest folder that exists must take new entries
    parent = os.path.dirname(os.path.abspath(parent))
  if not os.path.isdir(parent):
    raise UsageError("out_dir", f"cannot write to {out_dir}: {parent} is not a directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UsageError("out_dir", f"cannot write to {out_dir}: {parent} is read-only")
  return earlier


def prepare_out_dir(out_dir: str, *, overwrite: bool = False, resume: bool = False) -> str:
  """:func:`check_out_dir`, then creates ``out_dir`` and checks it is writable, before any work
  starts; with ``overwrite`` (and not ``resume``) bnraw's own earlier outputs are removed first
  (other files stay)."""
  earlier = check_out_dir(out_dir, overwrite=overwrite, resume=resume)
  try:
    os.makedirs(out_dir, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".probe-", dir=out_dir)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise UsageError("out_dir", f"cannot write to {out_dir}: {e.strerror or e}") from None
  if overwrite and not resume:
    for name in earlier:
      path = os.path.join(out_dir, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
  return out_dir


def environment() -> dict:
  """Versions and device, recorded in every output."""
  import tensorflow as tf
  gpus = tf.config.list_physical_devices("GPU")
  return {"tensorflow": tf.__version__, "python": platform.python_version(),
          "device": "GPU: " + ", ".join(g.name for g in gpus) if gpus else
          f"CPU ({os.cpu_count()} cores)"}
