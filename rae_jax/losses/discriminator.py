"""DINO discriminator (official `disc/dinodisc.py` DinoDisc) in flax.

A frozen DINO ViT (bilinear resize to 224, no final norm) gives the last block's tokens plus the
tokens after each key depth; each goes through a small head of circular 1-D convs over the token
axis (spectral norm, per-sample "local batch norm", LeakyReLU 0.2, scaled residual) that emits one
logit per token. Tokens stay channels-last, (B, N, C), so the torch (B, C, N) transpose disappears.

Variables: 'params' = {'dino': frozen ViT, 'head_{i}': trainable heads}; 'spectral' = power-iteration
vectors (see spectral_norm.py). The ViT weights are wrapped in stop_gradient, so gradients reach the
input image but never the frozen weights; still exclude them from the optimizer (`trainable_mask`).
The official BatchNormLocal (virtual_bs=1) normalises each sample with its own statistics and keeps
no running averages, so there is no 'batch_stats' collection.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from rae_jax.losses.spectral_norm import SPECTRAL, SpectralConv1d
from rae_jax.models.attention import dot_product_attention
from rae_jax.models.partitioning import constrain_batch

# Official recipes (`dinodisc.recipes`): keys of FrozenDINONoDrop.
RECIPES = {
    "S_16": dict(depth=12, patch_size=16, embed_dim=384, num_heads=6, mlp_ratio=4.0),
    "S_8": dict(depth=12, patch_size=8, embed_dim=384, num_heads=6, mlp_ratio=4.0),
    "B_16": dict(depth=12, patch_size=16, embed_dim=768, num_heads=12, mlp_ratio=4.0),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=32)
def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) weights of torch bilinear interpolation, align_corners=False, no antialias.

  Source coordinates are computed in float32 as torch's CPU kernel does: at 64 -> 224 their rounding
  moves outputs by ~4e-6 relative, so float64 coordinates would not reach 1e-5 parity downstream.
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  m = np.zeros((out_size, in_size), np.float32)
  for o in range(out_size):
    src = max(scale * (f32(o) + f32(0.5)) - f32(0.5), f32(0.0))  # torch clamps negative coords to 0
    i0 = min(int(src), in_size - 1)
    i1 = i0 + 1 if i0 < in_size - 1 else i0
    lam = min(max(src - f32(i0), f32(0.0)), f32(1.0))
    m[o, i0] += f32(1.0) - lam
    m[o, i1] += lam
  return m


def resize_bilinear_torch(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """torch `F.interpolate(mode='bilinear', align_corners=False)` on NHWC; the same in up- and down-
  sampling (jax.image.resize would antialias when downsampling)."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x
  mh = jnp.asarray(_bilinear_matrix(h, size[0]), x.dtype)
  mw = jnp.asarray(_bilinear_matrix(w, size[1]), x.dtype)
  hp = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=hp)
  return jnp.einsum("pw,bowc->bopc", mw, x, precision=hp)


class Attention(nn.Module):
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: str = "auto"  # see rae_jax.models.attention

  @nn.compact
  def __call__(self, x):
    b, n, c = x.shape
    d = c // self.num_heads
    qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(x).reshape(b, n, 3, self.num_heads, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = dot_product_attention(q, k, v, impl=self.attention_impl)
    return nn.Dense(c, dtype=self.dtype, name="proj")(out.reshape(b, n, c))


class Block(nn.Module):
  num_heads: int
  mlp_ratio: float
  norm_eps: float
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    # LayerNorm statistics stay float32 (flax reduces in float32); only the output is cast.
    ln = functools.partial(nn.LayerNorm, epsilon=self.norm_eps, use_fast_variance=False,
                           dtype=self.dtype)
    x = x + Attention(self.num_heads, self.dtype, self.attention_impl, name="attn")(
        ln(name="norm1")(x))
    h = nn.Dense(round(c * self.mlp_ratio), dtype=self.dtype, name="fc1")(ln(name="norm2")(x))
    return x + nn.Dense(c, dtype=self.dtype, name="fc2")(jax.nn.gelu(h, approximate=True))


class DinoViT(nn.Module):
  """FrozenDINONoDrop: returns [final tokens, tokens after each key depth (ascending)], (B, N, C)."""
  depth: int = 12
  patch_size: int = 8
  embed_dim: int = 384
  num_heads: int = 6
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  key_depths: Sequence[int] = (2, 5, 8, 11)
  img_size: int = 224
  dtype: Any = jnp.float32  # compute dtype of the ViT (matmuls, convs, attention)
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    x = resize_bilinear_torch(x.astype(jnp.float32), (self.img_size, self.img_size))
    # [-1, 1] -> ImageNet-normalised, with the reference's float32 buffers.
    std = np.asarray(IMAGENET_STD, np.float32)
    x = x * (np.float32(0.5) / std) + (np.float32(0.5) - np.asarray(IMAGENET_MEAN, np.float32)) / std
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="patch_embed")(x)
    b = x.shape[0]
    x = x.reshape(b, -1, self.embed_dim)
    n = self.img_size // p
    cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.embed_dim))
    pos = self.param("pos_embed", nn.initializers.zeros, (1, n * n + 1, self.embed_dim))
    x = (jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.embed_dim)), x.astype(jnp.float32)],
                         axis=1) + pos).astype(self.dtype)
    keys = set(self.key_depths)
    acts = []
    for i in range(max(self.depth, 1 + max(keys, default=0))):
      x = Block(self.num_heads, self.mlp_ratio, self.norm_eps, self.dtype, self.attention_impl,
                name=f"blocks_{i}")(x)
      if i in keys:
        acts.append(x[:, 1:])
    return [x[:, 1:]] + acts


class LocalBatchNorm(nn.Module):
  """BatchNormLocal(virtual_bs=1): each sample normalised over its tokens, per channel, in float32."""
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = x.astype(jnp.float32)
    mean = x.mean(axis=1, keepdims=True)
    var = jnp.square(x - mean).mean(axis=1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return x * self.param("scale", nn.initializers.ones, (c,)) + self.param("bias", nn.initializers.zeros, (c,))


class DiscHead(nn.Module):
  """conv1x1-norm-lrelu, then residual conv(ks)-norm-lrelu scaled by 1/sqrt(2), then conv1x1 -> 1 logit."""
  ks: int = 9
  norm_type: str = "bn"
  norm_eps: float = 1e-6
  use_spectral_norm: bool = True

  def _norm(self, name):
    if self.norm_type == "bn":
      return LocalBatchNorm(self.norm_eps, name=name)
    if self.norm_type == "gn":
      return nn.GroupNorm(num_groups=32, epsilon=self.norm_eps, use_fast_variance=False, name=name)
    raise ValueError(f"DiscHead: unknown norm_type {self.norm_type!r} (expected 'bn' or 'gn')")

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    conv = functools.partial(SpectralConv1d, use_spectral_norm=self.use_spectral_norm)
    # Batch-sharded activations: unpinned, the weight-gradient convs all-gather the global batch.
    x = constrain_batch(conv(c, 1, name="conv_in")(constrain_batch(x), train))
    x = constrain_batch(nn.leaky_relu(self._norm("norm_in")(x), 0.2))
    h = constrain_batch(conv(c, self.ks, name="conv_res")(x, train))
    h = nn.leaky_relu(self._norm("norm_res")(h), 0.2)
    x = constrain_batch((h + x) * (1.0 / np.sqrt(2.0)))
    return conv(1, 1, name="conv_out")(x, train)[..., 0]


def _frozen(tree):
  return jax.tree.map(jax.lax.stop_gradient, tree)


class DinoDiscriminator(nn.Module):
  """Official DinoDisc. Input NHWC images in [-1, 1], any size; output logits (B, n_heads * N).

  train=True advances the spectral-norm power iteration (apply with mutable=['spectral']), as the
  torch module does in `.train()`; the official loop uses train=False for the generator loss.
  `features` (frozen ViT) and `classify` (heads) are exposed so that a D step can run the ViT once
  on fakes and reals together (see `classify_pair`).
  """
  recipe: str = "S_8"
  key_depths: Sequence[int] = (2, 5, 8, 11)
  ks: int = 9
  norm_type: str = "bn"
  use_spectral_norm: bool = True
  norm_eps: float = 1e-6
  recipe_overrides: dict | None = None  # e.g. a tiny ViT for tests: dict(depth=4, embed_dim=32, ...)
  dtype: Any = jnp.float32  # the frozen ViT's compute dtype; heads normalise in float32
  attention_impl: str = "auto"

  def vit_config(self) -> dict:
    if self.recipe not in RECIPES:
      raise ValueError(f"DinoDiscriminator: unknown recipe {self.recipe!r}; known {sorted(RECIPES)}")
    over = dict(self.recipe_overrides or {})
    if over.pop("in_chans", 3) != 3:
      raise ValueError("DinoDiscriminator: only RGB input (in_chans=3) is supported")
    over.pop("key_depths", None)  # the discriminator's own key_depths decide
    over.pop("norm_eps", None)
    unknown = sorted(set(over) - set(RECIPES[self.recipe]))
    if unknown:
      raise ValueError(f"DinoDiscriminator: unknown recipe_overrides {unknown}; "
                       f"allowed {sorted(RECIPES[self.recipe])}")
    cfg = dict(RECIPES[self.recipe], **over)
    # As the reference: drop key depths beyond the ViT (its set() also sorts and dedups them).
    cfg["key_depths"] = tuple(sorted({int(d) for d in self.key_depths if d < cfg["depth"]}))
    cfg["norm_eps"] = self.norm_eps
    cfg["dtype"] = self.dtype
    cfg["attention_impl"] = self.attention_impl
    return cfg

  def setup(self):
    cfg = self.vit_config()
    # Freeze by construction: the ViT sees stop_gradient'ed weights (plain module while initialising,
    # since map_variables cannot create the variables it maps).
    vit = DinoViT if self.is_initializing() else nn.map_variables(DinoViT, "params", trans_in_fn=_frozen)
    self.dino = vit(**cfg)
    self.heads = [DiscHead(self.ks, self.norm_type, self.norm_eps, self.use_spectral_norm, name=f"head_{i}")
                  for i in range(len(cfg["key_depths"]) + 1)]

  def features(self, x: jax.Array) -> list[jax.Array]:
    """Frozen-ViT token activations (B, N, C): final block first, then the key depths."""
    return self.dino(x)

  def classify(self, acts: Sequence[jax.Array], train: bool = False) -> jax.Array:
    return jnp.concatenate([head(a, train) for head, a in zip(self.heads, acts)], axis=1)

  def __call__(self, x: jax.Array, train: bool = False, return_activations: bool = False):
    acts = self.features(x)
    logits = self.classify(acts, train)
    return (logits, acts) if return_activations else logits


def trainable_mask(params) -> dict:
  """Bool pytree for optax.masked / multi_transform: True for the heads, False for the frozen ViT."""
  return {k: jax.tree.map(lambda _: k != "dino", v) for k, v in params.items()}


def classify_pair(disc: DinoDiscriminator, variables: dict, fake: jax.Array, real: jax.Array,
                  train: bool = True):
  """D(fake) and D(real) as the reference's two forward calls: in training, two power iterations
  (fake first), threading the spectral vectors. The frozen ViT runs once on both batches (its
  output does not depend on the order). Returns (logits_fake, logits_real, variables)."""
  if fake.shape != real.shape:
    raise ValueError(f"classify_pair: fake {fake.shape} and real {real.shape} must have the same shape")
  b = fake.shape[0]
  acts = disc.apply(variables, jnp.concatenate([fake, real], axis=0), method="features")
  acts_fake, acts_real = [a[:b] for a in acts], [a[b:] for a in acts]
  if not train:
    return (disc.apply(variables, acts_fake, method="classify"),
            disc.apply(variables, acts_real, method="classify"), variables)
  logits_fake, upd = disc.apply(variables, acts_fake, True, method="classify", mutable=[SPECTRAL])
  variables = {**variables, **upd}
  logits_real, upd = disc.apply(variables, acts_real, True, method="classify", mutable=[SPECTRAL])
  return logits_fake, logits_real, {**variables, **upd}
