"""Representation autoencoder (official `stage1.RAE`) as pure functions of a variables pytree.

variables = {'encoder': encoder params, 'decoder': decoder params,
             'stats': {'mean': (h,w,C), 'var': (h,w,C)}}   # 'stats' (or either entry) optional
encode: images (B,H,W,3) in [0,1] -> torch-bicubic resize -> (x-mean)/std -> frozen encoder
        -> [+ tau*U(0,1)*N(0,1) when an rng is given] -> (B,h,w,C) -> (z-mu)/sqrt(var+eps)
decode: latents (B,h,w,C) -> z*sqrt(var+eps)+mu -> ViTDecoder -> unpatchify -> x*std+mean
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from rae_jax.models.decoder import ViTDecoder, decoder_from_hf_config
from rae_jax.models.resize import resize_bicubic
from rae_jax.models.vit_encoders import (TOY_IMAGE_MEAN, TOY_IMAGE_STD, build_encoder,
                                         canonical_encoder_name)


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
    return jax.lax.stop_gradient(z)

  def encode(self, variables: Mapping[str, Any], images: jnp.ndarray, *,
             rng: Optional[jax.Array] = None, noise_tau: Optional[float] = None) -> jnp.ndarray:
    """Images (B,H,W,3) in [0,1] -> latents (B,h,w,C). Noise only when `rng` is given."""
    z = self.encode_tokens(variables["encoder"], images)
    tau = self.noise_tau if noise_tau is None else noise_tau
    if rng is not None and not (isinstance(tau, (int, float)) and tau == 0):  # tau may be traced
      k_sigma, k_noise = jax.random.split(rng)
      sigma = tau * jax.random.uniform(k_sigma, (z.shape[0], 1, 1), z.dtype)
      z = z + sigma * jax.random.normal(k_noise, z.shape, z.dtype)
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
    x = self.decoder.apply({"params": variables["decoder"]}, z)
    mean_px, std_px = self._image_stats(x.dtype)
    return x * std_px + mean_px

  def __call__(self, variables, images, *, rng=None, noise_tau=None):
    return self.decode(variables, self.encode(variables, images, rng=rng, noise_tau=noise_tau))

  def init_decoder(self, rng: jax.Array):
    return init_params(self.decoder, rng, (1, self.decoder.num_patches, self.decoder.hidden_size))


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(module: nn.Module, rng: jax.Array, input_shape: tuple) -> Any:
  """Compiled once per (module config, input shape): modules hash by their fields, so every
  build of the same RAE reuses it instead of tracing op by op."""
  return module.init(rng, jnp.zeros(input_shape, jnp.float32))["params"]


def _read_decoder_config(decoder_config: Union[str, pathlib.Path, Mapping]) -> dict:
  if isinstance(decoder_config, Mapping):
    return dict(decoder_config)
  path = pathlib.Path(decoder_config)
  if path.is_dir():
    path = path / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path}: decoder config not found")
  return json.loads(path.read_text())


def load_rae(encoder_name: str, encoder_path: Optional[str], decoder_config,
             decoder_weights=None, stats_path=None, *, encoder_input_size: Optional[int] = None,
             decoder_patch_size: int = 16, noise_tau: float = 0.0, eps: float = 1e-5,
             seed: int = 0, encoder_overrides: Optional[Mapping] = None,
             dtype=jnp.float32) -> tuple[RAE, dict]:
  """Build an RAE + variables the way the official wrapper does from its YAML params.

  encoder_path: HF hub id or folder (None only for 'toy_vit', which is randomly initialised from
  `seed`). decoder_config: ViTMAEConfig-style dict, config.json or its folder; hidden_size,
  patch_size and num_patches are overridden from the encoder as the reference does.
  decoder_weights: official model.pt (or .safetensors); None -> random init from `seed`.
  encoder_overrides: encoder module fields (the wrappers' encoder_params, e.g. normalize=False).
  """
  from rae_jax.interop.decoder_names import load_decoder_params
  from rae_jax.interop.hf_encoders import load_hf_encoder
  from rae_jax.interop.stats import load_stats

  key = canonical_encoder_name(encoder_name)
  k_enc, k_dec = jax.random.split(jax.random.PRNGKey(seed))
  if encoder_path is None:
    if key != "toy_vit":
      raise ValueError(f"encoder {encoder_name!r} needs encoder_path (HF hub id or folder)")
    encoder = build_encoder(key, dtype=dtype, **dict(encoder_overrides or {}))
    size = encoder_input_size or encoder.image_size
    enc_params = init_params(encoder, k_enc, (1, size, size, 3))
    mean, std = TOY_IMAGE_MEAN, TOY_IMAGE_STD
  else:
    loaded = load_hf_encoder(encoder_path, key, dtype=dtype, **dict(encoder_overrides or {}))
    encoder, enc_params = loaded.module, loaded.params
    mean, std = loaded.image_mean, loaded.image_std
    size = encoder_input_size or loaded.input_size or encoder.image_size
  grid = size // encoder.patch_size
  decoder = decoder_from_hf_config(_read_decoder_config(decoder_config),
                                   hidden_size=encoder.hidden_size, patch_size=decoder_patch_size,
                                   num_patches=grid * grid, dtype=dtype)
  rae = RAE(encoder, decoder, size, tuple(mean), tuple(std), noise_tau, eps)
  if decoder_weights is not None:
    dec_params = load_decoder_params(decoder, decoder_weights)
  else:
    dec_params = rae.init_decoder(k_dec)
  variables = {"encoder": enc_params, "decoder": dec_params}
  if stats_path is not None:
    variables["stats"] = {k: jnp.asarray(v) for k, v in
                          load_stats(stats_path, shape=rae.latent_shape).items()}
  return rae, variables
