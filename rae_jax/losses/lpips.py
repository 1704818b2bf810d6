"""LPIPS (VGG16 variant, as the official `disc/lpips.py`) in flax, NHWC images in [-1, 1].

The network is frozen: pass its params as constants (close over them) so only the input image gets
gradients. Dropout in the lin layers is inactive in the reference (`.eval()`), so it is omitted.
Weights: `rae_jax.interop.lpips_weights` (torchvision vgg16 + LPIPS `vgg.pth`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

# torchvision vgg16 `features` up to relu5_3: conv layer indices, 'M' = 2x2 max pool.
VGG16_LAYERS = ((0, 64), (2, 64), "M", (5, 128), (7, 128), "M", (10, 256), (12, 256), (14, 256), "M",
                (17, 512), (19, 512), (21, 512), "M", (24, 512), (26, 512), (28, 512))
# Indices whose ReLU output LPIPS taps: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAPS = (2, 7, 14, 21, 28)
CHANNELS = (64, 128, 256, 512, 512)
SHIFT = np.array([-.030, -.088, -.188], np.float32)
SCALE = np.array([.458, .448, .450], np.float32)


class VGG16Features(nn.Module):
  """The five ReLU feature maps LPIPS compares. Conv names follow torchvision: features_{index}."""

  @nn.compact
  def __call__(self, x):
    feats = []
    for layer in VGG16_LAYERS:
      if layer == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        continue
      idx, ch = layer
      x = jax.nn.relu(nn.Conv(ch, (3, 3), padding=((1, 1), (1, 1)), name=f"features_{idx}")(x))
      if idx in TAPS:
        feats.append(x)
    return feats


def _unit_channels(x, eps: float = 1e-10):
  return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
  """Perceptual distance; __call__(input, target, reduction) with reduction 'none' -> (B,), 'mean', 'sum'."""

  @nn.compact
  def __call__(self, input: jax.Array, target: jax.Array, reduction: str = "mean") -> jax.Array:
    if input.shape != target.shape:
      raise ValueError(f"LPIPS: input {input.shape} and target {target.shape} differ")
    if reduction not in ("none", "mean", "sum"):
      raise ValueError(f"LPIPS: unsupported reduction {reduction!r}")
    b = input.shape[0]
    x = jnp.concatenate([input, target], axis=0).astype(jnp.float32)
    x = (x - SHIFT) / SCALE
    feats = VGG16Features(name="vgg")(x)
    value = jnp.zeros((b,), jnp.float32)
    for k, (f, ch) in enumerate(zip(feats, CHANNELS)):
      diff = jnp.square(_unit_channels(f[:b]) - _unit_channels(f[b:]))
      w = self.param(f"lin_{k}", nn.initializers.zeros, (ch,))
      value = value + jnp.mean(diff @ w, axis=(1, 2))
    if reduction == "none":
      return value
    return jnp.mean(value) if reduction == "mean" else jnp.sum(value)
