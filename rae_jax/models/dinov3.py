"""Frozen DINOv3 ViT encoder (HF `DINOv3ViTModel`, eval mode), channels-last.

What differs from DINOv2: no absolute position table -- 2-D RoPE on the patch tokens only (CLS and
register tokens are not rotated), computed from the actual patch grid so any input size works
without interpolation; separate q/k/v biases (the release has no key bias); layer scale on both
branches; optional SwiGLU MLP (`use_gated_mlp`, the larger checkpoints). As the RAE wrappers use
the encoders, the output drops CLS + register tokens and ends in a LayerNorm without affine.

Train-only parts of HF are absent on purpose: RoPE coordinate shift/jitter/rescale augmentation
(`pos_embed_*`, active only in `model.train()`), drop-path and the mask token -- the encoder is
frozen and always run as `model.eval()`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from rae_jax.models.attention import dot_product_attention
from rae_jax.models.vit_blocks import activation, layer_norm

Dtype = Any


def dinov3_rope_tables(grid_h: int, grid_w: int, head_dim: int,
                       theta: float) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin), each (grid_h*grid_w, head_dim) float32: HF DINOv3 RoPE for a patch grid (the
  split-halves convention; the DiT's interleaved-pairs RoPE is models/layers.rope_tables).

  Patch centres in [-1, 1] per axis; head_dim/4 frequencies theta^-(4i/head_dim) per axis; angles
  laid out [y freqs, x freqs] and tiled twice (the rotate-half convention). Static shapes, so this
  is numpy, computed once per trace.
  """
  if head_dim % 4:
    raise ValueError(f"dinov3: head_dim {head_dim} must be divisible by 4 for 2-D RoPE")
  inv_freq = np.float32(1.0) / (np.float32(theta) ** (np.arange(head_dim // 4, dtype=np.float32)
                                                       * np.float32(4.0 / head_dim)))
  ch = np.arange(0.5, grid_h, dtype=np.float32) / np.float32(grid_h)
  cw = np.arange(0.5, grid_w, dtype=np.float32) / np.float32(grid_w)
  coords = np.stack(np.meshgrid(ch, cw, indexing="ij"), axis=-1).reshape(-1, 2)
  coords = np.float32(2.0) * coords - np.float32(1.0)
  angles = np.float32(2 * math.pi) * coords[:, :, None] * inv_freq[None, None, :]
  angles = np.tile(angles.reshape(angles.shape[0], -1), (1, 2))
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_dinov3_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """x (B, N, H, D): rotate the last cos.shape[0] tokens (the patches), keep the prefix."""
  n_patch = cos.shape[0]
  prefix, patches = x[:, :-n_patch], x[:, -n_patch:]
  half = patches.shape[-1] // 2
  rotated = jnp.concatenate([-patches[..., half:], patches[..., :half]], axis=-1)
  cos, sin = cos[None, :, None, :].astype(x.dtype), sin[None, :, None, :].astype(x.dtype)
  return jnp.concatenate([prefix, patches * cos + rotated * sin], axis=1)


class Dinov3Attention(nn.Module):
  num_heads: int
  query_bias: bool = True
  key_bias: bool = False
  value_bias: bool = True
  proj_bias: bool = True
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"  # see rae_jax.models.attention

  @nn.compact
  def __call__(self, x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    b, n, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"dinov3: hidden size {c} is not divisible by num_heads {self.num_heads}")
    d = c // self.num_heads
    dense = lambda name, bias: nn.Dense(c, use_bias=bias, dtype=self.dtype, name=name)
    q = dense("q", self.query_bias)(x).reshape(b, n, self.num_heads, d)
    k = dense("k", self.key_bias)(x).reshape(b, n, self.num_heads, d)
    v = dense("v", self.value_bias)(x).reshape(b, n, self.num_heads, d)
    q, k = apply_dinov3_rope(q, cos, sin), apply_dinov3_rope(k, cos, sin)
    out = dot_product_attention(q, k, v, impl=self.attention_impl).reshape(b, n, c)
    return dense("o", self.proj_bias)(out)


class Dinov3Mlp(nn.Module):
  """up -> act -> down, or SwiGLU down(act(gate(x)) * up(x)) when `gated`."""
  intermediate_size: int
  act: str = "gelu"
  gated: bool = False
  bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    dense = lambda width, name: nn.Dense(width, use_bias=self.bias, dtype=self.dtype, name=name)
    up = dense(self.intermediate_size, "up")(x)
    if self.gated:
      h = activation(self.act)(dense(self.intermediate_size, "gate")(x)) * up
    else:
      h = activation(self.act)(up)
    return dense(x.shape[-1], "down")(h)


class Dinov3Block(nn.Module):
  """x + ls1 * attn(norm1(x), rope); x + ls2 * mlp(norm2(x))."""
  num_heads: int
  intermediate_size: int
  layer_norm_eps: float = 1e-5
  layerscale_value: float = 1.0
  act: str = "gelu"
  gated: bool = False
  query_bias: bool = True
  key_bias: bool = False
  value_bias: bool = True
  proj_bias: bool = True
  mlp_bias: bool = True
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x, cos, sin):
    c = x.shape[-1]
    ls = lambda name: self.param(name, nn.initializers.constant(self.layerscale_value), (c,))
    y = layer_norm(self.layer_norm_eps, "norm1", dtype=self.dtype)(x)
    y = Dinov3Attention(self.num_heads, self.query_bias, self.key_bias, self.value_bias,
                        self.proj_bias, self.dtype, self.attention_impl, name="attn")(y, cos, sin)
    x = x + y * ls("ls1").astype(y.dtype)
    y = layer_norm(self.layer_norm_eps, "norm2", dtype=self.dtype)(x)
    y = Dinov3Mlp(self.intermediate_size, self.act, self.gated, self.mlp_bias, self.dtype,
                  name="mlp")(y)
    return x + y * ls("ls2").astype(y.dtype)


class Dinov3Encoder(nn.Module):
  """Normalised images (B, H, W, 3) -> patch tokens (B, H/p * W/p, C).

  Field names and defaults are `DINOv3ViTConfig`'s, so a config.json builds it directly.
  """
  hidden_size: int = 384
  num_hidden_layers: int = 12
  num_attention_heads: int = 6
  intermediate_size: int = 1536
  patch_size: int = 16
  image_size: int = 224
  num_register_tokens: int = 0
  layer_norm_eps: float = 1e-5
  layerscale_value: float = 1.0
  hidden_act: str = "gelu"
  rope_theta: float = 100.0
  query_bias: bool = True
  key_bias: bool = False
  value_bias: bool = True
  proj_bias: bool = True
  mlp_bias: bool = True
  use_gated_mlp: bool = False
  normalize: bool = True  # as Dinov2withNorm: final LayerNorm without affine
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"  # see rae_jax.models.attention

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"dinov3: expected images (B, H, W, 3), got {x.shape}")
    b, h, w, _ = x.shape
    c, p, r = self.hidden_size, self.patch_size, self.num_register_tokens
    if h < p or w < p:
      raise ValueError(f"dinov3: input {h}x{w} is smaller than one {p}x{p} patch")
    y = nn.Conv(c, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="patch_embed")(x)
    gh, gw = y.shape[1], y.shape[2]
    tokens = y.reshape(b, gh * gw, c)
    cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, c))
    prefix = [jnp.broadcast_to(cls.astype(tokens.dtype), (b, 1, c))]
    if r:
      reg = self.param("register_tokens", nn.initializers.normal(0.02), (1, r, c))
      prefix.append(jnp.broadcast_to(reg.astype(tokens.dtype), (b, r, c)))
    x = jnp.concatenate(prefix + [tokens], axis=1)
    cos, sin = dinov3_rope_tables(gh, gw, c // self.num_attention_heads, self.rope_theta)
    for i in range(self.num_hidden_layers):
      x = Dinov3Block(self.num_attention_heads, self.intermediate_size, self.layer_norm_eps,
                      self.layerscale_value, self.hidden_act, self.use_gated_mlp, self.query_bias,
                      self.key_bias, self.value_bias, self.proj_bias, self.mlp_bias, self.dtype,
                      self.attention_impl, name=f"blocks_{i}")(x, cos, sin)
    x = layer_norm(self.layer_norm_eps, "final_norm", affine=not self.normalize,
                   dtype=self.dtype)(x)
    return x[:, 1 + r:]
