"""Representation autoencoder (official `stage1.RAE`) as pure functions of a variables pytree.

variables = {'encoder': encoder params, 'decoder': decoder params,
             'stats': {'mean': (h,w,C), 'var': (h,w,C)}}   # 'stats' (or either entry) optional
encode: images (B,H,W,3) in [0,1] -> torch-bicubic resize -> (x-mean)/std -> frozen encoder
        -> [+ tau*U(0,1)*N(0,1) when an rng is given] -> (B,h,w,C) -> (z-mu)/sqrt(var+eps)
decode: latents (B,h,w,C) -> z*sqrt(var+eps)+mu -> ViTDecoder -> unpatchify -> x*std+mean
Building one from HF folders / official files: rae_jax.interop.rae_loader.load_rae.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rae_jax.models.decoder import ViTDecoder
from rae_jax.models.resize import resize_bicubic


@dataclasses.dataclass(frozen=True)
class RAE:
  """Static description (hashable, safe as a jit static arg); weights live in `variables`."""
  encoder: nn.Module
  decoder: ViTDecoder
  encoder_input_size: int
  image_mean: tuple = (0.485, 0.456, 0.406)
  image_std: tuple = (0.229, 0.224, 0.225)
  noise_tau: float = 0.0
  eps: float = 1e-5

  def __post_init__(self):
    if self.encoder_input_size % self.encoder.patch_size:
      raise ValueError(f"encoder_input_size {self.encoder_input_size} is not divisible by the "
                       f"encoder patch size {self.encoder.patch_size}")
    if self.latent_grid**2 != self.decoder.num_patches:
      raise ValueError(f"decoder num_patches {self.decoder.num_patches} != latent grid "
                       f"{self.latent_grid}^2")

  @property
  def latent_grid(self) -> int:
    return self.encoder_input_size // self.encoder.patch_size

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    return (self.latent_grid, self.latent_grid, self.encoder.hidden_size)

  @property
  def image_size(self) -> int:
    return self.decoder.image_size

  def _image_stats(self, dtype):
    mean = jnp.asarray(self.image_mean, dtype)
    std = jnp.asarray(self.image_std, dtype)
    return mean, std

  @staticmethod
  def _latent_stats(variables, dtype):
    stats = variables.get("stats") or {}
    mean, var = stats.get("mean"), stats.get("var")
    mean = 0.0 if mean is None else jnp.asarray(mean, dtype)
    var = 1.0 if var is None else jnp.asarray(var, dtype)
    return bool(stats), mean, var

  def encode_tokens(self, encoder_params, images: jnp.ndarray) -> jnp.ndarray:
    """(B,H,W,3) in [0,1] -> frozen encoder tokens (B,N,C); no noise, no stats."""
    s = self.encoder_input_size
    if images.shape[1:3] != (s, s):
      images = resize_bicubic(images, (s, s))
    mean, std = self._image_stats(images.dtype)
    z = self.encoder.apply({"params": encoder_params}, (images - mean) / std)
    # Latents leave in float32 whatever the compute dtype: tau-noise, stats and the flow-matching
    # target are computed on them.
    return jax.lax.stop_gradient(z.astype(jnp.float32))

  def encode(self, variables: Mapping[str, Any], images: jnp.ndarray, *,
             rng: Optional[jax.Array] = None, noise_tau: Optional[float] = None,
             noise: Optional[Mapping[str, jax.Array]] = None) -> jnp.ndarray:
    """Images (B,H,W,3) in [0,1] -> latents (B,h,w,C).

    Train-mode tau-noise when `noise` (draws of `draw_latent_noise`) or an `rng` to draw them
    from is given, as the reference: z + tau * U(0,1) * N(0,1), one U per sample, in token layout.
    """
    z = self.encode_tokens(variables["encoder"], images)
    tau = self.noise_tau if noise_tau is None else noise_tau
    if not (isinstance(tau, (int, float)) and tau == 0):  # tau may be traced
      if noise is None and rng is not None:
        noise = draw_latent_noise(rng, z.shape)
      if noise is not None:
        z = add_latent_noise(z, tau, noise)
    b, n, c = z.shape
    side = math.isqrt(n)
    z = z.reshape(b, side, side, c)
    on, mean, var = self._latent_stats(variables, z.dtype)
    if on:
      z = (z - mean) / jnp.sqrt(var + self.eps)
    return z

  def decode(self, variables: Mapping[str, Any], latents: jnp.ndarray) -> jnp.ndarray:
    """Latents (B,h,w,C) -> images (B,H,W,3) (unclipped, in the [0,1] image scale)."""
    on, mean, var = self._latent_stats(variables, latents.dtype)
    z = latents * jnp.sqrt(var + self.eps) + mean if on else latents
    x = self.decoder.apply({"params": variables["decoder"]}, z).astype(jnp.float32)
    mean_px, std_px = self._image_stats(x.dtype)
    return x * std_px + mean_px

  def __call__(self, variables, images, *, rng=None, noise_tau=None):
    return self.decode(variables, self.encode(variables, images, rng=rng, noise_tau=noise_tau))

  def init_decoder(self, rng: jax.Array):
    return init_params(self.decoder, rng, (1, self.decoder.num_patches, self.decoder.hidden_size))


def draw_latent_noise(key: jax.Array, token_shape: tuple) -> dict:
  """{'sigma_u': (B,) U(0,1), 'noise': (B, N, C) N(0,1)}: the tau-noise draws of one batch."""
  k_sigma, k_noise = jax.random.split(key)
  return {"sigma_u": jax.random.uniform(k_sigma, token_shape[:1]),
          "noise": jax.random.normal(k_noise, token_shape)}


def add_latent_noise(tokens: jnp.ndarray, tau, noise: Mapping[str, jax.Array]) -> jnp.ndarray:
  if noise["noise"].shape != tokens.shape or noise["sigma_u"].shape != tokens.shape[:1]:
    raise ValueError(f"tau-noise draws: sigma_u {noise['sigma_u'].shape} / noise "
                     f"{noise['noise'].shape} do not match tokens {tokens.shape}")
  sigma = tau * noise["sigma_u"].astype(tokens.dtype)[:, None, None]
  return tokens + sigma * noise["noise"].astype(tokens.dtype)


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(module: nn.Module, rng: jax.Array, input_shape: tuple) -> Any:
  """Compiled once per (module config, input shape): modules hash by their fields, so every
  build of the same RAE reuses it instead of tracing op by op."""
  return module.init(rng, jnp.zeros(input_shape, jnp.float32))["params"]

