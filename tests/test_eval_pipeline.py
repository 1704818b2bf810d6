"""Sharded evaluation: device-count independence, resume, end-to-end eval, fid_stats, PSNR/SSIM.

A tiny DiTDH and a toy RAE are built here and saved as weight snapshots in a temp workdir; the
FID Inception is random (no weights file), so only a few small images ever go through it.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from conftest import rel_err

from rae_jax import presets
from rae_jax.eval import recon, sample_shards, scoring
from rae_jax.pipeline import builders, evaluate, loaders, snapshots
from rae_jax.train import mesh as mesh_lib

NUM_CLASSES = 4


def tiny_config():
  c = presets.base_config()
  c.data.source = "synthetic"
  c.data.image_size = 16
  c.data.num_classes = NUM_CLASSES
  c.data.synthetic_size = 8
  c.data.num_threads = 2
  c.encoder.name = "toy_vit"
  c.encoder.path = ""
  c.encoder.input_size = 16
  c.encoder.patch_size = 8
  c.encoder.hidden_size = 16
  c.encoder.depth = 1
  c.encoder.num_heads = 2
  c.decoder.patch_size = 8
  c.decoder.decoder_hidden_size = 32
  c.decoder.decoder_num_hidden_layers = 1
  c.decoder.decoder_num_attention_heads = 2
  c.decoder.decoder_intermediate_size = 64
  c.model = presets.ditdh((32, 48), (1, 1), (2, 2), input_size=2, in_channels=16,
                          num_classes=NUM_CLASSES)
  c.transport.shift_dim = presets.shift_dim(2, 16)
  c.transport.shift_base = 64
  c.sampler.num_steps = 3
  c.guidance.method = "cfg"
  c.guidance.scale = 1.5
  c.eval.num_samples = 16
  c.eval.per_device_batch = 1
  c.eval.shard_size = 6
  c.eval.inception_weights = ""  # -> random weights, labelled
  c.mesh.fsdp = -1
  return c


def _random_like(shapes, seed):
  """Random parameter values without compiling an init (CPU compile time dominates tests)."""
  rng = np.random.default_rng(seed)
  def one(path, s):
    name = jax.tree_util.keystr(path)
    base = 1.0 if "norm" in name.lower() and name.endswith("['scale']") else 0.0
    return (base + 0.05 * rng.standard_normal(s.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(one, shapes)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Toy RAE (random encoder from the seed, random decoder) + random tiny DiTDH, saved."""
  wd = str(tmp_path_factory.mktemp("eval_wd"))
  config = tiny_config()
  rae, variables = builders.build_rae(config, wd)
  model = builders.build_stage2_model(config.model)
  shapes = jax.eval_shape(lambda k: builders.init_stage2_params(model, rae.latent_shape, k),
                          jax.random.PRNGKey(0))
  snapshots.save_weights(wd, builders.STAGE2_DIR, _random_like(shapes, 1))
  snapshots.save_weights(wd, builders.STAGE1_DIR, variables["decoder"])
  return wd


@pytest.fixture(scope="module")
def samplers(workdir):
  """Samplers over 8 devices and over 1 device, from the same loaded weights."""
  config = tiny_config()
  mesh8 = mesh_lib.make_mesh(1, -1, devices=jax.devices())
  models = evaluate.load_generation(config, workdir, mesh8)
  mesh1 = mesh_lib.make_mesh(1, -1, devices=jax.devices()[:1])
  on1 = {k: jax.device_put(v, mesh_lib.replicated(mesh1)) if k in ("params", "rae_vars") else v
         for k, v in models.items()}
  return {8: evaluate.bind_sampler(config, models, mesh8),
          1: evaluate.bind_sampler(config, on1, mesh1)}


def test_sharded_sampling_is_device_count_independent(samplers):
  indices = np.array([0, 3, 5, 9, 12, 17, 18, 19, 7, 2, 11], np.int32)
  labels = (indices % NUM_CLASSES).astype(np.int32)
  eight, one = samplers[8], samplers[1]
  a, b = eight(labels, indices), one(labels, indices)
  assert a.shape == (len(indices), 16, 16, 3) and a.dtype == np.uint8
  assert a.std() > 1.0  # real images, not a constant
  # Same pixels whatever the device count (allow a rare 1-level rounding flip).
  diff = np.abs(a.astype(int) - b.astype(int))
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
  # The sample of an index does not depend on its batch: permuted request -> permuted images.
  perm = np.random.default_rng(0).permutation(len(indices))
  c = eight(labels[perm], indices[perm])
  assert np.abs(c.astype(int) - a[perm].astype(int)).max() <= 1
  # Different indices -> different noise -> different images.
  assert np.abs(a[0].astype(int) - a[1].astype(int)).mean() > 0.5


def test_generation_resumes_without_redoing_shards(samplers, tmp_path):
  config = tiny_config()
  sample_fn = samplers[8]
  labels = evaluate.eval_labels(config, 20)
  np.testing.assert_array_equal(np.bincount(labels), [5] * NUM_CLASSES)
  calls = []

  def counting(y, i):
    calls.append((int(i[0]), len(i)))
    return sample_fn(y, i)

  class Preempted(Exception):
    pass

  def stop_after_two(i, path):
    if i == 1:
      raise Preempted

  d = str(tmp_path / "shards")
  with pytest.raises(Preempted):
    sample_shards.generate_shards(counting, labels, d, 6, manifest={"run": 1},
                               on_shard=stop_after_two)
  assert calls == [(0, 6), (6, 6)]
  done = [sample_shards.shard_path(d, i) for i in range(2)]
  mtimes = [os.stat(p).st_mtime_ns for p in done]
  calls.clear()
  paths = sample_shards.generate_shards(counting, labels, d, 6, manifest={"run": 1})
  assert calls == [(12, 6), (18, 2)]  # only the missing shards
  assert [os.stat(p).st_mtime_ns for p in done] == mtimes
  out = sample_shards.assemble_samples_npz(paths, str(tmp_path / "resumed.npz"))

  calls.clear()
  d2 = str(tmp_path / "shards_straight")
  paths2 = sample_shards.generate_shards(counting, labels, d2, 6, manifest={"run": 1})
  assert len(calls) == 4
  ref = sample_shards.assemble_samples_npz(paths2, str(tmp_path / "straight.npz"))
  with np.load(out) as x, np.load(ref) as y:
    np.testing.assert_array_equal(x["arr_0"], y["arr_0"])
    np.testing.assert_array_equal(x["arr_1"], labels)
    assert x["arr_0"].shape == (20, 16, 16, 3) and x["arr_0"].dtype == np.uint8
  # A different evaluation must not reuse these shards.
  with pytest.raises(ValueError, match="changed: \\['run'\\]"):
    sample_shards.generate_shards(counting, labels, d, 6, manifest={"run": 2})


def test_scorer_batches_cover_images_in_order():
  """Global batches hold images 0..n-1 in order, the short last one padded with the last."""
  imgs = np.random.default_rng(0).integers(0, 255, size=(19, 5, 5, 3), dtype=np.uint8)
  for devices in (jax.devices(), jax.devices()[:1]):
    scorer = scoring.Scorer(mesh_lib.make_mesh(devices=devices), None, True, 3)
    got, real = [], []
    for x, n in scorer.global_batches(scoring.array_reader(imgs), len(imgs)):
      assert x.shape[0] == scorer.global_batch
      assert x.sharding.is_equivalent_to(mesh_lib.batch_sharding(scorer.mesh), 4)
      got.append(np.asarray(x))
      real.append(n)
    got = np.concatenate(got)
    assert sum(real) == 19
    np.testing.assert_array_equal(got[:19], imgs)
    assert (got[19:] == imgs[-1]).all()


def test_fid_stats_then_eval_end_to_end(workdir):
  config = tiny_config()
  path = evaluate.run_fid_stats(config, workdir)
  with np.load(path) as z:
    assert z["mu"].shape == (2048,) and z["sigma"].shape == (2048, 2048)
    assert z["pool3"].shape == (8, 2048) and bool(z["random_inception"])
    pool3 = z["pool3"].astype(np.float64)
    np.testing.assert_allclose(z["mu"], pool3.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(z["sigma"], np.cov(pool3, rowvar=False), rtol=1e-5, atol=1e-9)
  m = evaluate.run_eval(config, workdir)
  out = os.path.join(workdir, "eval")
  with np.load(os.path.join(out, "samples.npz")) as z:
    assert z["arr_0"].shape == (16, 16, 16, 3) and z["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(z["arr_1"], np.repeat(np.arange(NUM_CLASSES), 4))
  with open(os.path.join(out, "metrics.json")) as f:
    saved = json.load(f)
  assert saved["inception"] == scoring.RANDOM_LABEL and saved["random_inception"] is True
  for k in ("fid", "inception_score", "precision", "recall"):
    assert np.isfinite(saved[k]) and saved[k] == pytest.approx(m[k])
  assert saved["fid"] > 0 and saved["inception_score"] >= 1.0
  assert saved["fid_method"] == "low_rank_svd"  # 16 samples, 8 references < 2048 dims
  assert 0.0 <= saved["precision"] <= 1.0 and 0.0 <= saved["recall"] <= 1.0


def test_low_rank_fid_equals_sqrtm_fid():
  from rae_jax.eval import metrics
  rng = np.random.default_rng(0)
  mix = rng.normal(size=(24, 24))
  x1 = rng.normal(size=(60, 24)) @ mix
  x2 = rng.normal(size=(45, 24)) @ mix * 1.3 + 0.4
  want = metrics.fid_from_features(x1, x2)
  assert rel_err(scoring.frechet_distance_low_rank(x1, x2), want) <= 1e-8
  # Fewer samples than dimensions (the case it is used for): still the scipy value.
  assert rel_err(scoring.frechet_distance_low_rank(x1[:10], x2[:7]),
                 metrics.fid_from_features(x1[:10], x2[:7])) <= 1e-6
  assert abs(scoring.frechet_distance_low_rank(x1[:10], x1[:10])) <= 1e-9


# ----------------------------------------------------------------------------- PSNR / SSIM
def _np_ssim(a, b):
  """Independent float64 SSIM: scipy Gaussian-weighted local moments over full windows."""
  size, sigma = 11, 1.5
  d = np.arange(size) - (size - 1) / 2
  g = np.exp(-d ** 2 / (2 * sigma ** 2))
  w = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  out = []
  for x, y in zip(a.astype(np.float64), b.astype(np.float64)):
    vals = []
    for ch in range(x.shape[-1]):
      def f(z):
        return scipy.signal.correlate2d(z, w, mode="valid")
      p, q = x[..., ch], y[..., ch]
      mp, mq = f(p), f(q)
      vp, vq, cpq = f(p * p) - mp ** 2, f(q * q) - mq ** 2, f(p * q) - mp * mq
      vals.append(((2 * mp * mq + c1) * (2 * cpq + c2)) /
                  ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2)))
    out.append(np.mean(vals))
  return np.array(out)


def test_psnr_ssim_match_numpy():
  import scipy.signal  # noqa: F401
  rng = np.random.default_rng(0)
  a = rng.uniform(size=(3, 24, 20, 3)).astype(np.float32)
  a = scipy.ndimage.gaussian_filter(a, (0, 2, 2, 0))  # some structure
  b = np.clip(a + rng.normal(scale=0.05, size=a.shape), 0, 1).astype(np.float32)
  b[2] = a[2]  # identical image: SSIM 1, PSNR at the 1e-10 MSE clamp (100 dB)
  mse = np.mean((a.astype(np.float64) - b) ** 2, axis=(1, 2, 3))
  want_psnr = 20 * np.log10(1 / np.sqrt(np.maximum(mse, 1e-10)))
  got_psnr = np.asarray(recon.psnr(jnp.asarray(b), jnp.asarray(a)))
  np.testing.assert_allclose(got_psnr, want_psnr, rtol=1e-5)
  assert got_psnr[2] == pytest.approx(100.0)
  got_ssim = np.asarray(recon.ssim(jnp.asarray(b), jnp.asarray(a)))
  want_ssim = _np_ssim(b, a)
  np.testing.assert_allclose(got_ssim, want_ssim, rtol=1e-4, atol=1e-5)
  assert got_ssim[2] == pytest.approx(1.0, abs=1e-6) and got_ssim[0] < 0.99
  np.testing.assert_allclose(recon.gaussian_kernel1d().sum(), 1.0, rtol=1e-6)
  assert len(recon.gaussian_kernel1d()) == 11


class _ScaleRAE:
  """Stands in for an RAE: 'reconstructs' x as factor * x (hashable, as jit caching needs)."""

  def __init__(self, factor):
    self.factor = factor

  def __call__(self, variables, x):
    return x * self.factor


def test_reconstruction_metrics_sharded():
  rng = np.random.default_rng(1)
  imgs = rng.integers(0, 256, size=(11, 16, 16, 3), dtype=np.uint8)
  scorer = loaders.load_scorer(mesh_lib.make_mesh(), "", per_device_batch=1)
  reader = scoring.array_reader(imgs)
  same = recon.evaluate_reconstruction(_ScaleRAE(1.0), {}, reader, len(imgs), scorer)
  assert same["psnr"] == pytest.approx(100.0) and same["ssim"] == pytest.approx(1.0, abs=1e-6)
  assert abs(same["rfid"]) < 1e-3 and same["random_inception"] is True
  dark = recon.evaluate_reconstruction(_ScaleRAE(0.5), {}, reader, len(imgs), scorer)
  x = imgs.astype(np.float64) / 255
  r = np.clip(np.floor(x * 0.5 * 255 + 0.5), 0, 255) / 255
  want_psnr = np.mean(20 * np.log10(1 / np.sqrt(np.mean((r - x) ** 2, axis=(1, 2, 3)))))
  assert dark["psnr"] == pytest.approx(want_psnr, rel=1e-5)
  assert dark["ssim"] == pytest.approx(np.mean(_np_ssim(r, x)), rel=1e-4)
  assert dark["rfid"] > 1e-3
