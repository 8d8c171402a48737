"""The seed's two cases: pixel values and labels."""

import os
import tempfile

import numpy as np
import tensorflow as tf
from PIL import Image

from bnraw.config import DataConfig
from bnraw.models.seed import default_image, load_image, make_dataset
from bnraw.errors import UsageError


class DataTest(tf.test.TestCase):

  def test_case_1_every_pixel_is_i(self):
    d = make_dataset(DataConfig(case=1))
    self.assertEqual(d.images.shape, (256, 29, 29, 3))
    self.assertEqual(d.images.dtype, np.float32)
    self.assertAllEqual(d.labels, np.arange(256))
    for i in (0, 1, 128, 255):
      self.assertAllEqual(d.images[i], np.full((29, 29, 3), np.float32(i) / np.float32(255)))

  def test_case_2_block_is_i_rest_is_photo(self):
    d = make_dataset(DataConfig(case=2))
    photo = load_image(None).astype(np.float32) / np.float32(255)
    block = np.zeros((29, 29), bool)
    block[12:16, 12:16] = True  # the seed code's 4x4 block
    for i in (0, 77, 255):
      self.assertAllEqual(d.images[i][block], np.full((16, 3), np.float32(i) / 255))
      self.assertAllEqual(d.images[i][~block], photo[~block])
    self.assertAllEqual(d.labels, np.arange(256))

  def test_block_flag(self):
    d = make_dataset(DataConfig(case=2, block=(10, 15)))  # the prose's 5x5
    self.assertAllEqual(d.images[200, 10:15, 10:15], np.full((5, 5, 3), np.float32(200) / 255))
    self.assertNotAllClose(d.images[200, 15, 15], np.full(3, np.float32(200) / 255))

  def test_default_image_is_deterministic_and_photo_like(self):
    a, b = np.asarray(default_image()), np.asarray(default_image())
    self.assertAllEqual(a, b)
    self.assertGreater(a.std(), 30)  # not flat

  def test_image_file_any_size_and_mode(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "grey.png")
      Image.fromarray(np.full((40, 50), 77, np.uint8), mode="L").save(path)
      photo = load_image(path)
      self.assertEqual(photo.shape, (29, 29, 3))
      self.assertAllEqual(photo, np.full((29, 29, 3), 77))

  def test_bad_images(self):
    with tempfile.TemporaryDirectory() as tmp:
      text = os.path.join(tmp, "notes.jpg")
      with open(text, "w") as f:
        f.write("not an image")
      with self.assertRaisesRegex(UsageError, "image: not an image"):
        load_image(text)
      with self.assertRaisesRegex(UsageError, "image: no such file"):
        load_image(os.path.join(tmp, "missing.png"))

  def test_bad_case_and_block(self):
    with self.assertRaisesRegex(UsageError, "case"):
      make_dataset(DataConfig(case=3))
    with self.assertRaisesRegex(UsageError, "block"):
      make_dataset(DataConfig(block=(20, 40)))


if __name__ == "__main__":
  tf.test.main()
