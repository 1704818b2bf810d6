"""--mode=stats / cache_latents reuse a complete, matching result and redo a stale one."""
import os

from rae_jax.pipeline import builders, latents
from test_config_checks import load_config


def _config():
  c = load_config("demo")
  c.data.synthetic_size = 24
  c.eval.per_device_batch = 2  # 8 devices: global batch 16, two batches
  return c


def _count_encoder_builds(monkeypatch):
  calls = []
  original = builders.build_rae

  def build(*a, **k):
    calls.append(1)
    return original(*a, **k)
  monkeypatch.setattr(builders, "build_rae", build)
  return calls


def test_stats_reused_when_fingerprint_matches(tmp_path, monkeypatch):
  calls = _count_encoder_builds(monkeypatch)
  c = _config()
  path = latents.compute_stats(c, str(tmp_path))
  mtime = os.path.getmtime(path)
  assert latents.compute_stats(c, str(tmp_path)) == path and len(calls) == 1
  assert os.path.getmtime(path) == mtime
  c.seed = 1  # other flips and toy-encoder weights: recomputed
  latents.compute_stats(c, str(tmp_path))
  assert len(calls) == 2
  os.remove(path + ".json")  # killed before the fingerprint was written: redone
  latents.compute_stats(c, str(tmp_path))
  assert len(calls) == 3


def test_latent_cache_reused_resumed_or_moved_aside(tmp_path, monkeypatch):
  from rae_jax import data as data_lib
  calls = _count_encoder_builds(monkeypatch)
  c = _config()
  d = latents.cache_latents(c, str(tmp_path))
  assert sorted(data_lib.cached_indices(d).tolist()) == list(range(24))
  assert os.path.exists(os.path.join(d, latents.COMPLETE))
  latents.cache_latents(c, str(tmp_path))
  assert len(calls) == 1  # complete and matching: no encoder pass
  # Incomplete (no COMPLETE marker): only batches not fully cached are read.
  os.remove(os.path.join(d, latents.COMPLETE))
  reads = []
  original = latents.full_pass

  def spy(*a, **k):
    for out in original(*a, **k):
      reads.append(out[0])
      yield out
  monkeypatch.setattr(latents, "full_pass", spy)
  latents.cache_latents(c, str(tmp_path))
  assert reads == [] and os.path.exists(os.path.join(d, latents.COMPLETE))
  c.data.image_size = 32
  c.encoder.depth = 1  # another encoder: the old cache is moved aside, never mixed
  latents.cache_latents(c, str(tmp_path))
  assert os.path.isdir(str(tmp_path / "latents.stale"))
  assert sorted(data_lib.cached_indices(d).tolist()) == list(range(24)) and reads == [0, 1]
