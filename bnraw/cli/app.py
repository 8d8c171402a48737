"""What every command shares: TensorFlow imported quietly, and the one exit-status policy.

=====  ====================================================================================
0      done
2      bad input: one line naming the input and the problem, no traceback, nothing written
3      a step produced a non-finite value (the line names the step and the BN layer)
4      a multi-worker run lost a worker (the line names it); resume from the last checkpoint
128+s  stopped by signal s (130: Ctrl-C); a train run leaves a checkpoint to ``--resume``
=====  ====================================================================================

Each command module (``bnraw/cli/*.py``) defines its flags at the top, a ``check`` that refuses
bad or meaningless flag combinations before TensorFlow is imported, and a short ``main`` that
maps the flags onto typed configs and calls one library function; ``console()`` is
``run(main, check)``.
``scripts/*.py`` run the same modules; setup.cfg installs them as ``bnraw-*`` commands.
"""

import contextlib
import os
import sys
from typing import Callable, Optional

EXIT_USAGE = 2
EXIT_NON_FINITE = 3
EXIT_LOST_WORKER = 4

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _define_progress_flag() -> None:
  from absl import flags
  if "progress" not in flags.FLAGS:
    flags.DEFINE_bool("progress", True, "Progress lines on stderr: one per epoch, and for every "
                      "pass over the data longer than a few seconds (PreciseBN, evaluate, the "
                      "split): examples/s and ETA. --noprogress: quiet.")


_define_progress_flag()


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


def exit_status_for_signal(signum: int) -> int:
  return 128 + int(signum)


def _name() -> str:
  return os.path.basename(sys.argv[0])


def _fail(message: str) -> None:
  print(f"{_name()}: error: {message}", file=sys.stderr)
  sys.exit(EXIT_USAGE)


def _usage_message(error) -> str:
  """``--flag: problem`` where the input at fault is one of the command's flags."""
  from absl import flags
  if error.subject and error.subject in flags.FLAGS:
    return f"--{error.subject}: {error.problem}"
  return str(error)


def run(main: Callable[[list[str]], Optional[int]],
        check: Optional[Callable[[list[str]], None]] = None, *,
        tensorflow: bool = True) -> None:
  """``app.run(main)`` with the exit-status policy above; ``check(argv)`` runs first, before
  TensorFlow is imported, so bad flags cost no start-up (``tensorflow=False``: a command that
  never needs it, the launcher)."""
  from absl import app, flags, logging
  from bnraw.errors import UsageError

  def parse_flags(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      _fail(str(e))

  def guarded(argv):
    if not flags.FLAGS["verbosity"].present:  # TF's INFO lines (checkpoint sharding...) are noise
      logging.set_verbosity(logging.WARNING)
    try:
      if check is not None:
        check(argv)
      if not tensorflow:
        return main(argv)
      import_tensorflow_quietly()
      from bnraw.cluster import LostWorker
      from bnraw.core.loop import NonFiniteError
      from bnraw.core import batching
      from bnraw.progress import PassProgress
      try:
        with (batching.observing(PassProgress()) if flags.FLAGS.progress
              else contextlib.nullcontext()):
          return main(argv)
      except NonFiniteError as e:
        print(f"{_name()}: {e}; stopped.", file=sys.stderr)
        return EXIT_NON_FINITE
      except LostWorker as e:
        print(f"{_name()}: {e}; stopped (resume from the last checkpoint with --resume).",
              file=sys.stderr)
        return EXIT_LOST_WORKER
    except UsageError as e:
      _fail(_usage_message(e))
    except KeyboardInterrupt:
      print(f"{_name()}: interrupted.", file=sys.stderr)
      return exit_status_for_signal(2)

  app.run(guarded, flags_parser=parse_flags)
