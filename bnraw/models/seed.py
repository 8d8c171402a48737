"""The seed: its network (``model_toy``) as a raw :class:`bnraw.core.graph.Model`, its dataset,
and :func:`build`, which makes both plus the optimizer from the typed configs.

Network, NHWC: blocks 1-7 ``Conv2D(VALID, +bias) -> ReLU -> BN``; block 8 ``Flatten -> Dense ->
ReLU -> BN``; block 9 ``Dense`` (the softmax lives in the loss). Note ReLU comes *before* BN.
Variables: ``conv_{i}/kernel``, ``conv_{i}/bias`` (i = 1..7), ``dense_8/*``, ``dense_9/*`` and
``bn_{i}/{gamma,beta,moving_mean,moving_variance}`` (i = 1..8), in Keras's ``model.weights``
order.

Dataset: 256 images of 29x29x3, label i for image i. Case 1: every pixel of image i is i. Case 2:
a block of image i (rows/cols ``block``, default the seed code's 12:16) is i; the rest is the
photo. Values are float32 in [0, 1] (uint8 value / 255). The seed used a random ImageNet photo we
do not have; :func:`default_image` makes a deterministic stand-in, and any Pillow-readable file
works.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from bnraw.config import (CONV_BLOCKS, DTYPE_POLICIES, IMAGE_SIZE, NUM_IMAGES, DataConfig,
                          ModelConfig, TrainConfig)
from bnraw.errors import UsageError

MODEL_NAME = "model_toy"  # the seed's Keras model's name: its ops are named under it


def glorot_uniform(shape, seed: tuple[int, int]):
  """Keras's default kernel initialiser: U(-l, l), ``l = sqrt(6 / (fan_in + fan_out))``, fans
  counted over the receptive field (kh * kw * channels); stateless, so a seed fixes it."""
  import tensorflow as tf
  receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
  fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
  limit = np.sqrt(6.0 / (fan_in + fan_out))
  return tf.random.stateless_uniform(shape, seed, -limit, limit, dtype=tf.float32)


def cross_entropy_loss(labels, y_pred, logits=None):
  """The seed's compiled loss, categorical cross-entropy on its softmax output, from the
  logits the forward pass ends with (:func:`bnraw.core.ops.cross_entropy`)."""
  from bnraw.core import ops
  del logits  # y_pred is the logits: the model has no output activation of its own
  return ops.cross_entropy(y_pred, labels)


def seed_network(config: ModelConfig, seed: int = 0):
  """The seed's ``model_toy`` at ``config.width``, a chain of catalog layers and BN:
  kernels glorot-uniform from ``(seed, block)``, zero biases, the L2 penalty on every kernel
  when ``config.l2 > 0``, accuracy as the metric."""
  import functools
  from bnraw.core import catalog, ops
  from bnraw.core.graph import Model, chain
  from bnraw.core.layers import BatchNorm
  config = config.resolved()
  bn = dict(momentum=config.momentum, epsilon=config.epsilon, synchronized=config.sync_bn)
  dtype = dict(compute_dtype=config.compute_dtype)

  def linear(cls, name, shape, block, **options):
    return cls(name, glorot_uniform(shape, (seed, block)), np.zeros(shape[-1], np.float32),
               **dtype, **options)

  layers, channels_in, side = [], 3, IMAGE_SIZE
  for i, ((k, _), c) in enumerate(zip(CONV_BLOCKS, config.conv_channels()), start=1):
    layers += [linear(catalog.Conv2D, f"conv_{i}", [k, k, channels_in, c], i,
                      as_matmul=config.fast_conv),
               catalog.ReLU(f"relu_{i}", **dtype),
               BatchNorm(f"bn_{i}", c, bessel=config.bessel, **bn)]
    channels_in, side = c, side - (k - 1)
  units = config.dense_units()
  layers += [catalog.Flatten("flatten", **dtype),
             linear(catalog.Dense, "dense_8", [side * side * channels_in, units], 8),
             catalog.ReLU("relu_8", **dtype),
             BatchNorm("bn_8", units, bessel=config.bessel and config.bessel_scope == "all", **bn),
             linear(catalog.Dense, "dense_9", [units, NUM_IMAGES], 9)]
  penalty = functools.partial(ops.l2_penalty, l2=config.l2)
  regularizers = ([(layer.kernel, penalty) for layer in layers if hasattr(layer, "kernel")]
                  if config.l2 > 0 else [])
  return Model(MODEL_NAME, chain(layers), loss_fn=cross_entropy_loss,
               metric_fn=lambda labels, logits: ops.argmax_hits(logits, labels),
               regularizers=regularizers, compute_dtype=config.compute_dtype)


class Setup(NamedTuple):
  data: "Dataset"
  model: object  # bnraw.core.graph.Model
  optimizer: object


def workload(model: ModelConfig, train: TrainConfig) -> dict:
  """What decides the seed's step time (the auto mode's cache key, with the machine): the
  network's shape, the block-7 matmul, the L2 term and the optimizer; not the data, seeds,
  momentum or learning rate."""
  return {"network": "seed", "width": model.resolved().width, "fast_conv": model.fast_conv,
          "l2": model.l2 > 0, "optimizer": train.optimizer, "dtype_policy": model.dtype_policy}


def loss_scale_fits(value: float) -> bool:
  """Whether ``value`` is a positive float32 (the loss scale is a float32 variable)."""
  return 0 < value <= float(np.finfo(np.float32).max) and np.float32(value) > 0


def check(data: DataConfig, model: ModelConfig, train: TrainConfig) -> None:
  """Refuses settings that do not fit the seed, cheaply: builds nothing, imports no TensorFlow
  (the photo is read when one is given)."""
  if data.case not in (1, 2):
    raise UsageError("case", f"must be 1 or 2, got {data.case}")
  check_block(data.block)
  if data.image is not None:
    load_image(data.image)
  if train.steps_per_execution < 1:
    raise UsageError("steps_per_execution", f"must be >= 1, got {train.steps_per_execution}")
  if not 1 <= train.batch_size <= NUM_IMAGES:
    raise UsageError("batch_size", f"must be in [1, {NUM_IMAGES}] (the dataset has "
                     f"{NUM_IMAGES} images)")
  if model.bessel and (train.batch_size == 1 or NUM_IMAGES % train.batch_size == 1):
    raise UsageError("bessel", "every batch needs >= 2 images (n/(n-1) is infinite for n = 1)")
  if not 0 <= model.momentum <= 1:
    raise UsageError("momentum", f"must be in [0, 1], got {model.momentum}")
  if model.width is not None and not model.width > 0:
    raise UsageError("width", f"must be > 0, got {model.width}")
  if model.dtype_policy not in DTYPE_POLICIES:
    raise UsageError("dtype_policy", f"must be one of {', '.join(DTYPE_POLICIES)}, got "
                     f"{model.dtype_policy!r}")
  if train.loss_scale is not None:
    if model.dtype_policy != "mixed_float16":
      raise UsageError("loss_scale", "only applies with --dtype_policy=mixed_float16 (Keras "
                       "scales the loss under that policy only)")
    if not loss_scale_fits(train.loss_scale):
      raise UsageError("loss_scale", f"must be a float32 number > 0 (up to 3.4e38), got "
                       f"{train.loss_scale}")
  if train.replicas < 1:
    raise UsageError("replicas", f"must be >= 1, got {train.replicas}")
  if train.replicas > 1:
    check_shards(NUM_IMAGES, train.batch_size, train.replicas)
  if train.shards not in ("iid", "sorted"):
    raise UsageError("shards", f"must be iid or sorted, got {train.shards!r}")
  if train.shards == "sorted" and train.replicas == 1:
    raise UsageError("shards", "sorts each global batch before it is split over replicas: "
                     "needs --replicas > 1")
  if train.replicas > 1 and (model.l2 or model.dtype_policy != "float32" or model.bessel):
    raise UsageError("replicas", "runs float32 without --l2 or --bessel for now (the "
                     "per-replica scaling of regularisation and loss scaling are not written "
                     "out and checked against Keras yet)")
  if train.replicas > 1 and train.steps_per_execution > 1:
    raise UsageError("replicas", "runs one step per call (--steps_per_execution=1)")
  if train.optimizer not in ("adam", "sgd"):
    raise UsageError("optimizer", f"must be adam or sgd, got {train.optimizer!r}")


def build(data: DataConfig, model: ModelConfig, train: TrainConfig) -> Setup:
  """Dataset, raw network (seeded initial weights) and optimizer, after :func:`check`."""
  from bnraw.core.optim import make_optimizer
  check(data, model, train)
  dataset = make_dataset(data)
  net = seed_network(model, seed=train.seed)
  optimizer = make_optimizer(train.optimizer, net.trainable_variables, train.lr,
                             train.sgd_momentum, train.nesterov,
                             loss_scale=train.initial_loss_scale(model))
  return Setup(dataset, net, optimizer)


class Dataset(NamedTuple):
  images: np.ndarray  # [256, 29, 29, 3] float32 in [0, 1]
  labels: np.ndarray  # [256] int32, labels[i] == i


def default_image(size: int = 96) -> Image.Image:
  """A deterministic photo-like RGB image: smooth colour gradients, rings and a few edges."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
  r = 0.5 + 0.5 * np.sin(6.0 * xx + 2.0 * yy)
  g = 0.5 + 0.5 * np.cos(9.0 * np.hypot(xx - 0.4, yy - 0.6))
  b = np.clip(0.3 + 0.7 * yy * (xx > 0.35) + 0.2 * (np.hypot(xx - 0.7, yy - 0.3) < 0.15), 0, 1)
  rgb = np.stack([r, g, b], axis=-1)
  return Image.fromarray(np.round(255.0 * rgb).astype(np.uint8), mode="RGB")


def load_image(path: str | None) -> np.ndarray:
  """The photo as uint8 ``[29, 29, 3]``: RGB, resized with Pillow's default filter."""
  if path is None:
    image = default_image()
  else:
    try:
      with Image.open(path) as opened:
        image = opened.convert("RGB")
    except FileNotFoundError:
      raise UsageError("image", f"no such file: {path}") from None
    except UnidentifiedImageError:
      raise UsageError("image", f"not an image Pillow can read: {path}") from None
    except OSError as e:
      raise UsageError("image", f"cannot read {path}: {e.strerror or e}") from None
  return np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.uint8)


def check_shards(examples: int, batch_size: int, replicas: int) -> None:
  """Batches Keras's fit can split over the replicas: the first must divide evenly (else
  Keras's own symbolic build fails, keras-team/keras#19246) and the last partial one must leave
  every replica an example (an empty shard's BN moments are NaN, written into that replica's
  copy)."""
  if batch_size % replicas:
    raise UsageError("replicas", f"need a batch size {replicas} replicas divide (Keras's fit "
                     f"fails on a first batch they do not, keras-team/keras#19246), got "
                     f"{batch_size}")
  last = examples % batch_size
  per = -(-last // replicas)
  if last and per * (replicas - 1) >= last:
    raise UsageError("replicas", f"the last batch ({last} of {examples} examples) would leave a "
                     f"replica no example (shards of {per}): its BN copy would turn NaN; pick "
                     "another batch size")


def refuse_replicas(train: TrainConfig, tool: str) -> None:
  """For a tool that runs on one device so far (the sweep): replicas refused."""
  if train.replicas > 1:
    raise UsageError("replicas", f"{tool} runs on one device so far; bnraw-train, "
                     "bnraw-compare, bnraw-diagnose and bnraw-profile run replicas")


def replicated(train: TrainConfig):
  """The strategy for a run on ``train.replicas`` replicas: the devices split
  (bnraw.core.replicas), or with a cluster in ``TF_CONFIG`` (bnraw.cluster) a
  MultiWorkerMirroredStrategy over its workers (xla only on GPUs; the mode replicas run in is
  bnraw.models.workload.Workload.replica_mode). Every problem a UsageError."""
  import tensorflow as tf
  from bnraw import cluster as clusters
  from bnraw.core import replicas
  if train.mode == "xla" and not tf.config.list_physical_devices("GPU"):
    raise UsageError("mode", "xla with --replicas needs GPUs: XLA cannot run a replica on a "
                     "logical CPU device")
  cluster = clusters.from_environment()
  try:
    if cluster is None:
      strategy = replicas.strategy_for(train.replicas)
    else:
      clusters.check_replicas(cluster, train.replicas)
      strategy = replicas.multi_worker_strategy()
  except RuntimeError:
    raise UsageError("replicas", "the devices must be split before TensorFlow starts: run "
                     "with --replicas in a fresh process") from None
  if strategy.num_replicas_in_sync != train.replicas:
    where = (f"the {cluster.workers} workers in TF_CONFIG hold" if cluster is not None
             else "this machine gives")
    raise UsageError("replicas", f"{where} {strategy.num_replicas_in_sync} devices in all, one "
                     f"replica each: give --replicas={strategy.num_replicas_in_sync}")
  return strategy


def check_block(block: tuple[int, int]) -> None:
  start, stop = block
  if not 0 <= start < stop <= IMAGE_SIZE:
    raise UsageError("block", f"need 0 <= start < stop <= {IMAGE_SIZE}, got {start}:{stop}")


def make_dataset(config: DataConfig) -> Dataset:
  """Case 1 or 2 of the seed, as float32 images / 255 and int32 labels 0..255."""
  if config.case not in (1, 2):
    raise UsageError("case", f"must be 1 or 2, got {config.case}")
  check_block(config.block)
  photo = load_image(config.image)
  values = np.arange(NUM_IMAGES, dtype=np.float32)[:, None, None, None]
  if config.case == 1:
    images = np.broadcast_to(values, (NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
  else:
    images = np.repeat(photo[None].astype(np.float32), NUM_IMAGES, axis=0)
    start, stop = config.block
    images[:, start:stop, start:stop, :] = values
  return Dataset(images / np.float32(255.0), np.arange(NUM_IMAGES, dtype=np.int32))
