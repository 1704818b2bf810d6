"""Guided velocities for sampling: classifier-free guidance and autoguidance.

`model_fn(x, t, y) -> velocity`, channels-last. Guidance is applied to all channels and only for
samples whose time lies in the closed interval [t_min, t_max] (elsewhere: the conditional /
main-model velocity), as in the official DiTwDDTHead. A Python scale of exactly 1 short-cuts to
a single plain forward, so unguided sampling costs no extra evaluation and is bit-identical.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

ModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _is_one(scale) -> bool:
  return isinstance(scale, (int, float)) and float(scale) == 1.0


def _check_interval(interval: Sequence[float]) -> tuple[float, float]:
  lo, hi = interval
  if not lo < hi:
    raise ValueError(f"guidance interval must be (t_min, t_max) with t_min < t_max, got {interval}")
  return lo, hi


def _in_interval(t: jax.Array, interval, ndim: int) -> jax.Array:
  lo, hi = _check_interval(interval)
  mask = (t >= lo) & (t <= hi)
  return mask.reshape(mask.shape + (1,) * (ndim - 1))


def _per_sample(t, batch: int) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))


def guide(main: jax.Array, other: jax.Array, t: jax.Array, scale, interval) -> jax.Array:
  """other + scale * (main - other) inside the interval, main outside."""
  guided = other + scale * (main - other)
  return jnp.where(_in_interval(t, interval, main.ndim), guided, main)


def cfg_velocity(model_fn: ModelFn, x: jax.Array, t, y: jax.Array, *, scale,
                 interval: Sequence[float] = (0.0, 1.0), null_class: int) -> jax.Array:
  """Classifier-free guidance for the batch (x, t, y): one forward over 2B rows.

  Each sample's cond and null rows sit side by side (interleaved, not [cond; null]): on a
  batch-sharded mesh every device then doubles its own rows, where the concatenation moved half
  of every device's activations to another device at every sampling step.
  """
  b = x.shape[0]
  t = _per_sample(t, b)
  if _is_one(scale):
    return model_fn(x, t, y)
  _check_interval(interval)

  def pairs(cond, null):
    return jnp.stack([cond, null], axis=1).reshape((2 * b,) + cond.shape[1:])
  out = model_fn(pairs(x, x), pairs(t, t), pairs(y, jnp.full_like(y, null_class)))
  out = out.reshape((b, 2) + out.shape[1:])
  return guide(out[:, 0], out[:, 1], t, scale, interval)


def autoguidance_velocity(model_fn: ModelFn, guide_fn: ModelFn, x: jax.Array, t, y: jax.Array,
                          *, scale, interval: Sequence[float] = (0.0, 1.0)) -> jax.Array:
  """Autoguidance: extrapolate the main model away from a weaker guide model (same labels)."""
  t = _per_sample(t, x.shape[0])
  if _is_one(scale):
    return model_fn(x, t, y)
  _check_interval(interval)
  return guide(model_fn(x, t, y), guide_fn(x, t, y), t, scale, interval)


def forward_with_cfg(model_fn: ModelFn, x: jax.Array, t: jax.Array, y: jax.Array, *, scale,
                     interval: Sequence[float] = (0.0, 1.0)) -> jax.Array:
  """The official `DiTwDDTHead.forward_with_cfg` contract: doubled batch in, doubled out.

  x's second half is ignored (replaced by the first), y is expected as [labels; null], and the
  interval test uses the first half of t. Kept for parity with reference sampling code.
  """
  half = x.shape[0] // 2
  out = model_fn(jnp.concatenate([x[:half], x[:half]]), t, y)
  cond, uncond = out[:half], out[half:2 * half]
  guided = guide(cond, uncond, t[:half], scale, interval)
  return jnp.concatenate([guided, guided])
