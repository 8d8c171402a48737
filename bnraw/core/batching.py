"""Keras's batching and epoch averaging, in one place: the per-epoch orders fit draws, the batches
it cuts them into, how a global batch is split over replicas, and the float32 ``Mean`` metrics
that average per-batch values into what fit and evaluate print (on N replicas too)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np


class MeanTracker:
  """Keras's ``Mean`` metric in float32: ``total += value * weight; count += weight``.

  On N replicas each replica's metric keeps its own (total, count) and adds its own shard; the
  result reads them as Keras's SUM-on-read variables: ``sum(totals) / sum(counts)``. One
  replica is the one-device metric exactly (``0 + total`` is ``total``)."""

  def __init__(self, total=0.0, count=0.0, *, replicas: int = 1):
    if np.ndim(total):  # a saved state of several replicas (:meth:`state`)
      replicas = len(total)
    self.totals = [np.float32(t) for t in np.broadcast_to(total, [replicas])]
    self.counts = [np.float32(c) for c in np.broadcast_to(count, [replicas])]

  def update(self, values, weights) -> None:
    """Each replica's mean ``values[r]`` over its ``weights[r]`` examples (or one scalar each)."""
    for r, (value, weight) in enumerate(zip(np.atleast_1d(values), np.atleast_1d(weights))):
      self.totals[r] = np.float32(self.totals[r] + np.float32(value) * np.float32(weight))
      self.counts[r] = np.float32(self.counts[r] + np.float32(weight))

  def add(self, totals, counts) -> None:
    """A metric's own update (``total += sum(values); count += size``): each ``totals[r]``
    already summed over ``counts[r]`` examples (or one scalar each)."""
    for r, (total, count) in enumerate(zip(np.atleast_1d(totals), np.atleast_1d(counts))):
      self.totals[r] = np.float32(self.totals[r] + np.float32(total))
      self.counts[r] = np.float32(self.counts[r] + np.float32(count))

  def result(self) -> float:
    total = np.float32(0)
    for t in self.totals:
      total = np.float32(total + t)
    count = np.float32(sum(self.counts))
    return float(total / count) if count else 0.0

  def state(self) -> tuple:
    """``(total, count)`` as floats (one replica) or lists (several), for :class:`FitState`."""
    if len(self.totals) == 1:
      return float(self.totals[0]), float(self.counts[0])
    return [float(t) for t in self.totals], [float(c) for c in self.counts]


def epoch_orders(seed: int, n: int):
  """The per-epoch example orders fit() draws: ``default_rng(seed).permutation(n)``, forever."""
  rng = np.random.default_rng(seed)
  while True:
    yield rng.permutation(n)


def data_orders(seed: int, images, batch_size: int):
  """The per-epoch orders a run on ``images`` draws: :func:`epoch_orders`, or for a folder of
  images (an ``x`` with ``epoch_order``) those of fit on Keras's shuffled dataset of it."""
  if not hasattr(images, "epoch_order"):
    yield from epoch_orders(seed, len(images))
    return
  epoch = 0
  while True:
    yield images.epoch_order(seed, batch_size, epoch)
    epoch += 1


def sorted_within_batches(order: np.ndarray, labels: np.ndarray,
                          batch_size: int) -> np.ndarray:
  """``order`` with each batch's examples sorted by label (stable): split contiguously over
  replicas, each shard then holds a band of labels (non-iid shards)."""
  return np.concatenate([chunk[np.argsort(labels[chunk], kind="stable")]
                         for chunk in batches(np.asarray(order), batch_size)])


def shard_bounds(batch: int, n: int) -> list[tuple[int, int]]:
  """Each replica's contiguous ``[start, stop)`` of a global batch of ``batch`` examples, as
  Keras's distributed dataset cuts it (measured): ``ceil(batch / n)`` to each replica in turn,
  the rest to the next, none after (10 over 4: 3, 3, 3, 1; 3 over 4: 1, 1, 1, 0)."""
  per = -(-batch // n)
  return [(min(r * per, batch), min((r + 1) * per, batch)) for r in range(n)]


def shard_sizes(batch: int, n: int) -> list[int]:
  """Each replica's number of examples of a global batch (:func:`shard_bounds`)."""
  return [stop - start for start, stop in shard_bounds(batch, n)]


def steps_per_epoch(examples: int, batch_size: int) -> int:
  """How many batches :func:`batches` cuts an epoch into (the last may be partial)."""
  return -(-examples // batch_size)


def batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
  """Consecutive slices of ``order``; the last one may be partial, as Keras's data adapter."""
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def mean_over_batches(one_batch: Callable, chunks, data: tuple, *, replicas: int = 1,
                      what: str = "") -> tuple[float, float]:
  """Keras's epoch averaging: ``one_batch(x_batch, y_batch) -> (loss, correct count)`` for
  each chunk of ``data = (x, y)`` (example indices, read by :func:`read_batches`, ``what``
  naming the pass), combined as fit/evaluate's float32 ``Mean`` metrics weighted by batch
  size; on ``replicas`` replicas each is per replica (``[N]``), weighted by its shard
  (:class:`MeanTracker`)."""
  loss_mean, accuracy_mean = MeanTracker(replicas=replicas), MeanTracker(replicas=replicas)
  chunks = list(chunks)
  for chunk, (xb, yb) in zip(chunks, read_batches(data[0], data[1], chunks, what)):
    loss, correct = one_batch(xb, yb)
    sizes = shard_sizes(len(chunk), replicas)
    loss_mean.update(np.asarray(loss, np.float32), sizes)
    accuracy_mean.add(np.asarray(correct, np.float32), sizes)
  return loss_mean.result(), accuracy_mean.result()


# -- reading batches: in memory, or streamed ------------------------------------------------------


def streamed(x) -> bool:
  """Whether ``x`` is read from storage batch by batch (it has ``batches``, as
  ``bnraw.models.data.ImageFolder``), not an array held in memory."""
  return hasattr(x, "batches")


_observers: list = []


@contextlib.contextmanager
def observing(observer: Callable):
  """While inside, ``observer(what, done, total)`` hears every pass of :func:`read_batches`
  as each batch is read (``done`` of ``total`` examples; ``done == 0`` when a pass starts):
  what draws the progress lines."""
  _observers.append(observer)
  try:
    yield observer
  finally:
    _observers.remove(observer)


def report(what: str, done: int, total: int) -> None:
  """Tells the observers of :func:`observing` that pass ``what`` has read ``done`` of
  ``total`` examples (``done == 0``: it starts); :func:`read_batches` calls it, and so may a
  pass that reads the data another way (the image check)."""
  for observer in _observers:
    observer(what, done, total)


def read_batches(x, y, chunks, what: str = "") -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """``(x[chunk], y[chunk])`` (``y`` None: None) for each chunk of example indices, in order:
  a streamed ``x`` (:func:`streamed`) through its own ``batches(chunks)``, which reads ahead;
  an array by indexing. The one place every pass over the data reads it (the observers of :func:`observing`
  hear it as ``what``)."""
  chunks = list(chunks)
  total = sum(len(chunk) for chunk in chunks)
  source = x.batches(chunks) if streamed(x) else (x[chunk] for chunk in chunks)
  done = 0
  report(what, done, total)
  for chunk, xb in zip(chunks, source):
    done += len(chunk)
    report(what, done, total)  # on reading (a reader that stops at the last batch hears it)
    yield xb, (y[chunk] if y is not None else None)
