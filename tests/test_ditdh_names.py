"""PyTorch name maps for DiTDH / LightningDiT: round trips, manifests, clear errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from rae_jax.interop import ditdh_names as names
from rae_jax.interop.common import StateDictError, flatten
from rae_jax.models.ditdh import DiTDH
from rae_jax.models.lightning_dit import LightningDiT

# Depth 2 per stack so the scanned layout really stacks layers; qk-norm LayerNorm for its bias.
DITDH = dict(input_size=4, patch_size=1, in_channels=8, hidden_size=(16, 32), depth=(2, 2),
             num_heads=(2, 4), num_classes=5, use_qknorm=True, use_rmsnorm=False)
LIGHT = dict(input_size=4, patch_size=1, in_channels=8, hidden_size=16, depth=2, num_heads=2,
             num_classes=5, use_swiglu=False)

FULL = {
    "ditdh_xl": dict(hidden_size=[1152, 2048], depth=[28, 2], num_heads=[16, 16]),
    "ditdh_s": dict(hidden_size=[384, 2048], depth=[12, 2], num_heads=[6, 16]),
}


def random_params(model, seed=0):
  n = model.input_size
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, n, n, model.in_channels)),
                          jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
      tree, [(0.2 * rng.standard_normal(l.shape)).astype(np.float32) for l in leaves])


def assert_same_tree(a, b):
  fa, fb = flatten(a), flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert np.asarray(fa[k]).shape == np.asarray(fb[k]).shape, k
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def assert_same_sd(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


CASES = [(DiTDH, DITDH, names.ditdh_to_torch, names.ditdh_from_torch),
         (LightningDiT, LIGHT, names.lightning_dit_to_torch, names.lightning_dit_from_torch)]


@pytest.mark.parametrize("cls,kw,to_torch,from_torch", CASES, ids=["ditdh", "lightning"])
def test_round_trip_both_layouts(cls, kw, to_torch, from_torch):
  flat_model, scan_model = cls(**kw), cls(**kw, scan_layers=True)
  params = random_params(flat_model)
  sd = to_torch(params, flat_model)
  assert sd.keys() == names.torch_shapes(flat_model).keys()
  assert_same_tree(from_torch(sd, flat_model), params)

  scanned = from_torch(sd, scan_model)  # the same weights in the stacked layout
  assert_same_sd(to_torch(scanned, scan_model), sd)
  assert_same_tree(from_torch(to_torch(scanned, scan_model), scan_model), scanned)
  lead = next(iter(flatten(scanned["enc_blocks" if cls is DiTDH else "blocks"]).values()))
  assert lead.shape[0] == 2

  # Scanned and unrolled layouts compute the same function.
  n = flat_model.input_size
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, n, n, 8)).astype(np.float32)
  t = np.array([0.2, 0.9], np.float32)
  y = np.array([1, 5], np.int32)
  apply = lambda m, p: jax.jit(lambda p: m.apply({"params": p}, x, t, y))(p)
  out, out_scan = np.asarray(apply(flat_model, params)), np.asarray(apply(scan_model, scanned))
  assert np.linalg.norm(out_scan - out) / np.linalg.norm(out) <= 1e-6


def test_accepts_wrapped_params_and_torch_tensors(ref_dir):
  torch = pytest.importorskip("torch")
  cfg = json.loads((ref_dir / "ditdh_tiny.json").read_text())
  sd = load_file(ref_dir / "ditdh_tiny.weights.safetensors")
  params = names.ditdh_from_torch({k: torch.from_numpy(v) for k, v in sd.items()}, cfg)
  back = names.ditdh_to_torch({"params": params}, cfg["config"])
  assert back.keys() == sd.keys()
  for k in sd:
    if "rope" in k:  # recomputed in numpy: within an ulp of PyTorch's float32 cos/sin
      np.testing.assert_allclose(back[k], sd[k], rtol=0, atol=1e-6, err_msg=k)
    else:
      np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


@pytest.mark.parametrize("name", sorted(FULL))
@pytest.mark.parametrize("scan", [False, True])
def test_full_size_keys_and_shapes_match_manifest(ref_dir, name, scan):
  manifest = json.loads((ref_dir / f"{name}.state_dict.json").read_text())
  model = DiTDH(input_size=16, patch_size=1, in_channels=768, num_classes=1000,
                **FULL[name], scan_layers=scan)
  got = names.torch_shapes(model)
  assert got == {k: tuple(v) for k, v in manifest.items()}


def test_errors_name_the_problem():
  model = DiTDH(**DITDH)
  sd = names.ditdh_to_torch(random_params(model), model)

  bad = dict(sd, **{"blocks.3.attn.qkv.weight": np.zeros((96, 16), np.float32)})
  with pytest.raises(StateDictError, match=r"'blocks\.3\.attn\.qkv\.weight' has shape "
                                           r"\(96, 16\), expected \(96, 32\)"):
    names.ditdh_from_torch(bad, model)

  missing = {k: v for k, v in sd.items() if k != "s_projector.bias"}
  with pytest.raises(StateDictError, match=r"missing keys.*s_projector\.bias"):
    names.ditdh_from_torch(missing, model)

  extra = dict(sd, **{"blocks.9.norm1.weight": np.ones(16, np.float32)})
  with pytest.raises(StateDictError, match=r"unexpected keys.*blocks\.9\.norm1\.weight"):
    names.ditdh_from_torch(extra, model)

  shifted = dict(sd, pos_embed=sd["pos_embed"] + 0.5)
  with pytest.raises(StateDictError, match="pos_embed"):
    names.ditdh_from_torch(shifted, model)
