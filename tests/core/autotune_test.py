"""auto mode: it measures on a snapshot of the state, picks the fastest, and the run it hands
its step to is the one that mode would run anyway."""

from unittest import mock

import numpy as np
import tensorflow as tf

from bnraw.config import ModelConfig
from bnraw.core import autotune, loop
from bnraw.core.optim import Adam, LossScale
from bnraw.models.seed import seed_network
from tests.core.examples import random_examples

CONFIG = ModelConfig(width=1 / 64)


def data(n=40, seed=0):
  return random_examples(n, seed)


class AutotuneTest(tf.test.TestCase):

  def test_the_loss_scale_is_put_back_too(self):
    # measuring times applied steps (scale 1); the run then starts from its own scale
    net = seed_network(ModelConfig(width=1 / 64, dtype_policy="mixed_float16"))
    opt = LossScale(Adam(net.trainable_variables), initial_scale=1e30)
    x, y = data(16)
    autotune.measure(net, opt, x, y, batch_size=16, trace=False, candidates=("eager",), steps=1)
    self.assertEqual(opt.dynamic_scale.numpy(), np.float32(1e30))
    self.assertEqual((int(opt.step_counter), int(opt.skipped_steps), int(opt.iterations)),
                     (0, 0, 0))

  def test_measuring_leaves_the_state_as_it_was_and_the_run_unchanged(self):
    x, y = data()
    net = seed_network(CONFIG, seed=4)
    opt = Adam(net.trainable_variables)
    loop.fit(net, opt, x, y, batch_size=16, epochs=1, seed=0, mode="function")  # slots != 0
    before = [v.numpy() for v in (*net.variables, *opt.momentums, *opt.velocities)]
    iterations = int(opt.iterations)
    choice = autotune.measure(net, opt, x, y, batch_size=16, trace=True, relax_batch=True,
                              candidates=("eager", "function"), steps=2)
    after = [v.numpy() for v in (*net.variables, *opt.momentums, *opt.velocities)]
    for a, b in zip(before, after):
      self.assertAllEqual(b, a)
    self.assertEqual(int(opt.iterations), iterations)

    record = choice.record
    self.assertEqual(set(record["candidates"]), {"eager", "function"})
    timings = {mode: c["step_ms"] for mode, c in record["candidates"].items()}
    self.assertEqual(record["choice"], min(timings, key=timings.get))
    self.assertEqual(choice.mode, record["choice"])
    self.assertIn(record["steps_timed"], (1, 2))  # eager is clearly slower: it may stop at 1
    self.assertGreater(record["seconds"], sum(timings.values()) * record["steps_timed"] / 1e3)
    self.assertRegex(autotune.describe(record),
                     r"^auto mode: (eager|function) \(eager [0-9.]+ ms/step, function [0-9.]+ "
                     r"ms/step; [0-9.]+ s to measure\)$")

    # The measured step, handed to the run, runs exactly what that mode runs from this state.
    tuned = loop.fit(net, opt, x, y, batch_size=16, epochs=3, seed=7, mode=choice.mode,
                     trace=True, step_fn=choice.step_fn, resume=None)
    tuned_vars = [v.numpy() for v in net.variables]
    for variable, value in zip((*net.variables, *opt.momentums, *opt.velocities), before):
      variable.assign(value)
    opt.iterations.assign(iterations)
    plain = loop.fit(net, opt, x, y, batch_size=16, epochs=3, seed=7, mode=choice.mode,
                     trace=True)
    self.assertEqual(tuned.loss, plain.loss)
    for a, b in zip(tuned_vars, net.variables):
      self.assertAllEqual(b, a)

  def test_a_mode_that_cannot_run_here_is_dropped(self):
    x, y = data()
    net = seed_network(CONFIG, seed=4)
    real = autotune.make_train_step

    def make(model, optimizer, *, mode, **kwargs):
      if mode != "xla":
        return real(model, optimizer, mode=mode, **kwargs)
      def broken(images, labels):
        raise tf.errors.InvalidArgumentError(None, None, "no XLA kernel for Foo\nand more")
      return broken

    with mock.patch.object(autotune, "make_train_step", make):
      choice = autotune.measure(net, Adam(net.trainable_variables), x, y, batch_size=16,
                                trace=False, steps=1)
    self.assertEqual(choice.mode, "function")
    self.assertEqual(set(choice.record["candidates"]), {"function"})
    self.assertEqual(choice.record["failed"], {"xla": "InvalidArgumentError: no XLA kernel for Foo"})

  def test_explicit_mode_is_not_measured(self):
    x, y = data()
    net = seed_network(CONFIG, seed=4)
    choice = autotune.choose(net, Adam(net.trainable_variables), x, y, mode="xla",
                             batch_size=16, trace=False)
    self.assertEqual((choice.mode, choice.record), ("xla", None))


if __name__ == "__main__":
  tf.test.main()
