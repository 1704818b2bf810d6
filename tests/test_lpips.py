"""LPIPS parity with the official disc/lpips.py (seeded weights, README "seeded rule") and importers."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err, seeded_state_dict
from rae_jax.interop.common import StateDictError
from rae_jax.interop.lpips_weights import lpips_params_from_state_dict, lpips_params_from_torch
from rae_jax.losses.lpips import LPIPS

SLICE_STARTS = (0, 4, 9, 16, 23)


@pytest.fixture(scope="module")
def lpips_sd(request):
  ref = request.config.rootpath / "tests/fixtures/reference"
  return seeded_state_dict(json.load(open(ref / "lpips.state_dict.json")))


@pytest.fixture(scope="module")
def lpips_fn():
  def fn(p, x, y):
    return tuple(LPIPS().apply({"params": p}, x, y, reduction=r) for r in ("none", "mean", "sum"))
  return jax.jit(fn)


def _nhwc(a):
  return jnp.asarray(np.transpose(a, (0, 2, 3, 1)))


def test_lpips_matches_reference(lpips_sd, lpips_fn, ref_dir):
  io = np.load(ref_dir / "lpips.io.npz")
  params = lpips_params_from_state_dict(lpips_sd)
  out, mean, total = lpips_fn(params, _nhwc(io["input"]), _nhwc(io["target"]))
  assert out.shape == (io["input"].shape[0],)
  err = rel_err(out, io["lpips_none"].reshape(-1))
  print(f"lpips_none rel err {err:.2e}")
  assert err <= 1e-5
  np.testing.assert_allclose(mean, np.mean(io["lpips_none"]), rtol=1e-5)
  np.testing.assert_allclose(total, np.sum(io["lpips_none"]), rtol=1e-5)
  # Identical images are at distance zero.
  x = _nhwc(io["input"])
  np.testing.assert_allclose(lpips_fn(params, x, x)[0], 0.0, atol=1e-9)


def test_torchvision_and_lin_files_give_same_params(lpips_sd):
  # Split the official module's state_dict into the two release files' layouts.
  vgg = {"classifier.0.weight": np.zeros((4, 4), np.float32)}  # extra keys of torchvision's vgg16
  lin = {}
  for key, value in lpips_sd.items():
    parts = key.split(".")
    if parts[0] == "net":
      vgg[f"features.{SLICE_STARTS[int(parts[1][5:]) - 1] + int(parts[2])}.{parts[3]}"] = value
    else:
      lin[key] = value
  a = lpips_params_from_torch(vgg, lin)
  b = lpips_params_from_state_dict(lpips_sd)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # OIHW -> HWIO at the boundary.
  np.testing.assert_array_equal(a["vgg"]["features_5"]["kernel"],
                                np.transpose(lpips_sd["net.slice2.1.weight"], (2, 3, 1, 0)))


def test_bad_weights_raise_clear_errors(lpips_sd):
  sd = dict(lpips_sd)
  del sd["lin3.model.1.weight"]
  with pytest.raises(StateDictError, match="lin3.model.1.weight"):
    lpips_params_from_state_dict(sd)
  sd = dict(lpips_sd)
  sd["net.slice3.3.weight"] = np.zeros((256, 256, 1, 1), np.float32)
  with pytest.raises(StateDictError, match=r"features.12.weight.*\(256, 256, 1, 1\)"):
    lpips_params_from_state_dict(sd)
  sd = dict(lpips_sd, **{"scaling_layer.shift": np.zeros((1, 3, 1, 1), np.float32)})
  with pytest.raises(StateDictError, match="scaling_layer.shift"):
    lpips_params_from_state_dict(sd)
  with pytest.raises(ValueError, match="reduction"):
    LPIPS().apply({"params": lpips_params_from_state_dict(lpips_sd)}, jnp.zeros((1, 32, 32, 3)),
                  jnp.zeros((1, 32, 32, 3)), reduction="max")
