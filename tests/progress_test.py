"""The progress line: one line per epoch in a log, rewritten in place on a terminal."""

import io
import unittest
from types import SimpleNamespace

from bnraw.progress import EpochProgress


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
