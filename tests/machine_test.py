"""The auto mode's cache: a second run of the same workload on this machine reuses the choice,
another workload (or other data) measures; "off" writes nothing."""

import json
import os
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf

from bnraw import machine
from bnraw.config import ModelConfig
from bnraw.core import autotune
from bnraw.core.optim import Adam
from bnraw.models.seed import seed_network


def fake_measure(model, optimizer, images, labels, **kwargs):
  """What autotune.measure returns, without the compiles (measuring is autotune_test's)."""
  record = {"choice": "xla", "steps_timed": 3, "seconds": 1.0,
            "candidates": {"function": {"compile_s": 1.0, "step_ms": 2.0},
                           "xla": {"compile_s": 3.0, "step_ms": 1.0}}}
  return autotune.Choice("xla", None, record)


class CacheTest(tf.test.TestCase):

  def test_choice_is_measured_once_per_workload(self):
    x = np.zeros((16, 29, 29, 3), np.float32)
    y = np.arange(16, dtype=np.int32)
    net = seed_network(ModelConfig(width=1 / 64))
    opt = Adam(net.trainable_variables)

    def choose(workload, examples=16):
      return machine.choose_mode(net, opt, x[:examples], y[:examples], mode="auto",
                                 batch_size=8, trace=False, workload=workload)

    with tempfile.TemporaryDirectory() as root, \
        mock.patch.dict(os.environ, {machine.CACHE_ENV: root}), \
        mock.patch.object(autotune, "measure", side_effect=fake_measure) as measure:
      first = choose({"name": "a"})
      self.assertNotIn("cached", first.record)
      second = choose({"name": "a"})
      self.assertEqual(measure.call_count, 1)
      self.assertTrue(second.record["cached"])
      self.assertEqual((second.mode, second.record["candidates"]),
                       ("xla", first.record["candidates"]))
      self.assertIsNotNone(second.step_fn)  # compiled here for the remembered mode
      self.assertRegex(autotune.describe(second.record),
                       r"^auto mode: xla, as measured on this machine at .*autotune cache")
      choose({"name": "b"})  # another workload
      choose({"name": "a"}, examples=12)  # other data: another batch relaxation
      self.assertEqual(measure.call_count, 3)
      with open(os.path.join(root, machine.CACHE_FILE)) as f:
        self.assertLen(json.load(f), 3)
      self.assertEqual(choose({"name": "a"}, examples=12).mode, "xla")
      self.assertEqual(measure.call_count, 3)
    with mock.patch.dict(os.environ, {machine.CACHE_ENV: "off"}):
      self.assertIsNone(machine.cache_path())


if __name__ == "__main__":
  tf.test.main()
