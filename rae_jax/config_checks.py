"""Fail at start, naming the field, instead of an hour into a pod job."""
from __future__ import annotations

import warnings

import ml_collections as mlc

from rae_jax.models.vit_encoders import ALIASES, ENCODERS


class ConfigError(ValueError):
  """A config field is wrong; the message names it."""


class WidthRuleWarning(UserWarning):
  """The paper's rule: the DiT must be at least as wide as the latent tokens."""


def latent_grid(config: mlc.ConfigDict) -> int:
  return config.encoder.input_size // config.encoder.patch_size


def check(config: mlc.ConfigDict, mode: str, num_devices: int) -> None:
  enc, dec, model = config.encoder, config.decoder, config.model
  if enc.name not in ENCODERS and enc.name not in ALIASES:
    raise ConfigError(f"config.encoder.name={enc.name!r} is unknown; valid: "
                      f"{sorted(ENCODERS) + sorted(ALIASES)}")
  if enc.input_size % enc.patch_size:
    raise ConfigError(f"config.encoder.input_size={enc.input_size} is not divisible by "
                      f"config.encoder.patch_size={enc.patch_size}")
  grid = latent_grid(config)
  size = config.data.image_size
  if size % dec.patch_size:
    raise ConfigError(f"config.data.image_size={size} is not divisible by "
                      f"config.decoder.patch_size={dec.patch_size}")
  if size != grid * dec.patch_size:
    raise ConfigError(f"config.data.image_size={size} != latent grid {grid} x config.decoder.patch_size="
                      f"{dec.patch_size}: the decoder would not reproduce the input size")

  stage2_modes = {"train_stage2", "sample", "eval", "all", "cache_latents", "import_torch",
                  "export_torch"}
  if mode in stage2_modes:
    if model.in_channels != enc.hidden_size:
      raise ConfigError(f"config.model.in_channels={model.in_channels} disagrees with the encoder's "
                        f"token width config.encoder.hidden_size={enc.hidden_size}")
    if model.input_size != grid:
      raise ConfigError(f"config.model.input_size={model.input_size} disagrees with the latent grid "
                        f"{grid} (= config.encoder.input_size / config.encoder.patch_size)")
    expected_shift = grid * grid * enc.hidden_size
    if config.transport.shift_dim != expected_shift:
      raise ConfigError(f"config.transport.shift_dim={config.transport.shift_dim} != C*h*w of the "
                        f"latent ({expected_shift})")
    # DiTDH satisfies the rule through its wide DDT head (DiTDH-S: 384-wide trunk, 2048 head).
    hidden = model.hidden_size
    width = max(hidden) if isinstance(hidden, (tuple, list)) else hidden
    if width < enc.hidden_size:
      warnings.warn(
          f"\n{'!' * 78}\nconfig.model.hidden_size={hidden} (widest {width}) is NARROWER than the latent token width "
          f"{enc.hidden_size}.\nRAE (sec. 4.1) shows diffusion then fails to fit the latents: make the "
          f"DiT at least as wide.\n{'!' * 78}", WidthRuleWarning, stacklevel=2)

  data_shards = num_devices
  batches = []
  if mode in ("train_stage1", "all"):
    batches.append(("config.stage1.global_batch_size", config.stage1.global_batch_size))
  if mode in ("train_stage2", "all"):
    batches.append(("config.stage2.global_batch_size", config.stage2.global_batch_size))
  for name, value in batches:
    if value % data_shards:
      raise ConfigError(f"{name}={value} is not divisible by the number of data shards "
                        f"({data_shards} devices)")
  if config.stage2.grad_accum_steps < 1 or (
      config.stage2.global_batch_size % (config.stage2.grad_accum_steps * data_shards)):
    raise ConfigError(f"config.stage2.grad_accum_steps={config.stage2.grad_accum_steps} must divide "
                      f"config.stage2.global_batch_size / devices")
  if config.guidance.method not in ("cfg", "autoguidance"):
    raise ConfigError(f"config.guidance.method={config.guidance.method!r}: use 'cfg' or 'autoguidance'")
  if config.eval.label_sampling not in ("equal", "random"):
    raise ConfigError(f"config.eval.label_sampling={config.eval.label_sampling!r}: 'equal' or 'random'")
