"""Stage-2 transformer building blocks shared by DiTDH and LightningDiT: initialisers, sin-cos
position tables, 2-D axial RoPE (EVA's interleaved-pairs convention, `rope_tables` / `apply_rope`;
the DINOv3 encoder's split-halves RoPE is its own, in models/dinov3.py), norms, MLPs, attention,
embedders, the DiT block, remat policies and the scanned / unrolled parameter layouts.

Everything here mirrors `stage2/models/model_utils.py` of the official RAE code closely enough
that, with the same weights, outputs match in float32. Tokens are (B, N, D), images/latents
channels-last (B, H, W, C). Parameters are float32; `dtype` is the compute dtype (matmuls, convs,
attention). Norms, softmax statistics, the time embedding and the model output stay float32.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from rae_jax.models.attention import dot_product_attention
from rae_jax.models.partitioning import constrain_batch, replicate

Dtype = Any
Initializer = Callable[..., jax.Array]


# ----------------------------------------------------------------------------------------------
# Initialisers. The reference models use two schemes: DiTDH keeps PyTorch's default nn.Linear
# init (U(+-1/sqrt(fan_in)) for weight and bias), LightningDiT re-inits every Linear with
# xavier-uniform and zero bias. Matching the distributions keeps from-scratch training comparable.


def torch_default_kernel_init() -> Initializer:
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Initializer:
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def linear_inits(fan_in: int, xavier: bool) -> dict[str, Initializer]:
  """kernel_init/bias_init kwargs for nn.Dense under either reference scheme."""
  if xavier:
    return dict(kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros)
  return dict(kernel_init=torch_default_kernel_init(), bias_init=torch_default_bias_init(fan_in))


ZERO_INIT = dict(kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)


# ----------------------------------------------------------------------------------------------
# Fixed tables (numpy, computed once per config at trace time).


def get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
  if embed_dim % 2:
    raise ValueError(f"sin-cos embedding needs an even dim, got {embed_dim}")
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=32)
def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
  """(grid*grid, D) float32: first half encodes the column (w) index, second half the row (h).

  Same layout and float64 arithmetic as MAE/DiT's `get_2d_sincos_pos_embed`, so exported
  `pos_embed` buffers are bit-identical to the official ones.
  """
  if embed_dim % 2:
    raise ValueError(f"2-D sin-cos embedding needs an even dim, got {embed_dim}")
  coords = np.arange(grid_size, dtype=np.float32)
  grid_w, grid_h = np.meshgrid(coords, coords)  # w varies fastest, as in the reference
  emb_w = get_1d_sincos_pos_embed(embed_dim // 2, grid_w)
  emb_h = get_1d_sincos_pos_embed(embed_dim // 2, grid_h)
  out = np.concatenate([emb_w, emb_h], axis=1).astype(np.float32)
  out.flags.writeable = False
  return out


@functools.lru_cache(maxsize=32)
def rope_tables(head_dim: int, grid_size: int, theta: float = 10000.0):
  """2-D axial RoPE tables (cos, sin), each (grid*grid, head_dim) float32.

  EVA's `VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid)`: the first half of a head
  rotates with the row index, the second half with the column index; frequencies are repeated
  pairwise to match the interleaved `rotate_half`. Computed in float32 like the reference.
  """
  dim = head_dim // 2
  idx = np.arange(0, dim, 2)[: dim // 2].astype(np.float32)
  freqs = np.float32(1.0) / (np.float32(theta) ** (idx / np.float32(dim)))
  if 4 * freqs.shape[0] != head_dim:
    raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got head_dim={head_dim}")
  pos = np.arange(grid_size).astype(np.float32) / np.float32(grid_size) * np.float32(grid_size)
  ang = np.repeat(np.einsum("n,f->nf", pos, freqs), 2, axis=-1)  # (grid, dim), pairs repeated
  rows = np.broadcast_to(ang[:, None, :], (grid_size, grid_size, dim))
  cols = np.broadcast_to(ang[None, :, :], (grid_size, grid_size, dim))
  full = np.concatenate([rows, cols], axis=-1).reshape(grid_size * grid_size, 2 * dim)
  cos, sin = np.cos(full).astype(np.float32), np.sin(full).astype(np.float32)
  cos.flags.writeable = False
  sin.flags.writeable = False
  return cos, sin


def rotate_half(x: jax.Array) -> jax.Array:
  """Interleaved pairs (x0, x1) -> (-x1, x0)."""
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x: jax.Array, cos: np.ndarray, sin: np.ndarray) -> jax.Array:
  """x: (B, N, H, Dh); tables (N, Dh)."""
  cos = jnp.asarray(cos)[:, None, :]
  sin = jnp.asarray(sin)[:, None, :]
  return (x * cos + rotate_half(x) * sin).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Norms and feed-forward layers.


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) * weight, in float32."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


def make_norm(use_rmsnorm: bool, name: str, dtype: Dtype) -> nn.Module:
  """The pre-norm of blocks / final layer: RMSNorm(eps 1e-6) or affine-free LayerNorm(eps 1e-6)."""
  if use_rmsnorm:
    return RMSNorm(eps=1e-6, dtype=dtype, name=name)
  return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, use_fast_variance=False,
                      dtype=jnp.float32, name=name)


class SwiGLU(nn.Module):
  """w3(silu(x1) * x2) with [x1, x2] = chunk(w12(x), 2)."""
  hidden_features: int
  out_features: int
  xavier: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x12 = nn.Dense(2 * self.hidden_features, dtype=self.dtype, name="w12",
                   **linear_inits(x.shape[-1], self.xavier))(x)
    x1, x2 = jnp.split(x12, 2, axis=-1)
    return nn.Dense(self.out_features, dtype=self.dtype, name="w3",
                    **linear_inits(self.hidden_features, self.xavier))(nn.silu(x1) * x2)


class Mlp(nn.Module):
  """timm Mlp: fc1 -> GELU(tanh) -> fc2."""
  hidden_features: int
  out_features: int
  xavier: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.hidden_features, dtype=self.dtype, name="fc1",
                 **linear_inits(x.shape[-1], self.xavier))(x)
    h = nn.gelu(h, approximate=True)
    return nn.Dense(self.out_features, dtype=self.dtype, name="fc2",
                    **linear_inits(self.hidden_features, self.xavier))(h)


def swiglu_hidden(hidden_size: int, mlp_ratio: float) -> int:
  """The reference's int(2/3 * int(hidden * ratio)) (e.g. 1152 -> 3072, 2048 -> 5461)."""
  return int(2 / 3 * int(hidden_size * mlp_ratio))


# ----------------------------------------------------------------------------------------------
# Attention.


class Attention(nn.Module):
  """Multi-head self-attention with optional per-head qk-norm and 2-D RoPE (NormAttention)."""
  num_heads: int
  qk_norm: bool = False
  use_rmsnorm: bool = True
  rope_grid: int = 0  # 0 -> no RoPE; otherwise tokens form a rope_grid x rope_grid grid
  xavier: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"  # see rae_jax.models.attention

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"hidden size {d} is not divisible by num_heads {self.num_heads}")
    hd = d // self.num_heads
    qkv = nn.Dense(3 * d, dtype=self.dtype, name="qkv", **linear_inits(d, self.xavier))(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, Dh)
    if self.qk_norm:
      if self.use_rmsnorm:
        q = RMSNorm(dtype=self.dtype, name="q_norm")(q)
        k = RMSNorm(dtype=self.dtype, name="k_norm")(k)
      else:  # nn.LayerNorm defaults in the reference: affine, eps 1e-5
        ln = functools.partial(nn.LayerNorm, epsilon=1e-5, use_fast_variance=False,
                               dtype=self.dtype)
        q, k = ln(name="q_norm")(q), ln(name="k_norm")(k)
    if self.rope_grid:
      cos, sin = rope_tables(hd, self.rope_grid)
      if cos.shape[0] != n:
        raise ValueError(f"RoPE grid {self.rope_grid}^2 does not match {n} tokens")
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = dot_product_attention(q.astype(v.dtype), k, v, impl=self.attention_impl)
    out = out.reshape(b, n, d)
    return nn.Dense(d, dtype=self.dtype, name="proj", **linear_inits(d, self.xavier))(out)


# ----------------------------------------------------------------------------------------------
# Embedders.


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> tokens (B, (H/p)*(W/p), D), row-major like timm."""
  patch_size: int
  embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    fan_in, fan_out = p * p * x.shape[-1], self.embed_dim
    # The reference initialises the conv like a Linear over the flattened patch (xavier).
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    kernel_init = lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound)
    y = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                kernel_init=kernel_init, bias_init=nn.initializers.zeros, name="proj")(x)
    return y.reshape(y.shape[0], -1, y.shape[-1])


def unpatchify(x: jax.Array, patch_size: int, grid: int, channels: int) -> jax.Array:
  """(B, grid*grid, p*p*C) with per-token layout (p, q, C) -> (B, grid*p, grid*p, C)."""
  b, p = x.shape[0], patch_size
  x = x.reshape(b, grid, grid, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid * p, grid * p, channels)


class GaussianFourierEmbedder(nn.Module):
  """t -> MLP([sin(2 pi t W), cos(2 pi t W)]); W is a frozen random buffer (requires_grad=False).

  W lives in `params` so checkpoints carry it; the forward pass stops its gradient, so it stays
  fixed under any gradient-based optimiser without weight decay on it.
  """
  hidden_size: int
  embedding_size: int = 256
  scale: float = 1.0
  xavier: bool = False  # LightningDiT zeroes the MLP biases (its xavier pass), DiTDH does not
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    w = self.param("W", nn.initializers.normal(self.scale), (self.embedding_size,), jnp.float32)
    w = jax.lax.stop_gradient(w)
    ang = t.astype(jnp.float32)[:, None] * w[None, :] * 2 * jnp.pi
    emb = constrain_batch(jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1))
    bias = lambda fan_in: (nn.initializers.zeros if self.xavier else
                           torch_default_bias_init(fan_in))
    # Kept in float32 whatever the compute dtype: t varies smoothly and is tiny to compute.
    emb = nn.Dense(self.hidden_size, dtype=jnp.float32, name="mlp_0",
                   kernel_init=nn.initializers.normal(0.02),
                   bias_init=bias(2 * self.embedding_size))(emb)
    emb = constrain_batch(emb)
    return nn.Dense(self.hidden_size, dtype=jnp.float32, name="mlp_2",
                    kernel_init=nn.initializers.normal(0.02),
                    bias_init=bias(self.hidden_size))(nn.silu(emb))


class LabelEmbedder(nn.Module):
  """Class embedding with a null class (index num_classes) when dropout_prob > 0.

  As in the reference, the table has num_classes + 1 rows only if dropout_prob > 0. Labels are
  replaced by the null class where `force_drop_ids` is true (the reference's token_drop with
  force_drop_ids: training passes the mask from `draw_label_drop`, so the draw is explicit); without
  a mask, train=True draws one from the 'label_dropout' PRNG stream.
  """
  num_classes: int
  hidden_size: int
  dropout_prob: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, labels, train: bool = False, force_drop_ids=None):
    rows = self.num_classes + int(self.dropout_prob > 0)
    table = nn.Embed(rows, self.hidden_size, dtype=self.dtype,
                     embedding_init=nn.initializers.normal(0.02), name="embedding_table")
    if force_drop_ids is None and train and self.dropout_prob > 0:
      force_drop_ids = draw_label_drop(self.make_rng("label_dropout"), labels.shape,
                                       self.dropout_prob)
    if force_drop_ids is not None:
      if self.dropout_prob <= 0:
        raise ValueError("label dropout mask given, but the model has no null class "
                         "(class_dropout_prob=0)")
      labels = jnp.where(jnp.asarray(force_drop_ids, bool), self.num_classes, labels)
    # The (tiny) table is gathered whole, as FSDP gathers every weight, so the lookup stays
    # local to each batch shard instead of gathering the global batch's labels.
    rows_table = replicate(table.embedding).astype(self.dtype)
    return jnp.take(rows_table, constrain_batch(labels), axis=0)


def draw_label_drop(key, shape, prob: float) -> jax.Array:
  """Bool mask, true = label replaced by the null class (the reference's rand(B) < prob)."""
  return jax.random.uniform(key, shape) < prob


# ----------------------------------------------------------------------------------------------
# adaLN-modulated blocks.


def match_tokens(mod: jax.Array, num_tokens: int) -> jax.Array:
  """Per-sample (B, D) or token-wise (B, L, D) conditioning -> broadcastable to (B, N, D).

  Token-wise conditioning with L < N tokens is repeat-interleaved along tokens (DDTModulate).
  """
  if mod.ndim == 2:
    return mod[:, None, :]
  length = mod.shape[1]
  if length == 1 or length == num_tokens:
    return mod
  if num_tokens % length:
    raise ValueError(f"{num_tokens} tokens are not a multiple of {length} conditioning tokens")
  return jnp.repeat(mod, num_tokens // length, axis=1)


def modulate(x: jax.Array, shift: Optional[jax.Array], scale: jax.Array) -> jax.Array:
  """x * (1 + scale) + shift; shift=None is the scale-only (wo_shift) variant."""
  x = x * (1 + scale)
  return x if shift is None else x + shift


class DiTBlock(nn.Module):
  """LightningDiT / LightningDDT block: adaLN-modulated pre-norm attention + MLP with gates.

  `c` is (B, D) (one condition per sample) or (B, L, D) (token-wise, the DDT head).
  With `scanned=True` it returns (x, None) so nn.scan can stack it.
  """
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  use_qknorm: bool = False
  use_swiglu: bool = True
  use_rmsnorm: bool = True
  wo_shift: bool = False
  rope_grid: int = 0
  xavier: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  scanned: bool = False

  @nn.compact
  def __call__(self, x, c):
    d = self.hidden_size
    n_mod = 4 if self.wo_shift else 6
    x, c = constrain_batch(x), constrain_batch(c)
    mod = nn.Dense(n_mod * d, dtype=self.dtype, name="adaLN_modulation", **ZERO_INIT)(nn.silu(c))
    mod = constrain_batch(mod)
    chunks = jnp.split(match_tokens(mod, x.shape[1]), n_mod, axis=-1)
    if self.wo_shift:
      (scale_msa, gate_msa, scale_mlp, gate_mlp), shift_msa, shift_mlp = chunks, None, None
    else:
      shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks

    h = constrain_batch(modulate(make_norm(self.use_rmsnorm, "norm1", self.dtype)(x)
                                 .astype(x.dtype), shift_msa, scale_msa))
    h = Attention(self.num_heads, qk_norm=self.use_qknorm, use_rmsnorm=self.use_rmsnorm,
                  rope_grid=self.rope_grid, xavier=self.xavier, dtype=self.dtype,
                  attention_impl=self.attention_impl, name="attn")(h)
    h = checkpoint_name(h, ATTENTION_OUT)  # kept by remat_policy="save_attention_out"
    x = x + gate_msa * h

    h = constrain_batch(modulate(make_norm(self.use_rmsnorm, "norm2", self.dtype)(x)
                                 .astype(x.dtype), shift_mlp, scale_mlp))
    mlp_hidden = int(d * self.mlp_ratio)
    if self.use_swiglu:
      mlp = SwiGLU(swiglu_hidden(d, self.mlp_ratio), d, xavier=self.xavier, dtype=self.dtype,
                   name="mlp")
    else:
      mlp = Mlp(mlp_hidden, d, xavier=self.xavier, dtype=self.dtype, name="mlp")
    x = constrain_batch(x + gate_mlp * mlp(h))
    return (x, None) if self.scanned else x


class FinalLayer(nn.Module):
  """adaLN (shift, scale; no gate) -> norm -> linear to per-token patch pixels. Zero-init."""
  hidden_size: int
  out_features: int
  use_rmsnorm: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    x, c = constrain_batch(x), constrain_batch(c)
    mod = constrain_batch(nn.Dense(2 * self.hidden_size, dtype=self.dtype,
                                   name="adaLN_modulation", **ZERO_INIT)(nn.silu(c)))
    shift, scale = jnp.split(match_tokens(mod, x.shape[1]), 2, axis=-1)
    x = modulate(make_norm(self.use_rmsnorm, "norm_final", self.dtype)(x).astype(x.dtype),
                 shift, scale)
    out = nn.Dense(self.out_features, dtype=self.dtype, name="linear", **ZERO_INIT)(x)
    return out.astype(jnp.float32)  # the model output (velocity) leaves in float32


# Rematerialisation policies for block stacks (what the backward pass may keep instead of
# recomputing). Memory falls and recompute rises from "dots_saveable" to "nothing_saveable";
# bench/train_step.py prints both per policy. Remat never changes the math.
ATTENTION_OUT = "attention_out"
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
}


def remat_policy(name: str):
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={name!r}; valid: {sorted(REMAT_POLICIES)}")
  return REMAT_POLICIES[name]


def maybe_remat(cls, remat: bool, policy: str, *, scan: bool = False):
  """nn.remat(cls) with the named save policy when `remat`, else cls."""
  if not remat:
    return cls
  return nn.remat(cls, prevent_cse=not scan, policy=remat_policy(policy))


def scan_groups(prefix: str, groups: dict[str, tuple[int, int]]) -> dict:
  """A model's layer layout: per-layer subtrees `{prefix}{i}`, and the scanned stacks that hold
  them when scan_layers=True, {stack name: (first layer index, number of layers)}."""
  return {"prefix": prefix, "groups": dict(groups)}


def to_layout(params: dict, layout: dict, scanned: bool) -> dict:
  """Params of either layer layout -> the scanned or per-layer one (checkpoints written with
  the other scan_layers setting load unchanged; arrays may be sharded, the ops are jnp)."""
  prefix, groups = layout["prefix"], layout["groups"]
  is_scanned = any(name in params for name in groups)
  if is_scanned == scanned:
    return params
  if scanned:
    rest = {k: v for k, v in params.items() if not k.startswith(prefix)}
    for name, (first, n) in groups.items():
      rest[name] = jax.tree.map(lambda *x: jnp.stack(x),
                                *[params[f"{prefix}{first + i}"] for i in range(n)])
    return rest
  rest = {k: v for k, v in params.items() if k not in groups}
  for name, (first, n) in groups.items():
    for i in range(n):
      rest[f"{prefix}{first + i}"] = jax.tree.map(lambda x, i=i: x[i], params[name])
  return rest


def block_stack(x, c, *, depth: int, first_index: int, scan: bool, remat: bool,
                scan_name: str, remat_policy: str = "nothing_saveable", **block_kwargs):
  """Apply `depth` DiTBlocks; must be called inside a parent's compact method.

  Unscanned blocks are named blocks_{first_index + i} (the reference's global block index);
  scanned ones are one module `scan_name` whose params carry a leading layer axis.
  """
  cls = maybe_remat(DiTBlock, remat, remat_policy, scan=scan)
  if scan:
    stack = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=nn.broadcast, length=depth)
    x, _ = stack(**block_kwargs, scanned=True, name=scan_name)(x, c)
    return x
  for i in range(depth):
    x = cls(**block_kwargs, name=f"blocks_{first_index + i}")(x, c)
  return x
