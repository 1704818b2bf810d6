"""Exponential moving average of parameters, updated after every optimizer step.

Same arithmetic as the official update_ema (ema.mul_(d).add_(p, alpha=1 - d)), starting from a
copy of the initial parameters.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def ema_update(ema_params: Any, params: Any, decay: float | jax.Array) -> Any:
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf, in the EMA's dtype."""
  decay = jnp.asarray(decay, jnp.float32)

  def one(e, p):
    return (e * decay.astype(e.dtype) + p.astype(e.dtype) * (1 - decay).astype(e.dtype))
  return jax.tree.map(one, ema_params, params)
