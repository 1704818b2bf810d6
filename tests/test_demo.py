"""The README's main command, end to end through the real CLI, at reduced step counts."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import REPO
from train_worker import xla_flags


def test_demo_all_modes_fast_variant(tmp_path):
  workdir = tmp_path / "demo"
  env = dict(os.environ, XLA_FLAGS=xla_flags(1),
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "main.py", "--config=configs/demo.py", f"--workdir={workdir}",
         "--config.stage1.optim.num_steps=6", "--config.stage2.optim.num_steps=6",
         "--config.checkpoint.every_steps=3", "--config.log.every_steps=3",
         "--config.data.synthetic_size=200", "--config.sampler.num_steps=4",
         "--config.sample.num_images=20"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  # Checkpoints of both stages (step 3 and the final step 6).
  for stage in ("stage1", "stage2"):
    steps = sorted(os.listdir(workdir / stage / "checkpoints"))
    assert "6" in steps and "3" in steps, (stage, steps)
    assert os.listdir(workdir / stage / "tensorboard")
  # The latent stats file has the latent's shape in the official (C, h, w) layout.
  with np.load(workdir / "stats" / "stat.npz") as f:
    assert f["mean"].shape == (64, 4, 4) and f["var"].shape == (64, 4, 4)
    assert (f["var"] > 0).all()
  # A non-empty PNG grid and the uint8 images it shows, one class per row of 8.
  grid = np.asarray(Image.open(workdir / "samples.png"))
  assert grid.ndim == 3 and grid.shape[2] == 3 and grid.std() > 0
  with np.load(workdir / "samples.npz") as f:
    assert f["arr_0"].shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(f["arr_1"], np.repeat(np.arange(10), 2))
  assert "[stage2] step 6/6" in proc.stderr

  # Re-running resumes: nothing left to train, and sampling again gives the same images.
  before = np.load(workdir / "samples.npz")["arr_0"]
  proc = subprocess.run(cmd + ["--mode=sample"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  np.testing.assert_array_equal(np.load(workdir / "samples.npz")["arr_0"], before)

  # The demo's eval at small N: sharded generation, ADM samples.npz, scores clearly labelled as
  # coming from random Inception weights (the real .pth is not available here).
  proc = subprocess.run(cmd + ["--mode=eval", "--config.eval.num_samples=20",
                               "--config.eval.shard_size=10", "--config.eval.per_device_batch=10"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with np.load(workdir / "eval" / "samples.npz") as f:
    assert f["arr_0"].shape == (20, 32, 32, 3) and f["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(f["arr_1"], minlength=10), np.full(10, 2))
  metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
  assert metrics["random_inception"] is True and "RANDOM" in metrics["inception"]
  assert np.isfinite(metrics["inception_score"])
  assert "RANDOM INCEPTION WEIGHTS" in proc.stderr
