"""absl entry points: each module defines its flags at the top and a short ``main``.

``scripts/*.py`` run these modules; setup.cfg installs them as ``bnraw-*`` console commands.
"""

import contextlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def _stderr_fd_silenced():
  """Points file descriptor 2 at /dev/null for the duration (C++ logging bypasses sys.stderr)."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow and probes the devices with its start-up log lines hidden.

  TF 2.21 writes oneDNN/CUDA-stub notices through absl's C++ logger before any log level applies,
  and they bury the one line a script prints. Set BNRAW_TF_LOGS=1 to see them.
  """
  if os.environ.get("BNRAW_TF_LOGS") == "1":
    return
  with _stderr_fd_silenced():
    import tensorflow as tf
    tf.config.list_physical_devices("GPU")
  # Python-side warnings too (e.g. retracing notices when profile_xla builds many steps).
  tf.get_logger().setLevel("ERROR")
