"""This machine, and what ``--mode=auto`` measured on it: a small cache of choices.

Measuring costs compiles: on a 2-core AVX-512 Xeon the XLA compile of the width-1/16 step alone
is ~5 s, about a tenth of a 500-epoch run. The choice depends on the machine and the workload
only, so it is kept in ``$BNRAW_CACHE_DIR/autotune.json`` (default ``~/.cache/bnraw``; ``off``:
never read or written) under a key made of both, and a later run of the same workload on the
same machine reuses it at no cost. Delete the file to measure again.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
from typing import Optional

from bnraw import outputs

CACHE_ENV = "BNRAW_CACHE_DIR"
CACHE_FILE = "autotune.json"


def fingerprint() -> dict:
  """What makes one machine's timings another's: CPU model and vector extensions, cores,
  GPUs, TensorFlow version."""
  import tensorflow as tf
  cpu, flags = platform.processor(), set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          cpu = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
  except OSError:
    pass
  return {"cpu": cpu, "cores": os.cpu_count(),
          "vector": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_tile"}),
          "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
          "tensorflow": tf.__version__}


def cache_path() -> Optional[str]:
  """Where choices are kept, or None when ``$BNRAW_CACHE_DIR`` is ``off``."""
  root = os.environ.get(CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "bnraw"))
  return None if root == "off" else os.path.join(root, CACHE_FILE)


def file_digest(path: str) -> str:
  """A short content hash of a file (a user's model, as part of a workload); of a folder (a
  saved dataset, a folder of images): of its files' relative paths and contents."""
  digest = hashlib.sha256()
  if os.path.isdir(path):
    for root, dirs, names in os.walk(path):
      dirs.sort()
      for name in sorted(names):
        file = os.path.join(root, name)
        digest.update(os.path.relpath(file, path).encode() + b"\0")
        digest.update(file_digest(file).encode())
    return digest.hexdigest()[:16]
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()[:16]


def _key(workload: dict) -> str:
  text = json.dumps({"machine": fingerprint(), "workload": outputs.jsonable(workload)},
                    sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _load(path: str) -> dict:
  try:
    with open(path) as f:
      cache = json.load(f)
  except (OSError, ValueError):  # absent or unreadable: measure again
    return {}
  return cache if isinstance(cache, dict) else {}


def choose_mode(model, optimizer, images, labels, *, mode: str, batch_size: int, trace: bool,
                workload: dict):
  """:func:`bnraw.core.autotune.choose`, remembering ``auto``'s choice per (machine,
  ``workload``): a remembered choice comes back with ``record["cached"] = True`` and its
  compile is the only cost. ``workload``: whatever decides the step's cost (model config,
  optimizer, batch size...); ``trace`` and the number of examples are added here."""
  from bnraw.core import autotune
  path = cache_path() if mode == "auto" else None
  if path is None:
    return autotune.choose(model, optimizer, images, labels, mode=mode, batch_size=batch_size,
                           trace=trace)
  key = _key({**workload, "batch_size": batch_size, "trace": trace, "examples": len(images)})
  known = _load(path).get(key)
  if isinstance(known, dict) and known.get("choice") in autotune.CANDIDATES:
    remembered = autotune.choose(model, optimizer, images, labels, mode=known["choice"],
                                 batch_size=batch_size, trace=trace)
    return dataclasses.replace(remembered, record={**known, "cached": True})
  choice = autotune.choose(model, optimizer, images, labels, mode=mode, batch_size=batch_size,
                           trace=trace)
  choice.record["measured_at"] = datetime.datetime.now().isoformat(timespec="seconds")
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    outputs.write_json(path, {**_load(path), key: choice.record})
  except OSError:  # a read-only home: measured again next time, nothing else changes
    pass
  return choice
