"""ViTDecoder vs the official GeneralDecoder golden vectors, plus its shape/interp paths."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, rel_err

from rae_jax.interop import decoder_names as dn
from rae_jax.interop.common import unflatten
from rae_jax.interop.hf_encoders import read_tensors
from rae_jax.models.decoder import (ViTDecoder, decoder_from_hf_config, sincos_pos_embed_2d,
                                    unpatchify)
from rae_jax.models.layers import to_layout


@pytest.fixture(scope="module")
def tiny():
  ref = FIXTURES / "reference"
  cfg = json.loads((ref / "decoder_tiny.json").read_text())
  dec = decoder_from_hf_config(cfg["config"], num_patches=cfg["num_patches"])
  sd = read_tensors(ref / "decoder_tiny.weights.safetensors")
  return dec, dn.from_state_dict(dec, sd), sd, np.load(ref / "decoder_tiny.io.npz")


def test_logits_and_image_match_reference(tiny):
  dec, params, _, io = tiny
  logits = dec.apply({"params": params}, io["z"], method="logits")
  image = dec.apply({"params": params}, io["z"])
  assert logits.shape == io["logits"].shape
  assert image.shape == (3, 8, 8, 3)
  assert rel_err(logits, io["logits"]) <= 1e-5
  assert rel_err(np.asarray(image).transpose(0, 3, 1, 2), io["image"]) <= 1e-5


def test_grid_input_equals_token_input(tiny):
  dec, params, _, io = tiny
  z = io["z"]
  a = dec.apply({"params": params}, z)
  b = dec.apply({"params": params}, z.reshape(3, 4, 4, -1))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pos_embed_equals_stored_buffer(tiny):
  dec, _, sd, _ = tiny
  np.testing.assert_array_equal(dec.pos_embed(), sd["decoder_pos_embed"])
  assert np.all(sincos_pos_embed_2d(8, 2)[0] == 0)


def test_unpatchify_layout():
  # token (i, j), pixel (p, q), channel c -> image[i*P+p, j*P+q, c]
  P, C = 2, 3
  logits = np.arange(1 * 4 * P * P * C, dtype=np.float32).reshape(1, 4, P * P * C)
  img = np.asarray(unpatchify(jnp.asarray(logits), P, C))
  i, j, p, q, c = 1, 0, 1, 1, 2
  assert img[0, i * P + p, j * P + q, c] == logits[0, i * 2 + j, (p * P + q) * C + c]


def test_latent_interpolation_and_cls_paths(tiny):
  dec, params, _, io = tiny
  z = jnp.asarray(io["z"])
  # drop_cls_token ignores a leading extra token; interpolate_pos_encoding at the trained size is
  # the identity (scale factor 1), so both together reproduce the plain output.
  with_cls = jnp.concatenate([jnp.full_like(z[:, :1], 7.0), z], axis=1)
  a = dec.apply({"params": params}, with_cls, drop_cls_token=True, interpolate_pos_encoding=True)
  np.testing.assert_allclose(np.asarray(a).transpose(0, 3, 1, 2), io["image"], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="drop_cls_token"):
    dec.apply({"params": params}, z, interpolate_pos_encoding=True)
  # A 6x6 latent grid is bilinearly resized to the trained 4x4 grid: output stays 8x8.
  out = jax.eval_shape(lambda x: dec.apply({"params": params}, x),
                       jax.ShapeDtypeStruct((2, 36, z.shape[-1]), jnp.float32))
  assert out.shape == (2, 8, 8, 3)


def test_remat_grad(tiny):
  dec, params, _, io = tiny
  z = jnp.asarray(io["z"])
  # The trainer differentiates decode w.r.t. decoder params; remat must not change the maths.
  loss = lambda p: jnp.mean(dec.clone(remat=True).apply({"params": p}, z) ** 2)
  val, g = jax.jit(jax.value_and_grad(loss))(params)
  ref = np.mean(io["image"].astype(np.float64) ** 2)
  np.testing.assert_allclose(float(val), ref, rtol=1e-5)
  assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(params)
  # d loss / d decoder_pred.bias is the mean over pixels of 2*x/size, computable from the image.
  img = io["image"].transpose(0, 2, 3, 1).reshape(3, 4, 2, 4, 2, 3).transpose(0, 1, 3, 2, 4, 5)
  want = 2 * img.reshape(-1, 12).sum(0) / io["image"].size
  np.testing.assert_allclose(np.asarray(g["decoder_pred"]["bias"]), want, rtol=1e-4, atol=1e-7)


def test_scanned_layers_match_reference_and_keep_the_official_layout(tiny):
  """scan_layers=True: the official checkpoint imports into the stacked layout, decodes the
  reference output, exports back to the same state_dict, and gradients (with remat inside the
  scan) equal the per-layer model's."""
  dec, params, sd, io = tiny
  scanned = dec.clone(scan_layers=True, remat=True)
  sp = dn.from_state_dict(scanned, sd)
  assert "decoder_layers" in sp and not any(k.startswith("decoder_layers_") for k in sp)
  depth = dec.decoder_num_hidden_layers
  assert sp["decoder_layers"]["mlp"]["fc1"]["kernel"].shape[0] == depth
  assert rel_err(scanned.apply({"params": sp}, io["z"], method="logits"), io["logits"]) <= 1e-5
  out = dn.to_state_dict(scanned, sp)
  assert out.keys() == sd.keys()
  for k in sd:
    np.testing.assert_array_equal(out[k], np.asarray(sd[k]), err_msg=k)
  z = jnp.asarray(io["z"])
  grad = lambda m, p: jax.grad(lambda p: jnp.mean(m.apply({"params": p}, z) ** 2))(p)  # noqa: E731
  g_scan = to_layout(grad(scanned, sp), dec.layer_layout, scanned=False)
  g_ref = grad(dec, params)
  for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  assert jax.tree.structure(g_scan) == jax.tree.structure(g_ref)


def test_param_shapes_follow_fields():
  dec = ViTDecoder(hidden_size=8, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                   decoder_num_attention_heads=2, decoder_intermediate_size=32, patch_size=2,
                   num_patches=9)
  shapes = dn.param_shapes(dec)
  assert shapes["decoder_embed/kernel"] == (8, 16)
  assert shapes["decoder_layers_0/mlp/fc1/kernel"] == (16, 32)
  assert shapes["decoder_pred/kernel"] == (16, 2 * 2 * 3)
  assert dec.image_size == 6
  spec = unflatten({k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()})
  out = jax.eval_shape(lambda p, z: dec.apply({"params": p}, z), spec,
                       jax.ShapeDtypeStruct((2, 3, 3, 8), jnp.float32))
  assert out.shape == (2, 6, 6, 3)
