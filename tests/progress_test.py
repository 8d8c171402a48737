"""The progress line: one line per epoch in a log, rewritten in place on a terminal."""

import io
import unittest
from types import SimpleNamespace

from bnraw.progress import EpochProgress, PassProgress


class Terminal(io.StringIO):
  def isatty(self):
    return True


class ProgressTest(unittest.TestCase):

  def test_log_gets_one_line_per_epoch_with_eta_until_the_last(self):
    stream = io.StringIO()
    progress = EpochProgress(3, stream=stream, steps_per_epoch=4)
    for epoch in range(3):
      progress(epoch, SimpleNamespace(loss=[1.5 - epoch], accuracy=[0.25 * epoch]))
    lines = stream.getvalue().splitlines()
    self.assertEqual(len(lines), 3)
    self.assertRegex(lines[0], r"^epoch 1/3  4 steps  loss 1\.5000  accuracy 0\.0000  \d+s  ETA ")
    self.assertRegex(lines[2], r"^epoch 3/3  4 steps  loss -0\.5000  accuracy 0\.5000  \d+s$")

  def test_terminal_line_is_rewritten_in_place(self):
    stream = Terminal()
    progress = EpochProgress(2, stream=stream, label="raw")
    for epoch in range(2):
      progress(epoch, SimpleNamespace(loss=[1.0], accuracy=[0.5]))
    text = stream.getvalue()
    self.assertEqual(text.count("\r"), 2)
    self.assertEqual(text.count("\n"), 1)  # only after the last epoch
    self.assertIn("\rraw epoch 2/2", text)


if __name__ == "__main__":
  unittest.main()


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class PassProgressTest(unittest.TestCase):

  def run_pass(self, progress, clock, total, per_batch, seconds_per_batch):
    progress("precise_bn: layer 1/2 (bn)", 0, total)
    done = 0
    while done < total:
      clock.now += seconds_per_batch
      done = min(done + per_batch, total)
      progress("precise_bn: layer 1/2 (bn)", done, total)

  def test_a_short_pass_prints_nothing(self):
    stream, clock = io.StringIO(), Clock()
    self.run_pass(PassProgress(stream, clock=clock), clock, 1000, 100, 0.2)  # 2 s in all
    self.assertEqual(stream.getvalue(), "")

  def test_a_long_pass_prints_rate_and_eta_then_its_total(self):
    stream, clock = io.StringIO(), Clock()
    # 20,000 examples at 100 per 0.5 s: 200 examples/s, 100 s
    self.run_pass(PassProgress(stream, clock=clock), clock, 20000, 100, 0.5)
    lines = stream.getvalue().splitlines()
    self.assertEqual(lines[0], "precise_bn: layer 1/2 (bn)  600/20,000 examples  "
                     "200 examples/s  ETA 1m37s")  # first due at 3 s
    self.assertEqual(len(lines), 1 + (100 - 3) // 5 + 1)  # then every 5 s, and at the end
    self.assertEqual(lines[-1], "precise_bn: layer 1/2 (bn)  20,000/20,000 examples  "
                     "200 examples/s  1m40s")
