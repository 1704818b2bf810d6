"""Full RAE (official stage1.RAE golden vectors), stats I/O, noise and the toy encoder path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, rel_err

from rae_jax.interop.common import StateDictError
from rae_jax.interop.stats import load_stats, save_stats
from rae_jax.interop.rae_loader import load_rae
from rae_jax.models.rae import RAE

REF = FIXTURES / "reference"


@pytest.fixture(scope="module")
def tiny_rae():
  return load_rae("Dinov2withNorm", str(REF / "tiny_dinov2_reg"), REF / "tiny_decoder_config",
                  decoder_weights=REF / "rae_tiny.decoder.safetensors",
                  stats_path=REF / "tiny_stat.pt", encoder_input_size=16, decoder_patch_size=5)


@pytest.fixture(scope="module")
def io():
  return np.load(REF / "rae_tiny.io.npz")


def test_encode_decode_match_reference(tiny_rae, io):
  rae, variables = tiny_rae
  assert rae.latent_shape == (4, 4, 24) and rae.image_size == 20
  images = jnp.asarray(io["image"].transpose(0, 2, 3, 1))
  latent = jax.jit(rae.encode)(variables, images)
  assert latent.shape == (2, 4, 4, 24)
  assert rel_err(np.asarray(latent).transpose(0, 3, 1, 2), io["latent"]) <= 1e-5
  recon = jax.jit(rae.decode)(variables, jnp.asarray(io["latent"].transpose(0, 2, 3, 1)))
  assert recon.shape == (2, 20, 20, 3)
  assert rel_err(np.asarray(recon).transpose(0, 3, 1, 2), io["recon"]) <= 1e-5


def test_train_noise(tiny_rae, io):
  rae, variables = tiny_rae
  images = jnp.asarray(io["image"].transpose(0, 2, 3, 1))
  enc = jax.jit(rae.encode)  # rng and noise_tau are traced: one compile
  a = np.asarray(enc(variables, images, rng=jax.random.PRNGKey(3), noise_tau=0.8))
  b = np.asarray(enc(variables, images, rng=jax.random.PRNGKey(3), noise_tau=0.8))
  c = np.asarray(enc(variables, images, rng=jax.random.PRNGKey(4), noise_tau=0.8))
  zero = np.asarray(enc(variables, images, rng=jax.random.PRNGKey(3), noise_tau=0.0))
  np.testing.assert_array_equal(a, b)  # explicit key -> deterministic
  assert not np.allclose(a, c)
  clean = io["latent"].transpose(0, 2, 3, 1)
  assert rel_err(zero, clean) <= 1e-5
  # Noise is added before the stats normalisation; sigma = tau * U(0,1) is drawn per sample, so
  # the per-sample noise std differs between samples and stays below tau.
  scale = np.sqrt(np.asarray(variables["stats"]["var"]) + rae.eps)
  std = ((a - zero) * scale).reshape(2, -1).std(axis=1)
  assert np.all(std < 0.8 * 1.1) and abs(std[0] - std[1]) > 1e-3


def test_stats_round_trip(tmp_path):
  torch = pytest.importorskip("torch")
  stats = load_stats(REF / "tiny_stat.pt", shape=(4, 4, 24))
  raw = torch.load(REF / "tiny_stat.pt")
  np.testing.assert_array_equal(stats["mean"], raw["mean"].numpy().transpose(1, 2, 0))
  for suffix in (".pt", ".safetensors", ".npz"):
    save_stats(stats, tmp_path / f"stat{suffix}")
    back = load_stats(tmp_path / f"stat{suffix}")
    for k in ("mean", "var"):
      np.testing.assert_array_equal(back[k], stats[k])
  again = torch.load(tmp_path / "stat.pt")
  assert set(again) == {"mean", "var"} and tuple(again["var"].shape) == (24, 4, 4)
  with pytest.raises(StateDictError, match=r"'mean' has shape \(4, 4, 24\).*expected \(8, 8, 24\)"):
    load_stats(REF / "tiny_stat.pt", shape=(8, 8, 24))


def test_toy_rae_and_config_errors():
  dec_cfg = dict(decoder_hidden_size=16, decoder_num_hidden_layers=1,
                 decoder_num_attention_heads=2, decoder_intermediate_size=32,
                 layer_norm_eps=1e-6)
  rae, variables = load_rae("toy_vit", None, dec_cfg, decoder_patch_size=4, encoder_input_size=16,
                            encoder_overrides=dict(hidden_size=8, num_attention_heads=2,
                                                   num_hidden_layers=1, image_size=16,
                                                   patch_size=4))
  assert isinstance(rae, RAE) and rae.latent_shape == (4, 4, 8) and rae.image_size == 16
  out = jax.eval_shape(rae.__call__, variables, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert out.shape == (2, 16, 16, 3)
  with pytest.raises(ValueError, match="needs encoder_path"):
    load_rae("dinov2_reg", None, dec_cfg)
  with pytest.raises(ValueError, match="not divisible"):
    RAE(rae.encoder, rae.decoder, 18)
