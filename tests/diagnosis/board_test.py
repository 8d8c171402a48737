"""The diagnosis as TensorBoard shows it: a real server over a run bnraw wrote, read through its
HTTP data API (tags, values, the report's text, the bar chart's pixels, the layout)."""

import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np
import tensorflow as tf
from PIL import Image

from bnraw import diagnosis
from bnraw.config import DataConfig, ModelConfig, TrainConfig
from bnraw.models.workload import from_seed


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class TensorBoardServerTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.result = diagnosis.run(from_seed(DataConfig(), ModelConfig(width=1 / 64),
                                         TrainConfig(epochs=3, mode="function")),
                               out_dir=cls.tmp.name,
                               every=1, progress=False)
    cls.port = free_port()
    cls.server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", f"--logdir={cls.tmp.name}/tensorboard",
         "--host=127.0.0.1", f"--port={cls.port}", "--reload_interval=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    deadline = time.monotonic() + 90
    while True:  # until the server answers and has read the run
      try:
        if "diagnosis/report" in json.dumps(cls.get("/data/plugin/text/tags")):
          break
      except OSError:
        pass
      if time.monotonic() > deadline or cls.server.poll() is not None:
        cls.tearDownClass()
        raise RuntimeError("TensorBoard did not come up with the run in 90 s")
      time.sleep(0.5)

  @classmethod
  def tearDownClass(cls):
    cls.server.terminate()
    cls.server.wait(timeout=30)
    cls.tmp.cleanup()
    super().tearDownClass()

  @classmethod
  def get(cls, path, raw=False):
    with urllib.request.urlopen(f"http://127.0.0.1:{cls.port}{path}", timeout=10) as response:
      body = response.read()
    return body if raw else json.loads(body)

  def query(self, plugin, route, **params):
    return self.get(f"/data/plugin/{plugin}/{route}?{urllib.parse.urlencode(params)}")

  def test_losses_and_parts_as_curves_over_epochs(self):
    tags = self.get("/data/plugin/scalars/tags")["."]
    for key in ("fit", "train_mode_final", "precise_bn", "evaluate"):
      self.assertIn(f"diagnosis/{key}", tags)
      points = self.query("scalars", "scalars", run=".", tag=f"diagnosis/{key}")
      expected = [row["losses"][key] for row in self.result["over_time"]]
      expected.append(self.result["losses"][key])
      self.assertEqual([p[1] for p in points], [1, 2, 3])  # [wall time, step, value]
      self.assertAllClose([p[2] for p in points], expected, rtol=1e-6)
    for key, value in self.result["attribution"].items():
      self.assertAllClose(self.query("scalars", "scalars", run=".",
                                     tag=f"attribution/{key}")[-1][2], value, atol=1e-6)
    layout = json.dumps(self.get("/data/plugin/custom_scalars/layout"))
    self.assertIn("losses: fit vs evaluate vs PreciseBN", layout)
    self.assertIn("^attribution/.*", layout)

  def test_report_text(self):
    text, = self.query("text", "text", run=".", tag="diagnosis/report")
    html = text["text"]
    self.assertIn("<table>", html)  # the markdown tables, rendered
    self.assertIn(f"{self.result['losses']['evaluate']:.4f}", html)
    printed = diagnosis.report(self.result)  # the text report and the dashboard agree
    if "no gap to explain" in printed:
      self.assertIn("no gap to explain", html)
    else:
      cause = printed.split("dominant cause: ")[1].split(" ")[0]
      self.assertIn(f"dominant cause: {cause}", html)

  def test_per_layer_bar_chart_and_amplification(self):
    tags = self.get("/data/plugin/images/tags")["."]
    self.assertIn("diagnosis/per_layer", tags)
    sample, = self.query("images", "images", run=".", tag="diagnosis/per_layer", sample=0)
    png = self.get(f"/data/plugin/images/individualImage?{sample['query']}", raw=True)
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    self.assertEqual(image.shape, (300, 640, 3))
    reds = ((image == (200, 60, 40)).all(-1)).any(0)  # columns holding a positive bar
    blues = ((image == (40, 100, 200)).all(-1)).any(0)
    contributions = [p["contribution"] for p in self.result["per_layer"]]
    slot = 640 / len(contributions)
    for i, value in enumerate(contributions):
      middle = int((i + 0.5) * slot)
      if abs(value) > 1e-3 * max(abs(v) for v in contributions):
        self.assertEqual(bool(reds[middle]), value > 0, msg=f"layer {i}")
        self.assertEqual(bool(blues[middle]), value < 0, msg=f"layer {i}")
    histograms = self.get("/data/plugin/histograms/tags")["."]
    for i in range(1, 9):
      self.assertIn(f"bn_{i}/amplification", histograms)


if __name__ == "__main__":
  tf.test.main()
