"""Starts a multi-worker run as W local worker processes, for testing what runs on a cluster.

  bnraw-launch --workers=2 -- bnraw-train --epochs=10 --batch_size=64 --out_dir=runs/mw

Each process gets the command with its own TF_CONFIG (W workers on free localhost ports, worker 0
the chief) and --replicas=W added when the command has no --replicas. On a real cluster run the
same command line on every machine with a TF_CONFIG of your own (bnraw.cluster).

The chief's output comes through as is, the others' prefixed "[worker k]". When a worker fails
(exits non-zero or is killed), the others get --grace seconds to notice and stop on their own
(a survivor names the lost worker and exits 4: TensorFlow's health check finds a dead peer within
about a minute); then they are killed. The launcher exits 0 when every worker did, else with the
first failure's status (128 + signal for a killed worker), after one line saying who failed how.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from absl import flags

from bnraw.cli import app
from bnraw.errors import UsageError

flags.DEFINE_integer("workers", 2, "How many local worker processes.", lower_bound=2)
flags.DEFINE_float("grace", 90.0, "Seconds the other workers get to stop on their own after "
                   "one fails, before they are killed.", lower_bound=0)
FLAGS = flags.FLAGS


def check(argv):
  command = argv[1:]
  if not command:
    raise UsageError("", "give the command after --, e.g. bnraw-launch --workers=2 -- "
                     "bnraw-train --epochs=10")
  if shutil.which(command[0]) is None:
    raise UsageError("", f"no such command: {command[0]}")
  replicas = [a for a in command if a.startswith("--replicas=")]
  if replicas:
    value = replicas[-1].split("=", 1)[1]
    if not value.isdigit() or int(value) % FLAGS.workers:
      raise UsageError("workers", f"{FLAGS.workers} workers cannot share {replicas[-1]} "
                       "(one replica per device of each worker)")


def status_text(index: int, code: int) -> str:
  if code < 0:
    return f"worker {index} was killed by {signal.Signals(-code).name}"
  return f"worker {index} exited with status {code}"


def _relay(stream, prefix: str) -> None:
  for line in iter(stream.readline, b""):
    sys.stderr.buffer.write(prefix.encode() + line)
    sys.stderr.flush()


def launch(command: list[str], workers: int, grace: float) -> int:
  """Runs ``command`` as ``workers`` local workers (module docstring); their exit status."""
  from bnraw import cluster
  if not any(a == "--replicas" or a.startswith("--replicas=") for a in command):
    command = [*command, f"--replicas={workers}"]
  configs = cluster.local_tf_configs(cluster.free_ports(workers))
  processes, relays = [], []
  for index, config in enumerate(configs):
    piped = index > 0
    try:  # a session of its own: a terminal's Ctrl-C reaches a worker once, forwarded below
      process = subprocess.Popen(command, env={**os.environ, "TF_CONFIG": config},
                                 stdout=subprocess.PIPE if piped else None,
                                 stderr=subprocess.STDOUT if piped else None,
                                 start_new_session=True)
    except OSError as e:  # the workers started so far would wait for this one forever
      for started in processes:
        started.kill()
      raise UsageError("", f"cannot start worker {index}: {e}") from None
    processes.append(process)
    if piped:
      relay = threading.Thread(target=_relay, args=(process.stdout, f"[worker {index}] "),
                               daemon=True)
      relay.start()
      relays.append(relay)
  forward = lambda signum, frame: [p.send_signal(signum) for p in processes if p.poll() is None]
  previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
  failed, killed = None, []
  try:
    while [p.poll() for p in processes].count(None):  # polls every one
      if failed is None:
        failed = next(((i, p.returncode, time.monotonic()) for i, p in enumerate(processes)
                       if p.returncode not in (None, 0)), None)
      elif time.monotonic() - failed[2] > grace:
        for index, process in enumerate(processes):
          if process.poll() is None:
            process.kill()
            killed.append(index)
      time.sleep(0.1)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  for relay in relays:
    relay.join(timeout=5)
  if failed is None:
    failed = next(((i, p.returncode, 0) for i, p in enumerate(processes) if p.returncode), None)
  if failed is None:
    return 0
  others = [status_text(i, p.returncode) + (f" (killed after --grace={grace:g}s)"
                                            if i in killed else "")
            for i, p in enumerate(processes) if i != failed[0]]
  print(f"bnraw-launch: {status_text(failed[0], failed[1])} first; " + "; ".join(others),
        file=sys.stderr)
  return failed[1] if failed[1] > 0 else 128 - failed[1]


def main(argv):
  return launch(argv[1:], FLAGS.workers, FLAGS.grace)


def console():
  app.run(main, check, tensorflow=False)


if __name__ == "__main__":
  console()
