"""Frozen ViT encoders of RAE, channels-last, as the official stage-1 wrappers use them.

Each maps normalised images (B, H, W, 3) to patch tokens (B, N, C) and, like the wrappers, ends in
a final LayerNorm WITHOUT affine (the checkpoint's weight/bias are dropped):
  dinov2_reg  Dinov2WithRegistersModel, drops CLS + register tokens (`Dinov2withNorm`)
  siglip2     SigLIP vision tower (`SiglipModel(...).vision_model`), all tokens (`SigLIP2wNorm`)
  mae         ViTMAEModel with masking disabled (identity order), drops CLS (`MAEwNorm`)
  dinov3      DINOv3ViTModel (RoPE, registers), drops CLS + register tokens (models/dinov3.py)
  toy_vit     a tiny randomly initialised MAE-style ViT for demos/tests (no weights)
Field defaults equal the HF config classes' defaults, so sparse config.json files (e.g. a
SiglipModel's vision_config) build the same model. Position embeddings are interpolated to the
input grid exactly as HF does (DINOv2: antialiased bicubic; SigLIP/MAE: plain bicubic), only when
the grid or aspect differs from the checkpoint's.

Each encoder is one `EncoderSpec` in `ENCODERS` (module, names, how HF checkpoints are recognised
and named, diffusers' type); README "Extending" lists the files a new one touches.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from rae_jax.models import resize as rs
from rae_jax.models.dinov3 import Dinov3Encoder
from rae_jax.models.vit_blocks import ViTBlock, layer_norm

Dtype = Any


def _patchify(x: jnp.ndarray, hidden: int, patch: int, dtype) -> jnp.ndarray:
  y = nn.Conv(hidden, (patch, patch), strides=(patch, patch), padding="VALID", dtype=dtype,
              name="patch_embed")(x)
  b, gh, gw, c = y.shape
  return y.reshape(b, gh * gw, c)


def _grid_pos(pos: jnp.ndarray, grid: tuple[int, int], pixels: tuple[int, int], mode: str):
  """(n, C) square position table -> (gh*gw, C) for the input grid, HF's interpolation rule."""
  n, c = pos.shape
  if grid[0] * grid[1] == n and pixels[0] == pixels[1]:
    return pos
  side = math.isqrt(n)
  out = rs.resize(pos.reshape(1, side, side, c), grid, mode)
  return out.reshape(grid[0] * grid[1], c)


def _blocks(x, n_layers, heads, mlp_dim, eps, act, qkv_bias, layerscale, dtype,
            attention_impl="auto"):
  for i in range(n_layers):
    x = ViTBlock(heads, mlp_dim, eps, act, qkv_bias, layerscale, dtype, attention_impl,
                 name=f"blocks_{i}")(x)
  return x


class Dinov2RegEncoder(nn.Module):
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  mlp_ratio: float = 4.0
  patch_size: int = 16
  image_size: int = 224
  num_register_tokens: int = 4
  layer_norm_eps: float = 1e-6
  layerscale_value: float = 1.0
  hidden_act: str = "gelu"
  qkv_bias: bool = True
  use_swiglu_ffn: bool = False
  normalize: bool = True  # Dinov2withNorm(normalize=True): final LayerNorm without affine
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"  # see rae_jax.models.attention

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if self.use_swiglu_ffn:
      raise ValueError("dinov2_reg: use_swiglu_ffn=True (giant checkpoints) is not supported")
    b, h, w, _ = x.shape
    c, p = self.hidden_size, self.patch_size
    n_pos = (self.image_size // p) ** 2
    tokens = _patchify(x, c, p, self.dtype)
    cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, c))
    pos = self.param("position_embeddings", nn.initializers.normal(0.02), (1, n_pos + 1, c))
    reg = self.param("register_tokens", nn.initializers.zeros, (1, self.num_register_tokens, c))
    patch_pos = _grid_pos(pos[0, 1:], (h // p, w // p), (h, w), "bicubic_aa")
    tokens = tokens + patch_pos[None].astype(tokens.dtype)
    first = jnp.broadcast_to((cls + pos[:, :1]).astype(tokens.dtype), (b, 1, c))
    regs = jnp.broadcast_to(reg.astype(tokens.dtype), (b, self.num_register_tokens, c))
    x = jnp.concatenate([first, regs, tokens], axis=1)
    x = _blocks(x, self.num_hidden_layers, self.num_attention_heads, int(c * self.mlp_ratio),
                self.layer_norm_eps, self.hidden_act, self.qkv_bias, self.layerscale_value,
                self.dtype, self.attention_impl)
    x = layer_norm(self.layer_norm_eps, "final_norm", affine=not self.normalize,
                   dtype=self.dtype)(x)
    return x[:, 1 + self.num_register_tokens:]


class SiglipEncoder(nn.Module):
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  patch_size: int = 16
  image_size: int = 224
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"  # see rae_jax.models.attention

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    _, h, w, _ = x.shape
    c, p = self.hidden_size, self.patch_size
    n_pos = (self.image_size // p) ** 2
    tokens = _patchify(x, c, p, self.dtype)
    pos = self.param("position_embedding", nn.initializers.normal(1.0), (n_pos, c))
    tokens = tokens + _grid_pos(pos, (h // p, w // p), (h, w), "bicubic")[None].astype(tokens.dtype)
    x = _blocks(tokens, self.num_hidden_layers, self.num_attention_heads, self.intermediate_size,
                self.layer_norm_eps, self.hidden_act, True, None, self.dtype, self.attention_impl)
    return layer_norm(self.layer_norm_eps, "final_norm", affine=False, dtype=self.dtype)(x)


class MAEEncoder(nn.Module):
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  patch_size: int = 16
  image_size: int = 224
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"  # see rae_jax.models.attention

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, h, w, _ = x.shape
    c, p = self.hidden_size, self.patch_size
    n_pos = (self.image_size // p) ** 2
    tokens = _patchify(x, c, p, self.dtype)
    cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, c))
    pos = self.param("position_embeddings", nn.initializers.normal(0.02), (1, n_pos + 1, c))
    tokens = tokens + _grid_pos(pos[0, 1:], (h // p, w // p), (h, w), "bicubic")[None].astype(
        tokens.dtype)
    # mask_ratio 0 with noise = arange: random_masking keeps every token in its original order.
    first = jnp.broadcast_to((cls + pos[:, :1]).astype(tokens.dtype), (b, 1, c))
    x = jnp.concatenate([first, tokens], axis=1)
    x = _blocks(x, self.num_hidden_layers, self.num_attention_heads, self.intermediate_size,
                self.layer_norm_eps, self.hidden_act, self.qkv_bias, None, self.dtype,
                self.attention_impl)
    x = layer_norm(self.layer_norm_eps, "final_norm", affine=False, dtype=self.dtype)(x)
    return x[:, 1:]


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """One frozen encoder family: everything the library needs to build, load and export it.

  module: the Flax module (fields default to the HF config class's defaults).
  aliases: other names config.encoder.name accepts (the official wrapper class names, ...).
  hf_model_types: config.json `model_type` values that load as this encoder.
  probe_key: a key every HF checkpoint of the family has (finds a wrapper prefix such as
    `vision_model.`).
  name_table: the HF name table (`interop/hf_encoders.NAME_TABLES` key) for import / export.
  diffusers_type: diffusers AutoencoderRAE's `encoder_type`, None where diffusers has none.
  random_init: no weights: randomly initialised from config.seed, sized by config.encoder's
    fields on top of `defaults` (the demo's toy encoder).
  """
  module: type
  aliases: tuple[str, ...] = ()
  hf_model_types: tuple[str, ...] = ()
  probe_key: str = ""
  name_table: str = ""
  diffusers_type: Optional[str] = None
  random_init: bool = False
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_VIT_PROBE = "embeddings.patch_embeddings.projection.weight"
ENCODERS = {
    "dinov2_reg": EncoderSpec(
        Dinov2RegEncoder, aliases=("Dinov2withNorm", "dinov2", "dinov2_with_registers"),
        hf_model_types=("dinov2_with_registers",), probe_key=_VIT_PROBE, name_table="dinov2_reg",
        diffusers_type="dinov2"),
    "siglip2": EncoderSpec(
        SiglipEncoder, aliases=("SigLIP2wNorm", "siglip"),
        hf_model_types=("siglip", "siglip_vision_model"),
        probe_key="embeddings.patch_embedding.weight", name_table="siglip2",
        diffusers_type="siglip2"),
    "mae": EncoderSpec(
        MAEEncoder, aliases=("MAEwNorm", "vit_mae"), hf_model_types=("vit_mae",),
        probe_key=_VIT_PROBE, name_table="mae", diffusers_type="mae"),
    "dinov3": EncoderSpec(
        Dinov3Encoder, aliases=("dinov3_vit",), hf_model_types=("dinov3_vit",),
        probe_key="embeddings.patch_embeddings.weight", name_table="dinov3"),
    # A demo-sized random encoder: 64x64 input, 8x8 grid of 64-d tokens (MAE layout).
    "toy_vit": EncoderSpec(
        MAEEncoder, probe_key=_VIT_PROBE, name_table="mae", random_init=True,
        defaults=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, patch_size=8, image_size=64, layer_norm_eps=1e-6)),
}
ALIASES = {alias: name for name, spec in ENCODERS.items() for alias in spec.aliases}
# Image normalisation when no HF preprocessor_config.json exists (toy encoder).
TOY_IMAGE_MEAN = (0.5, 0.5, 0.5)
TOY_IMAGE_STD = (0.5, 0.5, 0.5)


def encoder_spec(name: str) -> EncoderSpec:
  """The record of an encoder name or alias (fails naming the valid ones)."""
  return ENCODERS[canonical_encoder_name(name)]


def canonical_encoder_name(name: str) -> str:
  key = ALIASES.get(name, name)
  if key not in ENCODERS:
    valid = sorted(ENCODERS) + sorted(ALIASES)
    raise ValueError(f"unknown encoder {name!r}; valid names: {valid}")
  return key


def build_encoder(name: str, config: Optional[Mapping[str, Any]] = None, **overrides) -> nn.Module:
  """Encoder module by name; `config` may be a whole HF config dict (unknown keys ignored)."""
  key = canonical_encoder_name(name)
  spec = ENCODERS[key]
  cls = spec.module
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  kwargs = dict(spec.defaults)
  kwargs.update({k: v for k, v in (config or {}).items() if k in fields})
  bad = sorted(set(overrides) - fields)
  if bad:
    raise ValueError(f"encoder {key!r} has no fields {bad}; valid fields: {sorted(fields)}")
  kwargs.update(overrides)
  return cls(**kwargs)
