"""DINO discriminator parity (official disc/dinodisc.py, seeded weights) and spectral-norm semantics."""
import json

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err, seeded_state_dict
from rae_jax.interop.common import StateDictError
from rae_jax.interop.dino_weights import (disc_heads_to_torch, disc_variables_from_torch,
                                          dino_vit_params_from_torch)
from rae_jax.losses.discriminator import DinoDiscriminator, classify_pair, trainable_mask
from rae_jax.losses.spectral_norm import SpectralConv1d


@pytest.fixture(scope="module")
def tiny(request):
  ref = request.config.rootpath / "tests/fixtures/reference"
  cfg = json.load(open(ref / "dinodisc_tiny.json"))
  disc = DinoDiscriminator(recipe="S_8", key_depths=tuple(cfg["key_depths"]), ks=cfg["ks"],
                           norm_type="bn", use_spectral_norm=True, recipe_overrides=cfg["recipe"])
  dino_sd, heads_sd = seeded_state_dict(cfg["dino"]), seeded_state_dict(cfg["heads"])
  variables = disc_variables_from_torch(disc, dino_sd, heads_sd)
  io = dict(np.load(ref / "dinodisc_tiny.io.npz"))
  x = jnp.asarray(np.transpose(io["x"], (0, 2, 3, 1)))
  return disc, variables, dino_sd, heads_sd, io, x


def test_eval_matches_reference(tiny):
  disc, variables, _, _, io, x = tiny
  logits, acts = jax.jit(lambda v, x: disc.apply(v, x, return_activations=True))(variables, x)
  assert logits.shape == io["logits_eval"].shape == (2, 4 * 784)
  for i, act in enumerate(acts):
    err = rel_err(act, np.transpose(io[f"act{i}"], (0, 2, 1)))  # torch (B, C, N) -> (B, N, C)
    print(f"act{i} rel err {err:.2e}")
    assert err <= 1e-5
  err = rel_err(logits, io["logits_eval"])
  print(f"logits_eval rel err {err:.2e}")
  assert err <= 1e-5


def test_train_mode_updates_spectral_state_and_freezes_dino(tiny):
  disc, variables, _, heads_sd, io, x = tiny
  fake, real = x, -x[::-1]

  @jax.jit
  def d_step(v):
    def loss(head_params):
      vv = {**v, "params": {"dino": v["params"]["dino"], **head_params}}
      lf, lr, new = classify_pair(disc, vv, fake, real, train=True)
      return jnp.mean(jax.nn.relu(1 - lr)) + jnp.mean(jax.nn.relu(1 + lf)), new
    heads = {k: p for k, p in v["params"].items() if k != "dino"}
    return jax.grad(loss, has_aux=True)(heads)

  grads, new = d_step(variables)
  # Two forward passes (fake, then real) = two power iterations, as the two torch calls.
  u0 = heads_sd["heads.0.1.fn.0.weight_u"]
  w = heads_sd["heads.0.1.fn.0.weight_orig"].reshape(32, -1)
  u = u0
  for _ in range(2):
    v_ = w.T @ u / np.linalg.norm(w.T @ u)
    u = w @ v_ / np.linalg.norm(w @ v_)
  np.testing.assert_allclose(new["spectral"]["head_0"]["conv_res"]["u"], u, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["spectral"]["head_0"]["conv_res"]["v"], v_, rtol=1e-5, atol=1e-6)
  # Every head kernel and norm scale learns (biases may cancel: in front of the per-sample norm
  # always, and at the output when all hinge terms are active).
  flat = {"/".join(str(k.key) for k in path): g for path, g in jax.tree_util.tree_leaves_with_path(grads)}
  learn = [n for n in flat if n.endswith(("kernel", "scale"))]
  assert len(learn) == 4 * 5
  assert all(float(jnp.abs(flat[n]).max()) > 0 for n in learn)
  # Frozen ViT: zero gradient to its weights, but the input image still gets one.
  g_params, g_x = jax.jit(jax.grad(lambda p, x: disc.apply({**variables, "params": p}, x).sum(),
                                   argnums=(0, 1)))(variables["params"], x)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_params["dino"]))
  assert float(jnp.abs(g_x).max()) > 0
  mask = trainable_mask(variables["params"])
  assert not any(jax.tree.leaves(mask["dino"])) and all(jax.tree.leaves(mask["head_3"]))
  # The spectral state is a plain pytree: it round-trips through serialisation (checkpoints).
  restored = flax.serialization.msgpack_restore(flax.serialization.msgpack_serialize(new["spectral"]))
  jax.tree.map(np.testing.assert_array_equal, restored, jax.tree.map(np.asarray, new["spectral"]))


def test_import_export_and_errors(tiny):
  disc, variables, dino_sd, heads_sd, _, _ = tiny
  # The key third of each qkv bias is zeroed on load, the query/value thirds kept.
  b = np.asarray(variables["params"]["dino"]["blocks_1"]["attn"]["qkv"]["bias"])
  src = dino_sd["blocks.1.attn.qkv.bias"]
  np.testing.assert_array_equal(b[32:64], 0.0)
  np.testing.assert_array_equal(b[:32], src[:32])
  np.testing.assert_array_equal(b[64:], src[64:])
  assert np.abs(src[32:64]).max() > 0  # the source itself is untouched
  out = disc_heads_to_torch(variables)
  assert sorted(out) == sorted(heads_sd)
  for k in heads_sd:
    np.testing.assert_array_equal(out[k], heads_sd[k])
  # Fresh heads for a run that only has the DINO checkpoint.
  fresh = disc_variables_from_torch(disc, dino_sd, rng=jax.random.key(1))
  assert jax.tree.structure(fresh) == jax.tree.structure(variables)
  bad = dict(dino_sd)
  del bad["blocks.2.mlp.fc1.bias"]
  with pytest.raises(StateDictError, match="blocks.2.mlp.fc1.bias"):
    dino_vit_params_from_torch(bad, depth=4)
  bad = dict(dino_sd, **{"blocks.0.attn.qkv.bias": np.zeros(90, np.float32)})
  with pytest.raises(StateDictError, match=r"blocks.0.attn.qkv.bias.*\(90,\)"):
    dino_vit_params_from_torch(bad, depth=4)
  bad = dict(heads_sd, **{"heads.1.1.fn.0.weight_v": np.zeros(7, np.float32)})
  with pytest.raises(StateDictError, match="heads.1.1.fn.0.weight_v"):
    disc_variables_from_torch(disc, dino_sd, bad)
  with pytest.raises(ValueError, match="recipe_overrides"):
    DinoDiscriminator(recipe_overrides={"depht": 3}).vit_config()


def _np_circular_conv(x, w_torch):
  """x (B, L, I), torch weight (O, I, K), circular padding K//2 -> (B, L, O)."""
  k = w_torch.shape[-1]
  xp = np.concatenate([x[:, x.shape[1] - k // 2:], x, x[:, :k // 2]], axis=1) if k > 1 else x
  return np.stack([np.einsum("bki,oik->bo", xp[:, t:t + k], w_torch) for t in range(x.shape[1])], 1)


def test_spectral_conv_eval_and_one_power_iteration():
  rng = np.random.default_rng(0)
  o, i, k = 6, 5, 3
  w = rng.standard_normal((o, i, k)).astype(np.float32)
  bias = rng.standard_normal(o).astype(np.float32)
  u = rng.standard_normal(o).astype(np.float32) * 0.3  # stored vectors need not be unit length
  v = rng.standard_normal(i * k).astype(np.float32) * 0.3
  x = rng.standard_normal((2, 7, i)).astype(np.float32)
  variables = {"params": {"kernel": np.transpose(w, (2, 1, 0)), "bias": bias}, "spectral": {"u": u, "v": v}}
  conv = SpectralConv1d(o, k)
  mat = w.reshape(o, -1)
  # Eval: W / (u . (W v)) with the stored vectors, no iteration.
  got = conv.apply(variables, x)
  want = _np_circular_conv(x, w / (u @ (mat @ v))) + bias
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)
  # Train: one torch-style power iteration, then the same formula with the new vectors.
  got, upd = conv.apply(variables, x, train=True, mutable=["spectral"])
  v1 = mat.T @ u / np.linalg.norm(mat.T @ u)
  u1 = mat @ v1 / np.linalg.norm(mat @ v1)
  np.testing.assert_allclose(upd["spectral"]["u"], u1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(upd["spectral"]["v"], v1, rtol=1e-5, atol=1e-6)
  want = _np_circular_conv(x, w / (u1 @ (mat @ v1))) + bias
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)
  with pytest.raises(ValueError, match="mutable"):
    conv.apply(variables, x, train=True)
  # The normalised weight's top singular value approaches 1 as iterations accumulate.
  for _ in range(30):
    _, upd = conv.apply({**variables, **upd}, x, train=True, mutable=["spectral"])
  uu, vv = np.asarray(upd["spectral"]["u"]), np.asarray(upd["spectral"]["v"])
  np.testing.assert_allclose(uu @ mat @ vv, np.linalg.svd(mat, compute_uv=False)[0], rtol=1e-4)
