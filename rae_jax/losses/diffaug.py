"""DiffAug (official `disc/diffaug.py`, from StyleGAN-T): translation, colour and cutout.

As the reference: each of the three policies is switched on for the whole batch with probability
`prob`, and per-sample magnitudes come from 7 uniform draws per sample. The draws are explicit and
in the reference's layout -- `u` (3,) from its `torch.rand(3)` and `rand01` (7, B, 1, 1) from its
`torch.rand(7, B, 1, 1)` -- so `apply_diffaug(x, draws)` can replay recorded official draws, and
`diffaug(key, x)` = apply_diffaug(x, diffaug_draws(key, B)). Images NHWC; the warm-up blur of the
reference (unused by RAE's train loop) is not implemented.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

TRANSLATION_RATIO = 0.125


def diffaug_draws(key: jax.Array, batch: int) -> dict:
  """{'u': (3,), 'rand01': (7, B, 1, 1)} uniforms, the reference's two torch.rand calls."""
  k_flags, k_vals = jax.random.split(key)
  return {"u": jax.random.uniform(k_flags, (3,)),
          "rand01": jax.random.uniform(k_vals, (7, batch, 1, 1))}


def _translate(x, r_h, r_w):
  b, h, w, _ = x.shape
  dh, dw = round(h * TRANSLATION_RATIO), round(w * TRANSLATION_RATIO)
  th = jnp.floor(r_h * (2 * dh + 1)).astype(jnp.int32) - dh
  tw = jnp.floor(r_w * (2 * dw + 1)).astype(jnp.int32) - dw
  # Zero border of one pixel; indices clamped into it, so shifted-in pixels are zero.
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ih = jnp.clip(jnp.arange(h)[None] + th[:, None] + 1, 0, h + 1)
  iw = jnp.clip(jnp.arange(w)[None] + tw[:, None] + 1, 0, w + 1)
  xp = jnp.take_along_axis(xp, ih[:, :, None, None], axis=1)
  return jnp.take_along_axis(xp, iw[:, None, :, None], axis=2)


def _colour(x, r_bright, r_sat, r_contrast):
  x = x + (r_bright - 0.5)[:, None, None, None]
  m = x.mean(axis=-1, keepdims=True)
  x = (x - m) * (2.0 * r_sat)[:, None, None, None] + m
  m = x.mean(axis=(1, 2, 3), keepdims=True)
  return (x - m) * (r_contrast + 0.5)[:, None, None, None] + m


def _cutout_mask(shape, ratio, r_h, r_w):
  _, h, w, _ = shape
  ch, cw = round(h * ratio), round(w * ratio)

  def span(r, size, c):
    # Reference: rows clamp(offset + arange(c) - c//2, 0, size-1), a contiguous clamped range.
    off = jnp.floor(r * (size + (1 - c % 2))).astype(jnp.int32)
    lo = jnp.clip(off - c // 2, 0, size - 1)
    hi = jnp.clip(off - c // 2 + c - 1, 0, size - 1)
    i = jnp.arange(size)[None]
    return (i >= lo[:, None]) & (i <= hi[:, None])

  if ch == 0 or cw == 0:
    return jnp.ones(shape[:3], jnp.float32)
  hit = span(r_h, h, ch)[:, :, None] & span(r_w, w, cw)[:, None, :]
  return jnp.where(hit, 0.0, 1.0)


def apply_diffaug(x: jax.Array, draws: dict, prob: float = 1.0, cutout: float = 0.0) -> jax.Array:
  """The augmentation as a pure function of the draws (`diffaug_draws` layout).

  Policy i (translation, colour, cutout) is on when u[i] <= |prob|, as the reference's
  `torch.rand(3) <= self.prob`.
  """
  x = x.astype(jnp.float32)
  if abs(prob) < 1e-6:
    return x
  b = x.shape[0]
  u, rand01 = draws["u"], draws["rand01"]
  if u.shape != (3,) or rand01.shape != (7, b, 1, 1):
    raise ValueError(f"DiffAug draws: expected u (3,) and rand01 (7, {b}, 1, 1), got "
                     f"{u.shape} and {rand01.shape}")
  flags = u <= abs(prob)
  rand01 = rand01.reshape(7, b)
  x = jnp.where(flags[0], _translate(x, rand01[0], rand01[1]), x)
  x = jnp.where(flags[1], _colour(x, rand01[2], rand01[3], rand01[4]), x)
  if prob > 0:  # the reference disables cutout for negative prob
    mask = _cutout_mask(x.shape, cutout, rand01[5], rand01[6])
    x = jnp.where(flags[2], x * mask[..., None], x)
  return x


def diffaug(key: jax.Array, x: jax.Array, prob: float = 1.0, cutout: float = 0.0) -> jax.Array:
  """Augment NHWC images x (any range; RAE uses [-1, 1]) with fresh draws from `key`."""
  if abs(prob) < 1e-6:
    return x.astype(jnp.float32)
  return apply_diffaug(x, diffaug_draws(key, x.shape[0]), prob, cutout)
