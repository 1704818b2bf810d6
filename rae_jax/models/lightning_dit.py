"""LightningDiT: the plain DiT baseline of RAE (official `stage2.models.lightningDiT.LightningDiT`).

Same block as DiTDH's encoder, conditioned on c = t + y (no outer silu; the adaLN MLP starts
with one), fixed sin-cos positions always on. Field names and defaults are the official kwargs;
`use_gembed` is accepted for config compatibility and, as in the reference, unused.
wo_shift=True (which the reference cannot run) is the scale-only modulation.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from rae_jax.models import layers


class LightningDiT(nn.Module):
  """Returns the velocity (B, h, w, C) for latents x (B, h, w, C), times t (B,), labels y (B,)."""
  input_size: int = 16
  patch_size: int = 1
  in_channels: int = 768
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  num_classes: int = 1000
  learn_sigma: bool = False
  use_qknorm: bool = False
  use_swiglu: bool = True
  use_rope: bool = True
  use_rmsnorm: bool = True
  wo_shift: bool = False
  use_gembed: bool = True
  dtype: Any = jnp.float32
  attention_impl: str = "auto"  # xla | cudnn | splash | auto (models/attention.py)
  remat: bool = False
  remat_policy: str = "nothing_saveable"  # layers.REMAT_POLICIES (used when remat)
  scan_layers: bool = False

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def grid(self) -> int:
    if self.input_size % self.patch_size:
      raise ValueError(f"input_size {self.input_size} not divisible by patch {self.patch_size}")
    return self.input_size // self.patch_size

  @property
  def layer_layout(self) -> dict:
    return layers.scan_groups("blocks_", {"blocks": (0, self.depth)})

  @nn.compact
  def __call__(self, x, t, y, *, train: bool = False, force_drop_ids=None):
    b, h, w, c = x.shape
    if (h, w) != (self.input_size, self.input_size) or c != self.in_channels:
      raise ValueError(f"LightningDiT expects latents (B, {self.input_size}, {self.input_size}, "
                       f"{self.in_channels}), got {x.shape}")
    d, p, grid = self.hidden_size, self.patch_size, self.grid
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))

    z = layers.PatchEmbed(p, d, dtype=self.dtype, name="x_embedder")(x.astype(self.dtype))
    z = z + jnp.asarray(layers.get_2d_sincos_pos_embed(d, grid), self.dtype)
    t_emb = layers.GaussianFourierEmbedder(d, xavier=True, dtype=self.dtype,
                                           name="t_embedder")(t)
    y_emb = layers.LabelEmbedder(self.num_classes, d, self.class_dropout_prob, dtype=self.dtype,
                                 name="y_embedder")(y, train, force_drop_ids)
    cond = layers.constrain_batch(t_emb) + layers.constrain_batch(y_emb)

    z = layers.block_stack(
        z, cond, depth=self.depth, first_index=0, scan=self.scan_layers, remat=self.remat,
        remat_policy=self.remat_policy,
        scan_name="blocks", hidden_size=d, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
        use_qknorm=self.use_qknorm, use_swiglu=self.use_swiglu, use_rmsnorm=self.use_rmsnorm,
        wo_shift=self.wo_shift, rope_grid=grid if self.use_rope else 0, xavier=True,
        dtype=self.dtype, attention_impl=self.attention_impl)
    z = layers.FinalLayer(d, p * p * self.out_channels, use_rmsnorm=self.use_rmsnorm,
                          dtype=self.dtype, name="final_layer")(z, cond)
    out = layers.unpatchify(z, p, grid, self.out_channels)
    return out[..., :c] if self.learn_sigma else out
