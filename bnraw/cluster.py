"""Many machines: the cluster a worker belongs to, read from the standard ``TF_CONFIG``, and what
a worker says when a peer is lost. No TensorFlow here: the command line reads it before
TensorFlow starts.

``TF_CONFIG`` (as ``tf.distribute.MultiWorkerMirroredStrategy`` reads it)::

    {"cluster": {"worker": ["host0:port", "host1:port"]}, "task": {"type": "worker", "index": 1}}

Roles: the ``chief`` task if the cluster has one, else worker 0, is the chief: it alone writes the
run's outputs and checkpoints; every worker computes every step (the all-reduces and all-gathers
need them all) and reads the same ``out_dir`` to resume, so on a real cluster ``out_dir`` must be
storage every worker sees. ``bnraw-launch`` writes one ``TF_CONFIG`` per local process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
from typing import Mapping, Optional

from bnraw.errors import UsageError

ROLES = ("chief", "worker")  # the tasks that compute, in the order MultiWorkerMirroredStrategy
                             # numbers their replicas


@dataclasses.dataclass(frozen=True)
class Cluster:
  """One worker's view: every computing task's address by role, and its own role and index."""

  tasks: dict  # role -> [address, ...]
  task_type: str
  task_index: int

  @property
  def workers(self) -> int:
    """How many tasks compute (chief and workers)."""
    return sum(len(self.tasks.get(role, ())) for role in ROLES)

  @property
  def is_chief(self) -> bool:
    if "chief" in self.tasks:
      return self.task_type == "chief"
    return self.task_type == "worker" and self.task_index == 0

  def name(self, task_type: str, index: int) -> str:
    """``"worker 1 (localhost:4242)"``."""
    addresses = self.tasks.get(task_type, [])
    where = f" ({addresses[index]})" if index < len(addresses) else ""
    return f"{task_type} {index}{where}"


def from_environment(env: Mapping[str, str] = os.environ) -> Optional[Cluster]:
  """The cluster ``TF_CONFIG`` describes, or None without one (or with a single task, which is
  one machine). Malformed: a UsageError naming ``TF_CONFIG``."""
  text = env.get("TF_CONFIG", "").strip()
  if not text:
    return None
  try:
    config = json.loads(text)
    tasks = {role: addresses for role, addresses in config["cluster"].items() if role in ROLES}
    if not all(isinstance(a, list) and all(isinstance(x, str) for x in a)
               for a in tasks.values()):
      raise TypeError("each role needs a list of \"host:port\" strings")
    task_type, task_index = config["task"]["type"], int(config["task"]["index"])
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise UsageError("TF_CONFIG", f"not a cluster description ({type(e).__name__}: {e}); expected "
                     '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", '
                     '"index": 0}}') from None
  if task_type not in tasks or not 0 <= task_index < len(tasks[task_type]):
    raise UsageError("TF_CONFIG", f"task {task_type} {task_index} is not in the cluster "
                     f"{json.dumps(tasks)}")
  cluster = Cluster(tasks, task_type, task_index)
  return cluster if cluster.workers > 1 else None


def is_chief(cluster: Optional[Cluster]) -> bool:
  """Whether this process writes the run's outputs (always, without a cluster)."""
  return cluster is None or cluster.is_chief


def check_replicas(cluster: Cluster, replicas: int) -> None:
  """A worker runs one replica per device; ``replicas`` must be a multiple of the workers."""
  if replicas % cluster.workers:
    raise UsageError("replicas", f"must be a multiple of the {cluster.workers} workers in "
                     f"TF_CONFIG (one replica per device of each), got {replicas}")


_PEER = re.compile(r"/job:(\w+)(?:/replica:\d+)?/task:(\d+)")


def lost_peer(cluster: Cluster, error_text: str) -> str:
  """Which task a collective's error blames (``"worker 1 (localhost:4242)"``), from the peer
  TensorFlow names in it, or ``"a peer"`` when it names none other than this task."""
  for role, index in _PEER.findall(error_text):
    if (role, int(index)) != (cluster.task_type, cluster.task_index):
      return cluster.name(role, int(index))
  return "a peer"


def names_a_peer(error_text: str) -> bool:
  """Whether a TensorFlow error is a collective aborted over a peer (one to call a lost
  worker), not some other failure."""
  return "Collective ops is aborted" in error_text or bool(_PEER.search(error_text))


def free_ports(n: int) -> list[int]:
  """``n`` distinct TCP ports free on localhost now (held open together while chosen)."""
  sockets = []
  try:
    for _ in range(n):
      s = socket.socket()
      s.bind(("localhost", 0))
      sockets.append(s)
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def local_tf_configs(ports: list[int]) -> list[str]:
  """One ``TF_CONFIG`` per local worker process on ``ports`` (worker 0 is the chief)."""
  cluster = {"worker": [f"localhost:{port}" for port in ports]}
  return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
          for i in range(len(ports))]


class LostWorker(RuntimeError):
  """A peer of a multi-worker run stopped answering: the run cannot go on (exit status 4)."""


__all__ = ["Cluster", "LostWorker", "check_replicas", "free_ports", "from_environment",
           "is_chief", "local_tf_configs", "lost_peer", "names_a_peer"]
