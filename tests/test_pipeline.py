"""Pipeline modes on a tiny config: exact latent stats, the latent cache, stage 2 from it, sampling."""
import json
import os

import jax
import numpy as np
import pytest

from rae_jax import data as data_lib
from rae_jax import modes
from rae_jax.interop import stats as stats_io
from rae_jax.pipeline import builders
from test_config_checks import load_config


def tiny_config():
  c = load_config("demo")
  c.data.synthetic_size = 40
  c.eval.per_device_batch = 2
  c.stage2.global_batch_size = 8
  c.stage2.optim.num_steps = 3
  c.checkpoint.every_steps = 100
  c.log.every_steps = 1
  c.model.hidden_size = (64, 64)
  c.model.depth = (1, 1)
  c.sample.num_images = 10
  c.sampler.num_steps = 3
  return c


def all_latents(config, workdir, flips):
  rae, variables = builders.build_rae(config, workdir, with_stats=False)
  source = data_lib.make_source(config.data)
  imgs = np.stack([np.asarray(source[i][0], np.float32) / 255.0 for i in range(len(source))])
  imgs = np.where(flips[:, None, None, None], imgs[:, :, ::-1], imgs)
  return np.asarray(jax.jit(lambda x: rae.encode(variables, x))(imgs), np.float64)


def test_stats_are_exact_mean_and_variance(tmp_path):
  c = tiny_config()
  path = modes.run("stats", c, str(tmp_path))
  got = stats_io.load_stats(path)
  z = all_latents(c, str(tmp_path), data_lib.epoch_flips(c.seed, 0, c.data.synthetic_size))
  np.testing.assert_allclose(got["mean"], z.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["var"], z.var(0), rtol=1e-4, atol=1e-6)
  # Later stages pick the file up from the workdir and normalise with it.
  _, variables = builders.build_rae(c, str(tmp_path))
  np.testing.assert_array_equal(np.asarray(variables["stats"]["mean"]), got["mean"])


def test_latent_cache_then_stage2_from_cache_then_sample(tmp_path):
  c = tiny_config()
  w = str(tmp_path)
  directory = modes.run("cache_latents", c, w)
  cache = data_lib.LatentCacheSource(directory)
  assert len(cache) == c.data.synthetic_size
  z = all_latents(c, w, np.zeros(c.data.synthetic_size, bool))
  zf = all_latents(c, w, np.ones(c.data.synthetic_size, bool))
  for i in (0, 17, 39):
    lat, label = cache.read_flip(i, False)
    # float16 cache (the default): relative rounding 2^-11.
    assert lat.dtype == np.float16
    np.testing.assert_allclose(lat, z[i], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(cache.read_flip(i, True)[0], zf[i], rtol=1e-3, atol=1e-3)
    assert label == i % c.data.num_classes
  # Re-running finds every shard complete and writes nothing new.
  before = sorted(os.listdir(directory))
  modes.run("cache_latents", c, w)
  assert sorted(os.listdir(directory)) == before

  c.stage2.use_latent_cache = True
  c.log.sample_every_steps = 3  # a sample grid and an online eval at the last step
  c.eval.online_every_steps = 3
  c.eval.online_num_samples = 4
  c.eval.per_device_batch = 1
  state = modes.run("train_stage2", c, w)
  assert int(state.step) == 3
  assert os.path.getsize(os.path.join(w, "stage2", "samples", "step_00000003.png")) > 0
  with open(os.path.join(w, "eval", "online_metrics.jsonl")) as f:
    online = [json.loads(line) for line in f]
  assert [m["step"] for m in online] == [3] and np.isfinite(online[0]["inception_score"])
  leaves = jax.tree.leaves(state.params)
  assert all(np.isfinite(np.asarray(x)).all() for x in leaves)

  path = modes.run("sample", c, w)
  assert os.path.getsize(path) > 0
  with np.load(os.path.join(w, "samples.npz")) as f:
    assert f["arr_0"].shape == (10, 32, 32, 3) and f["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(f["arr_1"], np.repeat(np.arange(10), 1))


def test_sample_without_weights_names_what_is_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="stage2"):
    modes.run("sample", tiny_config(), str(tmp_path))


@pytest.mark.parametrize("preset", ["ditdh", "lightning"])
def test_stage2_models_build_from_presets(preset):
  from rae_jax import presets
  cfg = (presets.ditdh((32, 48), (1, 1), (2, 2), input_size=4, in_channels=16, num_classes=10)
         if preset == "ditdh" else
         presets.lightning_dit(32, 2, 2, input_size=4, in_channels=16, num_classes=10))
  model = builders.build_stage2_model(cfg)
  shapes = jax.eval_shape(lambda k: builders.init_stage2_params(model, (4, 4, 16), k),
                          jax.random.PRNGKey(0))
  out = jax.eval_shape(lambda p: model.apply({"params": p}, jax.numpy.zeros((2, 4, 4, 16)),
                                              jax.numpy.zeros((2,)),
                                              jax.numpy.zeros((2,), jax.numpy.int32)), shapes)
  assert out.shape == (2, 4, 4, 16)


def test_every_mode_resolves_to_a_function():
  import importlib
  for mode, run_mode in modes.MODES.items():
    if mode != "all":
      module, function = run_mode.target
      assert callable(getattr(importlib.import_module(module), function)), mode
