"""torch-compatible interpolation: golden vector and direct comparison with F.interpolate."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from rae_jax.models import resize as rs


def test_bicubic_matches_reference_vector(ref_dir):
  io = np.load(ref_dir / "rae_tiny.io.npz")
  out = jax.jit(lambda x: rs.resize_bicubic(x, (16, 16)))(io["image"].transpose(0, 2, 3, 1))
  assert rel_err(np.asarray(out).transpose(0, 3, 1, 2), io["resized_bicubic"]) <= 1e-6


CASES = [(20, 16), (4, 6), (37, 16), (14, 16), (5, 11), (9, 4), (3, 1)]


@pytest.mark.parametrize("mode", ["bicubic", "bicubic_aa", "bilinear"])
def test_matrices_match_torch(mode):
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  kw = dict(mode=mode.replace("_aa", ""), align_corners=False, antialias=mode.endswith("_aa"))
  for n_in, n_out in CASES:
    x = np.random.default_rng(n_in).standard_normal((1, 1, 3, n_in))
    ref = F.interpolate(torch.from_numpy(x), size=(3, n_out), **kw).numpy()[0, 0]
    m = rs._matrix(mode, n_in, n_out, None)
    np.testing.assert_allclose(x[0, 0] @ m.T, ref, rtol=1e-10, atol=1e-12,
                               err_msg=f"{n_in}->{n_out}")


def test_scale_factor_path_matches_torch():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).standard_normal((1, 1, 1, 16))
  for s in (0.75, 1.0, 17 / 16, 1.5):
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), scale_factor=(1, s), mode="bicubic",
                                          align_corners=False).numpy()[0, 0]
    m = rs.bicubic_matrix(16, int(np.floor(16 * s)), s)
    np.testing.assert_allclose(x[0, 0] @ m.T, ref, rtol=1e-10, atol=1e-12)


def test_nhwc_resize_2d_non_square():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(1).standard_normal((2, 7, 5, 3)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(4, 9),
                                        mode="bicubic", align_corners=False).numpy()
  out = rs.resize(jnp.asarray(x), (4, 9), "bicubic")
  assert out.shape == (2, 4, 9, 3)
  assert rel_err(np.asarray(out).transpose(0, 3, 1, 2), ref) <= 1e-6


def test_bad_mode():
  with pytest.raises(ValueError, match="unknown resize mode 'nearest'"):
    rs.resize(jnp.zeros((1, 4, 4, 1)), (2, 2), "nearest")
