"""LightningDiT: golden-vector parity with the official module and option properties."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import rel_err
from rae_jax.interop import ditdh_names
from rae_jax.models.lightning_dit import LightningDiT

TINY = dict(input_size=4, patch_size=1, in_channels=8, hidden_size=16, depth=1, num_heads=2,
            num_classes=5)


def random_params(model, seed=0, scale=0.2):
  n = model.input_size
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, n, n, model.in_channels)),
                          jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
      tree, [(scale * rng.standard_normal(l.shape)).astype(np.float32) for l in leaves])


@functools.lru_cache(maxsize=None)
def _jitted(model):
  return jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))


def run(model, params, x, t, y):
  """Jitted apply, compiled once per model config (XLA compile time dominates)."""
  return _jitted(model)(params, x, t, y)


def inputs(model, batch=2):
  rng = np.random.default_rng(1)
  n = model.input_size
  return (rng.standard_normal((batch, n, n, model.in_channels)).astype(np.float32),
          rng.uniform(size=batch).astype(np.float32),
          rng.integers(0, model.num_classes, size=batch).astype(np.int32))


def test_forward_matches_reference(ref_dir):
  cfg = json.loads((ref_dir / "lightningdit_tiny.json").read_text())["config"]
  model = LightningDiT(**cfg)
  params = ditdh_names.lightning_dit_from_torch(
      load_file(ref_dir / "lightningdit_tiny.weights.safetensors"), cfg)
  io = np.load(ref_dir / "lightningdit_tiny.io.npz")
  out = run(model, params, io["x"].transpose(0, 2, 3, 1), io["t"], io["y"].astype(np.int32))
  err = rel_err(np.asarray(out).transpose(0, 3, 1, 2), io["out"])
  print(f"LightningDiT forward rel err {err:.2e}")
  assert err <= 1e-5


def test_learn_sigma_keeps_first_half():
  model = LightningDiT(**TINY, learn_sigma=True)
  params = random_params(model)
  assert params["final_layer"]["linear"]["kernel"].shape == (16, 16)  # 2 * in_channels
  x, t, y = inputs(model)
  out = run(model, params, x, t, y)
  assert out.shape == x.shape
  half = dict(params, final_layer=dict(params["final_layer"], linear={
      "kernel": params["final_layer"]["linear"]["kernel"][:, :8],
      "bias": params["final_layer"]["linear"]["bias"][:8]}))
  np.testing.assert_allclose(run(LightningDiT(**TINY), half, x, t, y), out, rtol=1e-6, atol=1e-6)


def test_wo_shift_is_scale_only_modulation():
  wo_model = LightningDiT(**TINY, wo_shift=True)
  wo = random_params(wo_model, seed=2)
  sm, gm, sp, gp = np.split(wo["blocks_0"]["adaLN_modulation"]["kernel"], 4, axis=-1)
  bsm, bgm, bsp, bgp = np.split(wo["blocks_0"]["adaLN_modulation"]["bias"], 4, axis=-1)
  z, zb = np.zeros_like(sm), np.zeros_like(bsm)
  ref = dict(wo, blocks_0=dict(wo["blocks_0"], adaLN_modulation={
      "kernel": np.concatenate([z, sm, gm, z, sp, gp], -1),
      "bias": np.concatenate([zb, bsm, bgm, zb, bsp, bgp], -1)}))
  x, t, y = inputs(wo_model)
  np.testing.assert_allclose(run(wo_model, wo, x, t, y), run(LightningDiT(**TINY), ref, x, t, y),
                             rtol=1e-5, atol=1e-5)


def test_patch2_no_rope_shapes_and_keys():
  model = LightningDiT(**dict(TINY, input_size=8, patch_size=2, use_rope=False))
  params = random_params(model, seed=3)
  x, t, y = inputs(model)
  out = run(model, params, x, t, y)
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  shapes = ditdh_names.torch_shapes(model)
  assert shapes["x_embedder.proj.weight"] == (16, 8, 2, 2)
  assert shapes["pos_embed"] == (1, 16, 16)
  assert not any("rope" in k for k in shapes)
  with pytest.raises(ValueError, match="expects latents"):
    run(model, params, x[:, :4, :4], t, y)
