"""PyTorch-compatible interpolation (bicubic, antialiased bicubic, bilinear) for NHWC arrays.

Why matrices: every torch `F.interpolate` mode used by the reference is separable and linear, so we
precompute the (out, in) interpolation matrix per axis in float64 numpy (static shapes, so this runs
at trace time) and apply it with two einsums. This is exact up to float32 rounding and jit-friendly.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys cubic convolution kernel."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _source_scale(in_size: int, out_size: int, scale_factor: Optional[float]) -> float:
  # torch (align_corners=False): an explicit scale_factor is used as 1/scale_factor, else in/out.
  if scale_factor is not None and scale_factor > 0:
    return 1.0 / scale_factor
  return in_size / out_size


@functools.lru_cache(maxsize=256)
def bicubic_matrix(in_size: int, out_size: int, scale_factor: Optional[float] = None,
                   a: float = -0.75) -> np.ndarray:
  """torch bicubic, align_corners=False, antialias=False: 4 taps, border indices clamped."""
  scale = _source_scale(in_size, out_size, scale_factor)
  src = scale * (np.arange(out_size) + 0.5) - 0.5  # cubic: no clamp of negative coordinates
  i0 = np.floor(src).astype(np.int64)
  t = src - i0
  m = np.zeros((out_size, in_size))
  for k in range(-1, 3):
    idx = np.clip(i0 + k, 0, in_size - 1)
    np.add.at(m, (np.arange(out_size), idx), _cubic(t - k, a))
  return m


@functools.lru_cache(maxsize=256)
def bicubic_aa_matrix(in_size: int, out_size: int, a: float = -0.5) -> np.ndarray:
  """torch bicubic with antialias=True (PIL-style): kernel stretched by the downscale factor,
  window truncated at the borders and renormalised. torch uses a = -0.5 on this path."""
  scale = in_size / out_size
  support = 2.0 * scale if scale >= 1.0 else 2.0
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  m = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    j = np.arange(lo, hi)
    w = _cubic((j - center + 0.5) * invscale, a)
    total = w.sum()
    m[i, lo:hi] = w / total if total != 0 else w
  return m


@functools.lru_cache(maxsize=256)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """torch bilinear, align_corners=False, antialias=False."""
  scale = in_size / out_size
  src = np.maximum(scale * (np.arange(out_size) + 0.5) - 0.5, 0.0)
  i0 = np.minimum(src.astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = src - i0
  m = np.zeros((out_size, in_size))
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), 1.0 - lam)
  np.add.at(m, (rows, i1), lam)
  return m


def _matrix(mode: str, in_size: int, out_size: int, scale_factor: Optional[float]) -> np.ndarray:
  if mode == "bicubic":
    return bicubic_matrix(in_size, out_size, scale_factor)
  if scale_factor is not None:
    raise ValueError(f"scale_factor is only supported for mode='bicubic', got mode={mode!r}")
  if mode == "bicubic_aa":
    return bicubic_aa_matrix(in_size, out_size)
  if mode == "bilinear":
    return bilinear_matrix(in_size, out_size)
  raise ValueError(f"unknown resize mode {mode!r}; expected 'bicubic', 'bicubic_aa' or 'bilinear'")


def resize(x: jnp.ndarray, size: Sequence[int], mode: str = "bicubic",
           scale_factor: Optional[Sequence[float]] = None) -> jnp.ndarray:
  """Resize (..., H, W, C) to (..., size[0], size[1], C) like torch `F.interpolate` on NCHW.

  `scale_factor` (per axis) mirrors torch's `scale_factor=` argument, which changes the source
  coordinates (1/scale instead of in/out); `size` must then be floor(in * scale).
  """
  h_in, w_in = x.shape[-3], x.shape[-2]
  h_out, w_out = int(size[0]), int(size[1])
  sf_h, sf_w = (None, None) if scale_factor is None else scale_factor
  if (h_in, w_in) == (h_out, w_out) and mode != "bicubic_aa" and scale_factor is None:
    return x
  mh = jnp.asarray(_matrix(mode, h_in, h_out, sf_h), x.dtype)
  mw = jnp.asarray(_matrix(mode, w_in, w_out, sf_w), x.dtype)
  hp = lax.Precision.HIGHEST
  x = jnp.einsum("oh,...hwc->...owc", mh, x, precision=hp)
  return jnp.einsum("pw,...owc->...opc", mw, x, precision=hp)


def resize_bicubic(x: jnp.ndarray, size: Sequence[int]) -> jnp.ndarray:
  """torch `interpolate(mode='bicubic', align_corners=False)` (a=-0.75, no antialias), NHWC."""
  return resize(x, size, "bicubic")
