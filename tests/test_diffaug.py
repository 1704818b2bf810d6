"""DiffAug: semantics of the official disc/diffaug.py (numpy transcription), ranges, determinism."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rae_jax.losses.diffaug import apply_diffaug as _apply_diffaug
from rae_jax.losses.diffaug import diffaug, diffaug_draws

_jitted = jax.jit(_apply_diffaug, static_argnums=(2, 3))


def apply_diffaug(x, flags, r, prob, cutout):
  """Policy flags -> the official `u` (on iff u <= |prob|), r (7, B) -> rand01 (7, B, 1, 1)."""
  u = jnp.where(jnp.asarray(flags, bool), 0.0, 2.0)
  r = jnp.asarray(r)
  return _jitted(x, {"u": u, "rand01": r.reshape(r.shape + (1, 1))}, prob, cutout)


def np_diffaug(x, flags, r, prob, cutout):
  """The reference's steps, pixel by pixel, on NHWC numpy arrays."""
  x = x.astype(np.float32).copy()
  b, h, w, _ = x.shape
  if abs(prob) < 1e-6:
    return x
  if flags[0]:
    dh, dw = round(h * 0.125), round(w * 0.125)
    out = np.zeros_like(x)
    for n in range(b):
      th = int(np.floor(r[0, n] * (2 * dh + 1))) - dh
      tw = int(np.floor(r[1, n] * (2 * dw + 1))) - dw
      for i in range(h):
        for j in range(w):
          si, sj = i + th, j + tw  # outside the image -> the zero border
          if 0 <= si < h and 0 <= sj < w:
            out[n, i, j] = x[n, si, sj]
    x = out
  if flags[1]:
    x = x + (r[2] - 0.5)[:, None, None, None]
    m = x.mean(-1, keepdims=True)
    x = (x - m) * (2 * r[3])[:, None, None, None] + m
    m = x.mean((1, 2, 3), keepdims=True)
    x = (x - m) * (r[4] + 0.5)[:, None, None, None] + m
  if prob > 0 and flags[2]:
    ch, cw = round(h * cutout), round(w * cutout)
    for n in range(b):
      oh = int(np.floor(r[5, n] * (h + (1 - ch % 2))))
      ow = int(np.floor(r[6, n] * (w + (1 - cw % 2))))
      for a in range(ch):
        for c in range(cw):
          x[n, min(max(oh + a - ch // 2, 0), h - 1), min(max(ow + c - cw // 2, 0), w - 1)] = 0.0
  return x


@pytest.mark.parametrize("prob,cutout,flags", [
    (1.0, 0.0, (1, 1, 1)), (1.0, 0.2, (1, 1, 1)), (1.0, 0.5, (1, 0, 1)), (0.5, 0.3, (0, 1, 0)),
    (0.7, 0.25, (0, 0, 1)), (-0.5, 0.3, (1, 0, 1))])
def test_matches_reference_semantics(prob, cutout, flags):
  rng = np.random.default_rng(int(abs(prob) * 100 + cutout * 10))
  x = rng.uniform(-1, 1, (4, 17, 20, 3)).astype(np.float32)
  r = rng.uniform(size=(7, 4)).astype(np.float32)
  r[5, 0], r[6, 1] = 0.999, 0.0  # cutout boxes clipped at the far and near borders
  flags = np.asarray(flags, bool)
  got = apply_diffaug(jnp.asarray(x), jnp.asarray(flags), jnp.asarray(r), prob, cutout)
  np.testing.assert_allclose(got, np_diffaug(x, flags, r, prob, cutout), rtol=1e-5, atol=1e-6)


def test_identity_when_prob_zero():
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  np.testing.assert_array_equal(diffaug(jax.random.key(1), x, prob=0.0, cutout=0.5), x)


def test_translation_and_cutout_ranges():
  b, h, w = 64, 16, 24
  x = jnp.ones((b, h, w, 3))
  r = jax.random.uniform(jax.random.key(3), (7, b))
  # Translation only: each image is its shifted copy, |shift| <= round(0.125 * size), zeros enter.
  y = np.asarray(apply_diffaug(x, jnp.array([True, False, False]), r, 1.0, 0.0))
  assert y.shape == x.shape and set(np.unique(y)) <= {0.0, 1.0}
  rows = (y[..., 0] == 1).any(axis=2).sum(1)
  cols = (y[..., 0] == 1).any(axis=1).sum(1)
  assert rows.min() >= h - round(0.125 * h) and cols.min() >= w - round(0.125 * w)
  assert (rows < h).any() and (cols < w).any()  # some images did move
  # Cutout only: one axis-aligned box of at most round(ratio * size) per side is zeroed.
  y = np.asarray(apply_diffaug(x, jnp.array([False, False, True]), r, 1.0, 0.25))
  for img in y[..., 0]:
    zr, zc = np.nonzero(img == 0)
    assert len(zr) > 0
    assert zr.max() - zr.min() + 1 <= round(0.25 * h) and zc.max() - zc.min() + 1 <= round(0.25 * w)
    assert len(zr) == (zr.max() - zr.min() + 1) * (zc.max() - zc.min() + 1)  # a full rectangle
  # Cutout ratio 0 never masks.
  y = np.asarray(apply_diffaug(x, jnp.array([False, False, True]), r, 1.0, 0.0))
  np.testing.assert_array_equal(y, 1.0)


def test_deterministic_per_key_and_jittable():
  x = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3), minval=-1, maxval=1)
  f = jax.jit(diffaug, static_argnames=("prob", "cutout"))
  a = f(jax.random.key(5), x, prob=1.0, cutout=0.2)
  np.testing.assert_array_equal(a, f(jax.random.key(5), x, prob=1.0, cutout=0.2))
  assert not np.allclose(a, f(jax.random.key(6), x, prob=1.0, cutout=0.2))
  d = diffaug_draws(jax.random.key(5), 3)
  r = d["rand01"]
  assert d["u"].shape == (3,) and r.shape == (7, 3, 1, 1)
  assert float(r.min()) >= 0 and float(r.max()) < 1
  # With prob 0.5 the three policies switch on independently, for the whole batch.
  keys = jax.random.split(jax.random.key(7), 200)
  on = np.asarray(jax.vmap(lambda k: diffaug_draws(k, 3)["u"] <= 0.5)(keys))
  assert 0.35 < on.mean() < 0.65


def test_recorded_official_draws_layout():
  """u <= prob switches policies exactly as torch.rand(3) <= prob; wrong layouts are refused."""
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  r = jnp.zeros((7, 2, 1, 1))  # translation by -round(0.125 * 16) = -2 pixels
  off = _apply_diffaug(x, {"u": jnp.array([0.6, 0.6, 0.6]), "rand01": r}, 0.5, 0.2)
  np.testing.assert_array_equal(off, x)
  on = _apply_diffaug(x, {"u": jnp.array([0.5, 0.6, 0.6]), "rand01": r}, 0.5, 0.2)
  assert not np.allclose(on, x)
  with pytest.raises(ValueError, match="rand01"):
    _apply_diffaug(x, {"u": jnp.zeros(3), "rand01": r.reshape(7, 2)}, 1.0, 0.2)
