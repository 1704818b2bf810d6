"""ViT pixel decoder: the official RAE `GeneralDecoder` (an MAE decoder without mask tokens).

latent tokens -> linear embed -> [trainable cls] + 2-D sin-cos positions -> pre-LN blocks
-> LN -> linear to p*p*3 pixels per token -> drop cls -> unpatchify. Channels-last throughout.

`decoder_pos_embed` is a parameter initialised to the sin-cos table. The reference declares it
`requires_grad=False`, but its stage-1 trainer calls `rae.decoder.requires_grad_(True)` and builds
AdamW over `decoder.parameters()`, so the official decoders train it (it moves ~4e-3 in six steps of
the reference trajectory) and released `model.pt` files carry trained values; import keeps them.
`config.stage1.train_pos_embed=False` freezes it instead (see pipeline/stage1.py).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from rae_jax.models import resize as rs
from rae_jax.models.layers import maybe_remat, scan_groups
from rae_jax.models.vit_blocks import ViTBlock, layer_norm


def sincos_pos_embed_2d(dim: int, grid_size: int, add_cls_token: bool = True) -> np.ndarray:
  """MAE's fixed 2-D sin-cos table (float64 maths, float32 result, zero cls row).

  As in the MAE code, the first half of the channels encodes the column index and the second half
  the row index; matching that ordering bit-for-bit keeps exported `decoder_pos_embed` identical.
  """
  if dim % 4:
    raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
  coords = np.arange(grid_size, dtype=np.float32)
  cols, rows = np.meshgrid(coords, coords)  # cols[i, j] = j, rows[i, j] = i

  def one_d(d, pos):
    omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  emb = np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)
  if add_cls_token:
    emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
  return emb.astype(np.float32)


def unpatchify(logits: jnp.ndarray, patch_size: int, num_channels: int = 3,
               grid: Optional[Tuple[int, int]] = None) -> jnp.ndarray:
  """(B, h*w, p*p*C) -> (B, h*p, w*p, C); per-patch pixel order (p, q, c) as the reference."""
  b, n, _ = logits.shape
  if grid is None:
    side = math.isqrt(n)
    if side * side != n:
      raise ValueError(f"cannot unpatchify {n} tokens into a square grid; pass grid=(h, w)")
    grid = (side, side)
  h, w = grid
  if h * w != n:
    raise ValueError(f"grid {grid} does not hold {n} tokens")
  x = logits.reshape(b, h, w, patch_size, patch_size, num_channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * patch_size, w * patch_size, num_channels)


class ViTDecoder(nn.Module):
  """GeneralDecoder. Field names follow the HF ViTMAEConfig keys the reference reads."""
  hidden_size: int  # latent (encoder) channel dim
  decoder_hidden_size: int = 512
  decoder_num_hidden_layers: int = 8
  decoder_num_attention_heads: int = 16
  decoder_intermediate_size: int = 2048
  patch_size: int = 16
  num_patches: int = 256
  num_channels: int = 3
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  qkv_bias: bool = True
  dtype: Any = jnp.float32
  remat: bool = False
  remat_policy: str = "nothing_saveable"  # layers.REMAT_POLICIES (used when remat)
  attention_impl: str = "auto"  # see rae_jax.models.attention
  # One scanned stack `decoder_layers` (params with a leading layer axis; layers.to_layout
  # converts) instead of decoder_layers_{i}. Why: remat only bounds memory in a
  # scan; unrolled, the compiler may schedule every layer's recomputation early (the compiled
  # stage-1 step kept all activations under every policy, bench/train_step.py memory_plan).
  scan_layers: bool = False

  @property
  def grid_size(self) -> int:
    side = math.isqrt(self.num_patches)
    if side * side != self.num_patches:
      raise ValueError(f"num_patches must be a square, got {self.num_patches}")
    return side

  @property
  def image_size(self) -> int:
    return self.grid_size * self.patch_size

  def pos_embed(self) -> np.ndarray:
    """The (1, num_patches + 1, D) sin-cos table `decoder_pos_embed` is initialised to."""
    return sincos_pos_embed_2d(self.decoder_hidden_size, self.grid_size)[None]

  @property
  def layer_layout(self) -> dict:
    return scan_groups("decoder_layers_", {"decoder_layers": (0, self.decoder_num_hidden_layers)})

  def setup(self):
    self.decoder_embed = nn.Dense(self.decoder_hidden_size, dtype=self.dtype)
    table = self.pos_embed()
    self.decoder_pos_embed = self.param(
        "decoder_pos_embed", lambda _, shape: jnp.asarray(table).reshape(shape), table.shape)
    self.trainable_cls_token = self.param(
        "trainable_cls_token", nn.initializers.zeros, (1, 1, self.decoder_hidden_size))
    block = maybe_remat(ViTBlock, self.remat, self.remat_policy, scan=self.scan_layers)
    kwargs = dict(num_heads=self.decoder_num_attention_heads,
                  mlp_dim=self.decoder_intermediate_size, layer_norm_eps=self.layer_norm_eps,
                  act=self.hidden_act, qkv_bias=self.qkv_bias, dtype=self.dtype,
                  attention_impl=self.attention_impl)
    if self.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=self.decoder_num_hidden_layers)
      self.decoder_layers = stack(**kwargs, scanned=True)
    else:
      self.decoder_layers = [block(**kwargs) for _ in range(self.decoder_num_hidden_layers)]
    self.decoder_norm = layer_norm(self.layer_norm_eps, None, dtype=self.dtype)
    self.decoder_pred = nn.Dense(self.patch_size**2 * self.num_channels, dtype=self.dtype)

  def _interpolate_latent(self, x: jnp.ndarray) -> jnp.ndarray:
    # The reference bilinearly resizes any other token count to the trained square grid.
    b, n, c = x.shape
    if n == self.num_patches:
      return x
    side = math.isqrt(n)
    grid = x.reshape(b, side, side, c)
    out = rs.resize(grid, (self.grid_size, self.grid_size), "bilinear")
    return out.reshape(b, self.num_patches, c)

  def _interpolate_pos(self, pos: jnp.ndarray, n_tokens: int) -> jnp.ndarray:
    # Reference quirk: a 1-D bicubic along the token axis with scale_factor n_tokens/num_patches.
    s = n_tokens / self.num_patches
    patch = pos[:, 1:][:, None]  # (1, 1, N, D) as NHWC
    out = rs.resize(patch, (1, int(math.floor(self.num_patches * s))), "bicubic",
                    scale_factor=(1.0, s))
    return jnp.concatenate([pos[:, :1], out[:, 0]], axis=1)

  def logits(self, tokens: jnp.ndarray, *, drop_cls_token: bool = False,
             interpolate_pos_encoding: bool = False) -> jnp.ndarray:
    """Reference `forward(...).logits`: (B, N, C) -> (B, num_patches, p*p*num_channels)."""
    if tokens.ndim == 4:
      tokens = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
    x = self.decoder_embed(tokens)
    x = self._interpolate_latent(x[:, 1:] if drop_cls_token else x)
    cls = jnp.broadcast_to(self.trainable_cls_token.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    pos = self.decoder_pos_embed
    if interpolate_pos_encoding:
      if not drop_cls_token:
        raise ValueError("interpolate_pos_encoding only works with drop_cls_token=True")
      pos = self._interpolate_pos(pos, x.shape[1] - 1)
    x = x + pos.astype(x.dtype)
    if self.scan_layers:
      x, _ = self.decoder_layers(x, None)
    else:
      for layer in self.decoder_layers:
        x = layer(x)
    x = self.decoder_pred(self.decoder_norm(x))
    return x[:, 1:]

  def __call__(self, z: jnp.ndarray, *, drop_cls_token: bool = False,
               interpolate_pos_encoding: bool = False) -> jnp.ndarray:
    """Tokens (B, N, C) or latents (B, h, w, C) -> image (B, H, W, num_channels)."""
    out = self.logits(z, drop_cls_token=drop_cls_token,
                      interpolate_pos_encoding=interpolate_pos_encoding)
    return unpatchify(out, self.patch_size, self.num_channels)


def decoder_from_hf_config(config: dict, **overrides) -> ViTDecoder:
  """Build from a ViTMAEConfig-style dict (e.g. configs/decoder/ViTXL/config.json) + overrides.

  Like the RAE wrapper, pass hidden_size (the encoder width), patch_size and num_patches.
  """
  fields = {f for f in ViTDecoder.__dataclass_fields__ if f not in ("parent", "name")}
  kwargs = {k: v for k, v in config.items() if k in fields}
  kwargs.update(overrides)
  if not isinstance(kwargs.get("patch_size"), int):
    raise ValueError(f"decoder config: patch_size must be an int, got {kwargs.get('patch_size')!r}")
  return ViTDecoder(**kwargs)
