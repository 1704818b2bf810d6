"""DiTDH: golden-vector parity with the official DiTwDDTHead, option properties, guidance."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import FIXTURES, rel_err
from rae_jax.interop import ditdh_names
from rae_jax.models import guidance, layers
from rae_jax.models.ditdh import DiTDH

# Property tests share one small config (one block per stack; no positions, so it is
# permutation-equivariant) and batch 8: XLA compile time dominates these tests.
TINY = dict(input_size=4, patch_size=1, in_channels=8, hidden_size=(16, 32), depth=(1, 1),
            num_heads=(2, 4), num_classes=5)
BASE = dict(TINY, class_dropout_prob=0.5, use_rope=False, use_pos_embed=False)


def nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


def random_params(model, seed=0, scale=0.2):
  """Noise in every leaf (shapes via eval_shape), so no zero-init layer can hide a bug."""
  n = model.input_size
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, n, n, model.in_channels)),
                          jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  leaves = [(scale * rng.standard_normal(l.shape)).astype(np.float32) for l in leaves]
  return jax.tree.unflatten(tree, leaves)


@functools.lru_cache(maxsize=None)
def _jitted(model, train):
  return jax.jit(lambda p, x, t, y, rngs: model.apply({"params": p}, x, t, y, train=train,
                                                       rngs=rngs))


def run(model, params, x, t, y, train=False, rngs=None):
  """Jitted apply, compiled once per (model, train) (eager flax dispatch is slow)."""
  return _jitted(model, train)(params, x, t, y, rngs)


def inputs(model, batch=8, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  n = model.input_size
  x = jax.random.normal(k1, (batch, n, n, model.in_channels))
  t = jax.random.uniform(k2, (batch,))
  y = jax.random.randint(k3, (batch,), 0, model.num_classes)
  return x, t, y


@pytest.fixture(scope="module")
def reference():
  ref_dir = FIXTURES / "reference"
  cfg = json.loads((ref_dir / "ditdh_tiny.json").read_text())["config"]
  model = DiTDH(**cfg)
  params = ditdh_names.ditdh_from_torch(load_file(ref_dir / "ditdh_tiny.weights.safetensors"), cfg)
  io = dict(np.load(ref_dir / "ditdh_tiny.io.npz"))
  fwd = jax.jit(lambda x, t, y: model.apply({"params": params}, x, t, y))
  return model, fwd, io


def test_forward_matches_reference(reference):
  _, fwd, io = reference
  out = fwd(nhwc(io["x"]), io["t"], io["y"].astype(np.int32))
  err = rel_err(nchw(out), io["out"])
  print(f"DiTDH forward rel err {err:.2e}")
  assert err <= 1e-5


def test_forward_with_cfg_matches_reference(reference):
  _, fwd, io = reference
  out = guidance.forward_with_cfg(fwd, nhwc(io["cfg_x"]), io["cfg_t"],
                                  io["cfg_y"].astype(np.int32), scale=2.5, interval=(0.1, 1.0))
  err = rel_err(nchw(out), io["cfg_out"])
  print(f"DiTDH forward_with_cfg rel err {err:.2e}")
  assert err <= 1e-5


def test_cfg_velocity_matches_official_doubling(reference):
  """cfg_velocity on (x, t, y) == first half of forward_with_cfg on [x; x], [t; t], [y; null]."""
  model, fwd, io = reference
  x, t, y = nhwc(io["x"]), io["t"], io["y"].astype(np.int32)
  ours = guidance.cfg_velocity(fwd, x, t, y, scale=2.5, interval=(0.1, 1.0),
                               null_class=model.num_classes)
  doubled = guidance.forward_with_cfg(
      fwd, np.concatenate([x, x]), np.concatenate([t, t]),
      np.concatenate([y, np.full_like(y, model.num_classes)]), scale=2.5, interval=(0.1, 1.0))
  np.testing.assert_allclose(ours, doubled[: len(x)], rtol=1e-6, atol=1e-6)


def test_guidance_scale_one_and_interval(reference):
  model, fwd, io = reference
  x, t, y = nhwc(io["x"]), io["t"], io["y"].astype(np.int32)
  calls = []

  def counting(x_, t_, y_):
    calls.append(x_.shape[0])
    return fwd(x_, t_, y_)

  plain = np.asarray(fwd(x, t, y))
  cfg1 = guidance.cfg_velocity(counting, x, t, y, scale=1.0, null_class=model.num_classes)
  assert calls == [len(x)]  # one plain forward, no doubling
  np.testing.assert_array_equal(np.asarray(cfg1), plain)

  guide_fn = lambda x_, t_, y_: 0.5 * fwd(x_, t_, y_)
  calls.clear()
  ag1 = guidance.autoguidance_velocity(counting, guide_fn, x, t, y, scale=1.0)
  assert calls == [len(x)]
  np.testing.assert_array_equal(np.asarray(ag1), plain)

  # t = [0.05, 0.3, 0.7, 0.999]; interval (0.2, 0.8) guides samples 1 and 2 only.
  inside = (t >= 0.2) & (t <= 0.8)
  assert inside.tolist() == [False, True, True, False]
  cfg = np.asarray(guidance.cfg_velocity(fwd, x, t, y, scale=3.0, interval=(0.2, 0.8),
                                         null_class=model.num_classes))
  assert rel_err(cfg[~inside], plain[~inside]) <= 1e-6  # same math, batch of 2B vs B
  uncond = np.asarray(fwd(x, t, np.full_like(y, model.num_classes)))
  assert rel_err(cfg[inside], uncond[inside] + 3.0 * (plain - uncond)[inside]) <= 1e-5
  assert np.abs(cfg[inside] - plain[inside]).max() > 1e-3

  ag = np.asarray(guidance.autoguidance_velocity(fwd, guide_fn, x, t, y, scale=2.0,
                                                 interval=(0.2, 0.8)))
  np.testing.assert_array_equal(ag[~inside], plain[~inside])
  assert rel_err(ag[inside], 1.5 * plain[inside]) <= 1e-6

  with pytest.raises(ValueError, match="t_min < t_max"):
    guidance.cfg_velocity(fwd, x, t, y, scale=2.0, interval=(0.5, 0.5), null_class=10)


def test_guidance_outside_interval_is_exactly_conditional():
  """With a batch-independent toy model the unguided samples are bit-identical."""
  toy = lambda x, t, y: jnp.asarray(x) * (y + 1.0)[:, None, None, None] + t[:, None, None, None]
  weak = lambda x, t, y: 0.25 * toy(x, t, y)
  x = np.random.default_rng(0).standard_normal((4, 2, 2, 3)).astype(np.float32)
  t = np.array([0.0, 0.1, 0.5, 1.0], np.float32)
  y = np.array([0, 1, 2, 3], np.int32)
  cond = np.asarray(toy(x, t, y))
  uncond = np.asarray(toy(x, t, np.full_like(y, 9)))
  cfg = np.asarray(guidance.cfg_velocity(toy, x, t, y, scale=4.0, interval=(0.1, 0.5),
                                         null_class=9))
  ag = np.asarray(guidance.autoguidance_velocity(toy, weak, x, t, y, scale=4.0,
                                                 interval=(0.1, 0.5)))
  for i, inside in enumerate([False, True, True, False]):  # closed interval, as the reference
    if inside:
      np.testing.assert_allclose(cfg[i], uncond[i] + 4.0 * (cond[i] - uncond[i]), rtol=1e-6)
      np.testing.assert_allclose(ag[i], 0.25 * cond[i] + 4.0 * 0.75 * cond[i], rtol=1e-6)
    else:
      np.testing.assert_array_equal(cfg[i], cond[i])
      np.testing.assert_array_equal(ag[i], cond[i])


def test_label_dropout_uses_explicit_rng():
  model = DiTDH(**BASE)
  params = random_params(model)
  x, t, y = inputs(model)
  cond = np.asarray(run(model, params, x, t, y))
  uncond = np.asarray(run(model, params, x, t, jnp.full_like(y, model.num_classes)))
  train = lambda k: np.asarray(run(model, params, x, t, y, train=True,
                                   rngs={"label_dropout": jax.random.key(k)}))
  out = train(7)
  err_c = np.abs(out - cond).reshape(8, -1).max(1)
  err_u = np.abs(out - uncond).reshape(8, -1).max(1)
  dropped = err_u < 1e-5
  assert np.all(dropped | (err_c < 1e-5))  # every sample: its own label or the null class
  assert 0 < dropped.sum() < 8
  np.testing.assert_array_equal(train(7), out)
  assert np.abs(train(8) - out).max() > 1e-4
  with pytest.raises(Exception, match="label_dropout"):
    run(model, params, x, t, y, train=True)  # no stream given


def test_wo_shift_is_scale_only_modulation():
  """wo_shift == the shifted model with zero shift rows (adaLN chunks: shift, scale, gate, ...)."""
  plain_model, wo_model = DiTDH(**BASE), DiTDH(**BASE, wo_shift=True)
  wo = random_params(wo_model, seed=4)
  assert wo["blocks_0"]["adaLN_modulation"]["kernel"].shape[-1] == 4 * 16
  assert wo["blocks_1"]["adaLN_modulation"]["kernel"].shape[-1] == 4 * 32

  def widen(a):
    sm, gm, sp, gp = np.split(np.asarray(a), 4, axis=-1)
    z = np.zeros_like(sm)
    return np.concatenate([z, sm, gm, z, sp, gp], axis=-1)

  ref = {}
  for name, sub in wo.items():
    if name.startswith("blocks_"):
      sub = dict(sub, adaLN_modulation={k: widen(v) for k, v in sub["adaLN_modulation"].items()})
    ref[name] = sub
  x, t, y = inputs(wo_model)
  np.testing.assert_allclose(run(wo_model, wo, x, t, y),
                             run(plain_model, ref, x, t, y), rtol=1e-5, atol=1e-5)


def test_no_rope_no_pos_embed_is_permutation_equivariant():
  model = DiTDH(**BASE)
  params = random_params(model, seed=5)
  x, t, y = inputs(model)
  perm = np.random.default_rng(0).permutation(16)
  shuffle = lambda a: np.asarray(a).reshape(a.shape[0], 16, -1)[:, perm].reshape(a.shape)
  out = run(model, params, x, t, y)
  np.testing.assert_allclose(run(model, params, shuffle(x), t, y), shuffle(out),
                             rtol=1e-5, atol=1e-5)
  assert np.abs(shuffle(out) - np.asarray(out)).max() > 1e-3  # the permutation does something
  shapes = ditdh_names.torch_shapes(model)
  assert not any("rope" in k for k in shapes) and "pos_embed" not in shapes


@pytest.mark.parametrize("patch", [2, (2, 1)], ids=["p2", "s2x1"])
def test_patch_sizes(patch):
  model = DiTDH(**dict(TINY, input_size=8, patch_size=patch))
  params = random_params(model, seed=6)
  x, t, y = inputs(model, batch=2)
  out = run(model, params, x, t, y)
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  s_p, x_p = model.patches
  sd = ditdh_names.ditdh_to_torch(params, model)
  assert sd["s_embedder.proj.weight"].shape == (16, 8, s_p, s_p)
  assert sd["x_embedder.proj.weight"].shape == (32, 8, x_p, x_p)
  assert sd["final_layer.linear.weight"].shape == (x_p * x_p * 8, 32)
  assert sd["pos_embed"].shape == (1, (8 // s_p) ** 2, 16)
  assert sd["dec_feat_rope.freqs_cos"].shape == ((8 // x_p) ** 2, 8)
  back = ditdh_names.ditdh_from_torch(sd, model)
  np.testing.assert_array_equal(run(model, back, x, t, y), out)


def test_unpatchify_layout():
  """Our NHWC unpatchify == the reference's einsum('nhwpqc->nchpwq') layout, transposed."""
  n, g, p, c = 2, 3, 2, 5
  tokens = np.random.default_rng(0).standard_normal((n, g * g, p * p * c)).astype(np.float32)
  ref = np.einsum("nhwpqc->nchpwq", tokens.reshape(n, g, g, p, p, c)).reshape(n, c, g * p, g * p)
  np.testing.assert_array_equal(np.asarray(layers.unpatchify(tokens, p, g, c)), nhwc(ref))


def test_remat_matches_and_time_buffer_is_frozen():
  model, remat = DiTDH(**BASE), DiTDH(**BASE, remat=True)
  params = random_params(model, seed=8)
  x, t, y = inputs(model)
  np.testing.assert_allclose(run(remat, params, x, t, y), run(model, params, x, t, y),
                             rtol=1e-6, atol=1e-6)
  emb = layers.GaussianFourierEmbedder(8)
  p = emb.init(jax.random.key(0), t)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(emb.apply(p, t) ** 2)))(p)["params"]
  assert float(jnp.abs(grad["W"]).max()) == 0.0  # requires_grad=False in the reference
  assert float(jnp.abs(grad["mlp_0"]["kernel"]).max()) > 0.0


def test_bad_input_shape():
  model = DiTDH(**TINY)
  params = random_params(model)
  with pytest.raises(ValueError, match=r"expects latents \(B, 4, 4, 8\)"):
    run(model, params, jnp.zeros((1, 4, 4, 3)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))


@pytest.mark.parametrize("family", ["ditdh", "lightning"])
def test_checkpoints_load_across_scan_layers(family):
  """Params written with scan_layers=False load into a scanned model and back (layers.to_layout,
  used by the loaders), with the same outputs: recipes scan, sample configs need not."""
  from rae_jax.models.layers import to_layout
  from rae_jax.models.lightning_dit import LightningDiT
  if family == "ditdh":
    model = DiTDH(input_size=4, in_channels=8, hidden_size=(32, 48), depth=(2, 2),
                  num_heads=(2, 2), num_classes=4)
  else:
    model = LightningDiT(input_size=4, in_channels=8, hidden_size=32, depth=3, num_heads=2,
                         num_classes=4)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8))
  t, y = jnp.array([0.3, 0.7]), jnp.array([1, 2])
  params = model.init(jax.random.PRNGKey(1), x, t, y)["params"]
  leaves, tree = jax.tree.flatten(params)  # zero-init output layers would hide a wrong layout
  params = jax.tree.unflatten(tree, [v + 0.05 * jax.random.normal(jax.random.PRNGKey(i), v.shape)
                                     for i, v in enumerate(leaves)])
  scanned = model.clone(scan_layers=True)
  sp = to_layout(params, scanned.layer_layout, True)
  want = jax.eval_shape(scanned.init, jax.random.PRNGKey(1), x, t, y)["params"]
  assert jax.tree.structure(sp) == jax.tree.structure(want)
  np.testing.assert_allclose(scanned.apply({"params": sp}, x, t, y),
                             model.apply({"params": params}, x, t, y), rtol=1e-5, atol=1e-6)
  back = to_layout(sp, model.layer_layout, False)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), back, params))
  assert to_layout(sp, scanned.layer_layout, True) is sp  # already in the asked layout
