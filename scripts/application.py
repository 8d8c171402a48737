"""Builds a keras.applications model as a user would bring it, for the measurements of
docs/measurements.md ("Real architectures"): ``weights=None``, a small input, SGD(0.01,
momentum 0.9), fit one epoch on uniform [0, 255) images at batch 8, saved with its data.

  python scripts/application.py DenseNet121 32 runs/densenet   # -> model.keras, data.npz

Arguments: the keras.applications name, the input size, the output folder (optional: the
number of examples, default 24, and classes, default 10).
"""

import os
import sys

import numpy as np


def main(name: str, size: str, out: str, examples: str = "24", classes: str = "10") -> None:
  import keras
  size, examples, classes = int(size), int(examples), int(classes)
  os.makedirs(out, exist_ok=True)
  keras.utils.set_random_seed(0)
  model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3),
                                            classes=classes)
  model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                loss="categorical_crossentropy", metrics=["accuracy"])
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 255, (examples, size, size, 3)).astype("float32")
  y = keras.utils.to_categorical(rng.integers(0, classes, examples), classes)
  model.fit(x, y, batch_size=8, epochs=1, verbose=0)
  model.save(os.path.join(out, "model.keras"))
  np.savez(os.path.join(out, "data.npz"), x=x, y=y)
  print(f"{name}: {model.count_params():,} parameters, wrote {out}/model.keras and data.npz")


if __name__ == "__main__":
  if not 4 <= len(sys.argv) <= 6:
    sys.exit(__doc__)
  main(*sys.argv[1:])
