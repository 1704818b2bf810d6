"""DiTDH: the RAE stage-2 velocity model (official `stage2.models.DDT.DiTwDDTHead`).

A wide, shallow "DDT head" on top of a DiT encoder: the encoder turns the noisy latent into
per-token conditions s = silu(t + encoder(x)), and the head denoises x again with adaLN driven
token-wise by s. Field names and defaults are the official constructor kwargs, so an official
YAML `params:` block can be splatted in directly.

Where the reference cannot run (patch_size > 1, use_rope=False, wo_shift=True; see
tests/fixtures/reference/README.md) this implements the evident intent: both embedders patchify
the C-channel latent, no rotary tables, scale-only modulation.
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from rae_jax.models import layers

IntOrPair = Union[int, Sequence[int]]


def _pair(v) -> tuple[int, int]:
  if isinstance(v, (int, float)):
    return int(v), int(v)
  v = tuple(int(i) for i in v)
  if len(v) != 2:
    raise ValueError(f"expected an int or a pair, got {v}")
  return v


class DiTDH(nn.Module):
  """Returns the velocity (B, h, w, C) for latents x (B, h, w, C), times t (B,), labels y (B,)."""
  input_size: int = 1
  patch_size: IntOrPair = 1
  in_channels: int = 768
  hidden_size: Sequence[int] = (1152, 2048)
  depth: Sequence[int] = (28, 2)
  num_heads: IntOrPair = (16, 16)
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  num_classes: int = 1000
  use_qknorm: bool = False
  use_swiglu: bool = True
  use_rope: bool = True
  use_rmsnorm: bool = True
  wo_shift: bool = False
  use_pos_embed: bool = True
  dtype: Any = jnp.float32
  attention_impl: str = "auto"  # xla | cudnn | splash | auto (models/attention.py)
  remat: bool = False
  remat_policy: str = "nothing_saveable"  # layers.REMAT_POLICIES (used when remat)
  scan_layers: bool = False

  def __post_init__(self):
    # YAML/JSON configs give lists; keep the module hashable.
    for f in ("patch_size", "hidden_size", "depth", "num_heads"):
      v = getattr(self, f)
      if isinstance(v, list):
        object.__setattr__(self, f, tuple(v))
    super().__post_init__()

  # Derived geometry (plain methods, usable on an unbound module, e.g. by the name maps).
  @property
  def patches(self) -> tuple[int, int]:
    """(s patch, x patch)."""
    return _pair(self.patch_size)

  @property
  def widths(self) -> tuple[int, int]:
    return _pair(self.hidden_size)

  @property
  def depths(self) -> tuple[int, int]:
    return _pair(self.depth)

  @property
  def heads(self) -> tuple[int, int]:
    return _pair(self.num_heads)

  @property
  def grids(self) -> tuple[int, int]:
    """Token grid side of the encoder (s) and head (x) streams."""
    sp, xp = self.patches
    for p in (sp, xp):
      if self.input_size % p:
        raise ValueError(f"input_size {self.input_size} is not divisible by patch size {p}")
    return self.input_size // sp, self.input_size // xp

  def _block_kwargs(self, width: int, heads: int, grid: int) -> dict:
    return dict(hidden_size=width, num_heads=heads, mlp_ratio=self.mlp_ratio,
                use_qknorm=self.use_qknorm, use_swiglu=self.use_swiglu,
                use_rmsnorm=self.use_rmsnorm, wo_shift=self.wo_shift,
                rope_grid=grid if self.use_rope else 0, xavier=False, dtype=self.dtype,
                attention_impl=self.attention_impl)

  @property
  def layer_layout(self) -> dict:
    enc_d, dec_d = self.depths
    return layers.scan_groups("blocks_", {"enc_blocks": (0, enc_d), "head_blocks": (enc_d, dec_d)})

  @nn.compact
  def __call__(self, x, t, y, *, train: bool = False, force_drop_ids=None):
    b, h, w, c = x.shape
    if (h, w) != (self.input_size, self.input_size) or c != self.in_channels:
      raise ValueError(f"DiTDH expects latents (B, {self.input_size}, {self.input_size}, "
                       f"{self.in_channels}), got {x.shape}")
    (enc_w, dec_w), (enc_d, dec_d), (enc_h, dec_h) = self.widths, self.depths, self.heads
    (s_p, x_p), (s_grid, x_grid) = self.patches, self.grids
    if x_grid % s_grid:
      raise ValueError(f"x patch {x_p} must divide s patch {s_p} (head tokens repeat s tokens)")
    x = x.astype(self.dtype)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))

    t_emb = layers.GaussianFourierEmbedder(enc_w, dtype=self.dtype, name="t_embedder")(t)
    y_emb = layers.LabelEmbedder(self.num_classes, enc_w, self.class_dropout_prob,
                                 dtype=self.dtype, name="y_embedder")(y, train, force_drop_ids)
    t_emb, y_emb = layers.constrain_batch(t_emb), layers.constrain_batch(y_emb)
    cond = nn.silu(t_emb + y_emb)

    # Encoder: s tokens conditioned on (t, y).
    s = layers.PatchEmbed(s_p, enc_w, dtype=self.dtype, name="s_embedder")(x)
    if self.use_pos_embed:
      s = s + jnp.asarray(layers.get_2d_sincos_pos_embed(enc_w, s_grid), self.dtype)
    s = layers.block_stack(s, cond, depth=enc_d, first_index=0, scan=self.scan_layers,
                           remat=self.remat, remat_policy=self.remat_policy,
                           scan_name="enc_blocks",
                           **self._block_kwargs(enc_w, enc_h, s_grid))
    s = nn.silu(t_emb[:, None, :] + s)
    if enc_w != dec_w:
      s = nn.Dense(dec_w, dtype=self.dtype, name="s_projector",
                   **layers.linear_inits(enc_w, xavier=False))(s)

    # Head: x tokens conditioned token-wise on s.
    z = layers.PatchEmbed(x_p, dec_w, dtype=self.dtype, name="x_embedder")(x)
    z = layers.block_stack(z, s, depth=dec_d, first_index=enc_d, scan=self.scan_layers,
                           remat=self.remat, remat_policy=self.remat_policy,
                           scan_name="head_blocks",
                           **self._block_kwargs(dec_w, dec_h, x_grid))
    z = layers.FinalLayer(dec_w, x_p * x_p * c, use_rmsnorm=self.use_rmsnorm, dtype=self.dtype,
                          name="final_layer")(z, s)
    return layers.unpatchify(z, x_p, x_grid, c)
