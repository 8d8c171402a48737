"""Peak memory of a diagnosis read from a folder of images, against the number of images: the
measurement of docs/measurements.md ("Streaming"). Writes N JPEG files of 64x64 (10 classes)
and a small BN model fit on a few of them, then runs ``bnraw-diagnose`` on the folder as a
child process, once as the saved model is and once training its twin one epoch, and prints
each run's wall time and the child's peak resident memory.

  python scripts/stream_memory.py runs/stream 2000 20000

Arguments: a work folder, then one or more image counts.
"""

import os
import subprocess
import sys
import time

import numpy as np

SIZE, CLASSES = 64, 10


def write_images(folder: str, count: int) -> None:
  """``count`` JPEGs of SIZE x SIZE: a colour per class, a gradient and noise (so batch
  statistics vary), in CLASSES sub-folders."""
  from PIL import Image
  if os.path.isdir(folder) and sum(len(f) for _, _, f in os.walk(folder)) == count:
    return
  rng = np.random.default_rng(0)
  ramp = np.linspace(0, 60, SIZE)[None, :, None]
  for i in range(count):
    c = i % CLASSES
    os.makedirs(os.path.join(folder, f"class_{c}"), exist_ok=True)
    colour = np.array([25 * c, 255 - 25 * c, 120], float)
    pixels = colour + ramp + rng.normal(0, 20, (SIZE, SIZE, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        os.path.join(folder, f"class_{c}", f"{i:06d}.jpg"), quality=90)


def write_model(path: str, folder: str) -> None:
  import keras
  if os.path.exists(path):
    return
  keras.utils.set_random_seed(0)
  L = keras.layers
  inputs = keras.Input((SIZE, SIZE, 3))
  h = L.Rescaling(1 / 255)(inputs)
  for filters in (8, 16, 32):
    h = L.ReLU()(L.BatchNormalization()(L.Conv2D(filters, 3, strides=2, use_bias=False)(h)))
  outputs = L.Dense(CLASSES, activation="softmax")(L.GlobalAveragePooling2D()(h))
  model = keras.Model(inputs, outputs)
  model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
  data = keras.utils.image_dataset_from_directory(folder, image_size=(SIZE, SIZE),
                                                  batch_size=32, seed=0, verbose=False)
  model.fit(data.take(20), epochs=1, verbose=0)
  model.save(path)


def peak_rss(command: list) -> tuple[float, float]:
  """(seconds, peak resident MiB) of ``command`` run alone in a child process."""
  start = time.perf_counter()
  child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
  _, status, usage = os.wait4(child.pid, 0)
  if status:
    sys.exit(f"{' '.join(command)} failed ({status})")
  return time.perf_counter() - start, usage.ru_maxrss / 1024


def main(work: str, *counts: str) -> None:
  diagnose = os.path.join(os.path.dirname(sys.executable), "bnraw-diagnose")
  for count in map(int, counts):
    folder = os.path.join(work, f"images_{count}")
    write_images(folder, count)
    model = os.path.join(work, "model.keras")
    write_model(model, folder)
    for extra in ([], ["--epochs=1"]):
      out = os.path.join(work, f"out_{count}{'_train' if extra else ''}")
      seconds, rss = peak_rss([diagnose, f"--keras_model={model}", f"--data={folder}",
                               f"--out_dir={out}", "--overwrite", "--notensorboard", *extra])
      what = "twin trained 1 epoch" if extra else "saved model"
      print(f"{count:>6} images  {what:<21} {seconds:7.1f} s  peak RSS {rss:7.0f} MiB",
            flush=True)


if __name__ == "__main__":
  if len(sys.argv) < 3:
    sys.exit(__doc__)
  main(*sys.argv[1:])
