"""An RAE from files, the way the official wrapper builds one from its YAML params.

HF encoder folder / hub id + decoder config (+ official decoder weights) + latent stats ->
(RAE, variables). It lives in interop, not models, because it reads file formats; the RAE
itself (rae_jax.models.rae) stays pure Flax.
"""
from __future__ import annotations

import contextlib
import json
import pathlib
from typing import Mapping, Optional, Union

import jax
import jax.numpy as jnp

from rae_jax import storage
from rae_jax.interop.decoder_names import load_decoder_params
from rae_jax.interop.hf_encoders import load_hf_encoder
from rae_jax.interop.stats import load_stats
from rae_jax.models.decoder import decoder_from_hf_config
from rae_jax.models.rae import RAE, init_params
from rae_jax.models.vit_encoders import (ENCODERS, TOY_IMAGE_MEAN, TOY_IMAGE_STD, build_encoder,
                                         canonical_encoder_name)


def read_decoder_config(decoder_config: Union[str, pathlib.Path, Mapping]) -> dict:
  """A ViTMAEConfig-style dict, or its config.json (file or folder)."""
  if isinstance(decoder_config, Mapping):
    return dict(decoder_config)
  path = str(decoder_config)
  if storage.isdir(path):
    path = storage.join(path, "config.json")
  if not storage.exists(path):
    raise FileNotFoundError(f"{path}: decoder config not found")
  return json.loads(storage.read_text(path))


def load_rae(encoder_name: str, encoder_path: Optional[str], decoder_config,
             decoder_weights=None, stats_path=None, *, encoder_input_size: Optional[int] = None,
             decoder_patch_size: int = 16, noise_tau: float = 0.0, eps: float = 1e-5,
             seed: int = 0, encoder_overrides: Optional[Mapping] = None,
             dtype=jnp.float32) -> tuple[RAE, dict]:
  """Build an RAE + variables the way the official wrapper does from its YAML params.

  encoder_path: HF hub id or folder (None only for a random_init encoder such as 'toy_vit', from
  `seed`). decoder_config: ViTMAEConfig-style dict, config.json or its folder; hidden_size,
  patch_size and num_patches are overridden from the encoder as the reference does.
  decoder_weights: official model.pt (or .safetensors); None -> random init from `seed`.
  encoder_overrides: encoder module fields (the wrappers' encoder_params, e.g. normalize=False).
  """
  key = canonical_encoder_name(encoder_name)
  k_enc, k_dec = jax.random.split(jax.random.PRNGKey(seed))
  if encoder_path is None:
    if not ENCODERS[key].random_init:
      raise ValueError(f"encoder {encoder_name!r} needs encoder_path (HF hub id or folder)")
    encoder = build_encoder(key, dtype=dtype, **dict(encoder_overrides or {}))
    size = encoder_input_size or encoder.image_size
    enc_params = init_params(encoder, k_enc, (1, size, size, 3))
    mean, std = TOY_IMAGE_MEAN, TOY_IMAGE_STD
  else:
    # gs:// (a folder on the bucket): read through a local temporary copy.
    with (storage.local_dir(encoder_path) if storage.is_remote(encoder_path)
          else contextlib.nullcontext(encoder_path)) as where:
      loaded = load_hf_encoder(where, key, dtype=dtype, **dict(encoder_overrides or {}))
    encoder, enc_params = loaded.module, loaded.params
    mean, std = loaded.image_mean, loaded.image_std
    size = encoder_input_size or loaded.input_size or encoder.image_size
  grid = size // encoder.patch_size
  decoder = decoder_from_hf_config(read_decoder_config(decoder_config),
                                   hidden_size=encoder.hidden_size, patch_size=decoder_patch_size,
                                   num_patches=grid * grid, dtype=dtype)
  rae = RAE(encoder, decoder, size, tuple(mean), tuple(std), noise_tau, eps)
  if decoder_weights is not None:
    with (storage.local_copy(decoder_weights) if storage.is_remote(decoder_weights)
          else contextlib.nullcontext(decoder_weights)) as where:
      dec_params = load_decoder_params(decoder, where)
  else:
    dec_params = rae.init_decoder(k_dec)
  variables = {"encoder": enc_params, "decoder": dec_params}
  if stats_path is not None:
    variables["stats"] = {k: jnp.asarray(v) for k, v in
                          load_stats(stats_path, shape=rae.latent_shape).items()}
  return rae, variables
