"""Pre-LN ViT building blocks shared by the frozen encoders and the pixel decoder.

One block serves DINOv2 (layer scale), SigLIP (tanh GELU), ViT-MAE and the RAE decoder: they differ
only in activation, layer scale and epsilon, so the PyTorch name maps stay small.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from rae_jax.models.attention import dot_product_attention
from rae_jax.models.partitioning import constrain_batch

Dtype = Any

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU() / HF "gelu"
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported hidden_act {name!r}; expected one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def layer_norm(eps: float, name: str, affine: bool = True, dtype: Dtype = jnp.float32):
  # Two-pass variance like torch: the fast E[x^2]-E[x]^2 form loses digits at eps=1e-12.
  return nn.LayerNorm(epsilon=eps, use_scale=affine, use_bias=affine, use_fast_variance=False,
                      dtype=dtype, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with separate q/k/v projections (the HF / MAE layout)."""
  num_heads: int
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"  # see rae_jax.models.attention

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, n, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"hidden size {c} is not divisible by num_heads {self.num_heads}")
    d = c // self.num_heads
    dense = lambda name, bias: nn.Dense(c, use_bias=bias, dtype=self.dtype, name=name)
    q = dense("q", self.qkv_bias)(x).reshape(b, n, self.num_heads, d)
    k = dense("k", self.qkv_bias)(x).reshape(b, n, self.num_heads, d)
    v = dense("v", self.qkv_bias)(x).reshape(b, n, self.num_heads, d)
    out = dot_product_attention(q, k, v, impl=self.attention_impl).reshape(b, n, c)
    return dense("o", True)(out)


class Mlp(nn.Module):
  mlp_dim: int
  act: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
    y = activation(self.act)(y)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(y)


class ViTBlock(nn.Module):
  """x + ls1 * attn(norm1(x)); x + ls2 * mlp(norm2(x)). Layer scale only when layerscale_init."""
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  act: str = "gelu"
  qkv_bias: bool = True
  layerscale_init: Optional[float] = None
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  scanned: bool = False  # inside nn.scan: returns (x, None) and pins the carry to batch shards

  @nn.compact
  def __call__(self, x: jnp.ndarray, _=None):
    c = x.shape[-1]
    if self.scanned:
      x = constrain_batch(x)

    def scale(name, y):
      if self.layerscale_init is None:
        return y
      gamma = self.param(name, nn.initializers.constant(self.layerscale_init), (c,))
      return y * gamma.astype(y.dtype)

    y = layer_norm(self.layer_norm_eps, "norm1", dtype=self.dtype)(x)
    y = Attention(self.num_heads, self.qkv_bias, self.dtype, self.attention_impl, name="attn")(y)
    y = checkpoint_name(y, "attention_out")  # kept by remat_policy="save_attention_out"
    x = x + scale("ls1", y)
    y = layer_norm(self.layer_norm_eps, "norm2", dtype=self.dtype)(x)
    y = Mlp(self.mlp_dim, self.act, self.dtype, name="mlp")(y)
    x = x + scale("ls2", y)
    return (constrain_batch(x), None) if self.scanned else x
