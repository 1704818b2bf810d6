"""FID Inception-v3: pytorch-fid parity on seeded weights, resize, importer, random fallback."""
import json

import jax
import numpy as np
import pytest

from rae_jax.eval import inception
from rae_jax.interop import inception_weights as iw
from rae_jax.interop.common import StateDictError, flatten
from conftest import FIXTURES, rel_err, seeded_state_dict


@pytest.fixture(scope="module")
def seeded_weights():
  shapes = json.loads((FIXTURES / "reference" / "fid_inception.state_dict.json").read_text())
  return seeded_state_dict(shapes)


@pytest.fixture(scope="module")
def seeded_params(seeded_weights):
  return iw.import_fid_inception(seeded_weights, source="seeded")


def test_expected_keys_equal_reference_state_dict(seeded_weights):
  expected = iw.expected_torch_shapes()
  assert expected == {k: v.shape for k, v in seeded_weights.items()}


def test_pool3_matches_pytorch_fid(seeded_params, ref_dir):
  io = np.load(ref_dir / "fid_inception.io.npz")
  images = io["images"].transpose(0, 2, 3, 1)  # NCHW -> NHWC at the test boundary
  out = inception.inception_features(seeded_params, images)
  assert out["pool3"].shape == (2, inception.POOL3_DIM)
  err = rel_err(out["pool3"], io["pool3"])
  print(f"pool3 rel err {err:.2e}")
  assert err <= 1e-4

  # logits: ADM's unbiased matmul and torchvision's fc, from the same pool3.
  pool3 = np.asarray(out["pool3"], np.float64)
  w = np.asarray(seeded_params["fc"]["kernel"], np.float64)
  b = np.asarray(seeded_params["fc"]["bias"], np.float64)
  assert rel_err(out["logits"], pool3 @ w) <= 1e-5
  assert rel_err(out["logits_fc"], pool3 @ w + b) <= 1e-5


def test_random_fallback_is_flagged_and_runs(seeded_params, tmp_path):
  with pytest.warns(UserWarning, match="RANDOM"):
    params, is_random = iw.load_fid_inception_or_random(str(tmp_path / "missing.pth"),
                                                        jax.random.key(0))
  assert is_random
  shapes = jax.tree.map(lambda a: a.shape, params)
  assert shapes == jax.tree.map(lambda a: a.shape, seeded_params)
  x = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)
  out = inception.inception_features(params, x)  # same shapes as the parity test: no recompile
  pool3 = np.asarray(out["pool3"])
  assert np.isfinite(pool3).all() and pool3.std() > 0
  assert not np.allclose(pool3[0], pool3[1])


def test_uint8_and_float_inputs_agree():
  x8 = np.random.default_rng(1).integers(0, 256, size=(2, 5, 5, 3), dtype=np.uint8)
  np.testing.assert_allclose(inception.to_unit_float(x8), x8.astype(np.float32) / 255.0)
  with pytest.raises(ValueError, match="dtype"):
    inception.to_unit_float(x8.astype(np.int32))


@pytest.mark.parametrize("src,dst",
                         [((7, 9), (13, 20)), ((17, 31), (5, 12)), ((64, 64), (299, 299))])
def test_bilinear_resize_matches_torch(src, dst):
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).normal(size=(2, *src, 3)).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=dst,
                                         mode="bilinear", align_corners=False)
  got = inception.torch_bilinear_resize(x, dst)
  assert rel_err(got, want.numpy().transpose(0, 2, 3, 1)) <= 1e-6


def test_bn_folding_matches_conv_then_bn(seeded_weights, seeded_params):
  """One 1x1 conv checked by hand: conv, BN(eps=1e-3) == folded kernel and bias."""
  sd = seeded_weights
  x = np.random.default_rng(2).normal(size=(5, 64)).astype(np.float64)
  w = sd["Conv2d_3b_1x1.conv.weight"][:, :, 0, 0].astype(np.float64)  # (80, 64)
  g, b, m, v = (sd[f"Conv2d_3b_1x1.bn.{f}"].astype(np.float64)
                for f in ("weight", "bias", "running_mean", "running_var"))
  want = (x @ w.T - m) / np.sqrt(v + 1e-3) * g + b
  p = seeded_params["Conv2d_3b_1x1"]["conv"]
  got = x @ np.asarray(p["kernel"], np.float64)[0, 0] + np.asarray(p["bias"], np.float64)
  assert rel_err(got, want) <= 1e-6


def test_importer_names_missing_and_misshapen_keys(seeded_weights):
  sd = dict(seeded_weights)
  sd["Mixed_6a.branch3x3.bn.num_batches_tracked"] = np.array(0)  # ignored, as torch would
  del sd["Mixed_7c.branch_pool.bn.running_var"]
  with pytest.raises(StateDictError, match="Mixed_7c.branch_pool.bn.running_var"):
    iw.import_fid_inception(sd, source="x.pth")
  sd = dict(seeded_weights)
  sd["fc.weight"] = sd["fc.weight"][:1000]
  with pytest.raises(StateDictError, match=r"fc.weight.*\(1000, 2048\)"):
    iw.import_fid_inception(sd, source="x.pth")


def test_read_pth_roundtrip(seeded_weights, seeded_params, tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "pt_inception-2015-12-05-test.pth"
  torch.save({k: torch.from_numpy(v) for k, v in seeded_weights.items()}, path)
  params = iw.load_fid_inception(str(path))
  a, b = flatten(params), flatten(seeded_params)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    iw.load_fid_inception(str(tmp_path / "nope.pth"))
