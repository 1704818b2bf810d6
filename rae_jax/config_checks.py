"""Fail at start, naming the field, instead of an hour into a pod job."""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Optional

import ml_collections as mlc

from rae_jax.data.sources import SOURCES as DATA_SOURCES
from rae_jax.models.vit_encoders import ALIASES, ENCODERS, encoder_spec


class ConfigError(ValueError):
  """A config field is wrong; the message names it."""


class WidthRuleWarning(UserWarning):
  """The paper's rule: the DiT must be at least as wide as the latent tokens."""


class IgnoredFieldWarning(UserWarning):
  """A field is set but the recipe does not use it."""


COMPUTE_DTYPES = ("float32", "bfloat16", "auto")  # builders.compute_dtype; auto: bf16 off CPU


def latent_grid(config: mlc.ConfigDict) -> int:
  return config.encoder.input_size // config.encoder.patch_size


def _positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ConfigError(f"{name}={value!r}: must be a positive integer")


_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_remote(path: str) -> bool:
  return "://" in path


def check_dino_weights(s1: mlc.ConfigDict, required: bool = True) -> None:
  """The DINO discriminator's frozen ViT weights: present (local or gs://) when named, and named
  while the GAN term is on (unless a test asks for random ones). The one check: at start
  (`required=False`: the recipes leave the path to the user) and in stage 1's entry point."""
  disc = s1.disc
  if not disc.enabled or float(s1.loss.disc_weight) <= 0 or disc.get("random_init", False):
    return
  if not disc.dino_ckpt_path and not required:
    return
  if not disc.dino_ckpt_path:
    raise ConfigError(
        "config.stage1.disc.enabled needs the DINO weights: set config.stage1.disc.dino_ckpt_path "
        "to the official 'dino_vit_small_patch8_224.pth' (or config.stage1.disc.random_init=True "
        "for tests)")
  from rae_jax import storage  # pylint: disable=g-import-not-at-top
  if not storage.isfile(disc.dino_ckpt_path):
    raise ConfigError(f"config.stage1.disc.dino_ckpt_path={disc.dino_ckpt_path!r}: file not found")


# Every numeric field where a negative or zero value means nothing (refused here rather than
# accepted or silently replaced): rule -> fields. Tuples (DiTDH's (trunk, head) widths) are checked per entry.
_OPTIMS = ("stage1.optim", "stage1.disc.optim", "stage2.optim")
NUMERIC_RULES = {
    "positive integer": (
        "data.image_size", "data.num_classes", "encoder.hidden_size", "encoder.input_size",
        "encoder.patch_size", "encoder.depth", "encoder.num_heads", "decoder.patch_size",
        "decoder.decoder_hidden_size", "decoder.decoder_num_hidden_layers",
        "decoder.decoder_num_attention_heads", "decoder.decoder_intermediate_size",
        "model.input_size", "model.patch_size", "model.in_channels", "model.hidden_size",
        "model.depth", "model.num_heads", "model.num_classes",
        "guidance.guide_model.input_size", "guidance.guide_model.patch_size",
        "guidance.guide_model.in_channels", "guidance.guide_model.hidden_size",
        "guidance.guide_model.depth", "guidance.guide_model.num_heads",
        "guidance.guide_model.num_classes", "sampler.num_steps", "sample.num_images",
        "sample.grid_cols", "eval.num_samples", "eval.shard_size", "eval.online_num_samples",
        "stage1.disc.ks", "stage1.loss.disc_updates", "stage2.grad_accum_steps",
        "stage1.grad_accum_steps", "mesh.max_fsdp", "profile.num_steps", "transport.shift_dim",
        "transport.shift_base"),
    "integer >= 0": (
        "data.synthetic_size", "data.prefetch", "checkpoint.keep_period",
        "log.sample_every_steps", "eval.online_every_steps", "distributed.num_processes"),
    "number > 0": (
        "model.mlp_ratio", "guidance.guide_model.mlp_ratio", "stats.eps",
        "decoder.layer_norm_eps", "stage1.disc.norm_eps", "sampler.atol", "sampler.rtol") +
        tuple(f"{o}.eps" for o in _OPTIMS),
    "number >= 0": (
        "stage1.noise_tau", "stage1.loss.l1_weight", "stage1.loss.perceptual_weight",
        "stage1.loss.lpips_start", "stage1.loss.disc_weight", "stage1.loss.disc_start",
        "stage1.loss.disc_upd_start", "stage1.loss.max_d_weight", "sampler.diffusion_norm",
        "sampler.last_step_size", "guidance.scale") +
        tuple(f"{o}.{f}" for o in _OPTIMS for f in ("final_lr", "warmup_epochs",
                                                      "decay_end_epoch", "weight_decay",
                                                      "clip_grad")),
    "number in [0, 1]": ("stage1.disc.aug_prob", "stage1.disc.cutout", "guidance.t_min",
                         "guidance.t_max", "model.class_dropout_prob",
                         "guidance.guide_model.class_dropout_prob", "transport.train_eps",
                         "transport.sample_eps"),
}
_RULES = {
    "positive integer": lambda v: isinstance(v, int) and v > 0,
    "integer >= 0": lambda v: isinstance(v, int) and v >= 0,
    "number > 0": lambda v: isinstance(v, (int, float)) and v > 0,
    "number >= 0": lambda v: isinstance(v, (int, float)) and v >= 0,
    "number in [0, 1]": lambda v: isinstance(v, (int, float)) and 0 <= v <= 1,
}
_MISSING = object()


def _field(config: mlc.ConfigDict, name: str) -> Any:
  node = config
  for part in name.split("."):
    if not hasattr(node, "get"):
      return _MISSING
    node = node.get(part, _MISSING)
    if node is _MISSING or node is None:
      return _MISSING
  return node


def _check_numbers(config: mlc.ConfigDict) -> None:
  """Negative or zero where it means nothing fails here, naming the field."""
  for rule, names in NUMERIC_RULES.items():
    ok = _RULES[rule]
    for name in names:
      value = _field(config, name)
      if value is _MISSING:
        continue
      values = value if isinstance(value, (tuple, list)) else (value,)
      if not values or any(isinstance(v, bool) or not ok(v) for v in values):
        article = "an" if rule.startswith("integer") else "a"
        raise ConfigError(f"config.{name}={value!r}: must be {article} {rule}")
  for o in _OPTIMS:
    steps, epochs = _field(config, f"{o}.num_steps"), _field(config, f"{o}.epochs")
    if steps is not _MISSING and (isinstance(steps, bool) or not isinstance(steps, int) or
                                  (steps != -1 and steps <= 0)):
      raise ConfigError(f"config.{o}.num_steps={steps!r}: must be a positive integer, or -1 "
                        f"(the run length is config.{o}.epochs)")
    if steps == -1 and epochs is not _MISSING and not (isinstance(epochs, (int, float))
                                                      and epochs > 0):
      raise ConfigError(f"config.{o}.epochs={epochs!r}: must be > 0 (config.{o}.num_steps=-1 "
                        "takes the run length from it)")
  for name in ("distributed.process_id", "profile.start_step"):
    value = _field(config, name)
    if value is not _MISSING and (not isinstance(value, int) or value < -1):
      raise ConfigError(f"config.{name}={value!r}: must be an integer >= 0, or -1 (off/auto)")
  t_min, t_max = _field(config, "guidance.t_min"), _field(config, "guidance.t_max")
  if t_min is not _MISSING and t_max is not _MISSING and t_min > t_max:
    raise ConfigError(f"config.guidance.t_min={t_min!r} > config.guidance.t_max={t_max!r}")


def _check_basics(config: mlc.ConfigDict, mode: str, num_devices: int) -> None:
  """Fields whose bad values would otherwise escape as KeyError/ZeroDivisionError/IndexError."""
  _check_numbers(config)
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ConfigError(f"config.compute_dtype={config.compute_dtype!r}; valid: {list(COMPUTE_DTYPES)}")
  if config.data.source not in DATA_SOURCES:
    raise ConfigError(f"config.data.source={config.data.source!r}; valid: {list(DATA_SOURCES)}")
  _positive_int("config.eval.per_device_batch", config.eval.per_device_batch)
  _positive_int("config.checkpoint.every_steps", config.checkpoint.every_steps)
  _positive_int("config.checkpoint.keep", config.checkpoint.keep)
  _positive_int("config.log.every_steps", config.log.every_steps)
  if (isinstance(config.data.num_threads, bool) or not isinstance(config.data.num_threads, int)
      or config.data.num_threads < 0):
    raise ConfigError(f"config.data.num_threads={config.data.num_threads!r}: must be an integer "
                      ">= 0 (0: one loader thread per usable core)")
  _positive_int("config.stage1.global_batch_size", config.stage1.global_batch_size)
  _positive_int("config.stage2.global_batch_size", config.stage2.global_batch_size)
  for name, optim in (("config.stage1.optim", config.stage1.optim),
                      ("config.stage1.disc.optim", config.stage1.disc.optim),
                      ("config.stage2.optim", config.stage2.optim)):
    betas = optim.get("betas", (0.9, 0.999))
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2 or
        not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
      raise ConfigError(f"{name}.betas={betas!r}: must be two numbers in [0, 1), e.g. (0.9, 0.999)")
    if not optim.lr > 0:
      raise ConfigError(f"{name}.lr={optim.lr!r}: must be > 0")
  for name, value in (("config.stage1.ema_decay", config.stage1.ema_decay),
                      ("config.stage2.ema_decay", config.stage2.ema_decay)):
    if not 0 <= value < 1:
      raise ConfigError(f"{name}={value!r}: must be in [0, 1)")
  data, fsdp = config.mesh.data, config.mesh.fsdp
  # Both -1 is automatic (bounded fsdp, the rest on data: train/mesh.py mesh_shape).
  if (data, fsdp) != (-1, -1) and ((data < 1 and data != -1) or (fsdp != -1 and fsdp < 1)):
    raise ConfigError(f"config.mesh.data={data}, config.mesh.fsdp={fsdp}: each must be >= 1 or "
                      "-1 (all remaining devices; both -1: automatic)")
  elif data == -1 and num_devices % fsdp:
    raise ConfigError(f"config.mesh.fsdp={fsdp} does not divide the {num_devices} device(s)")
  elif data != -1 and (num_devices % data or (fsdp != -1 and data * fsdp != num_devices)):
    raise ConfigError(f"config.mesh.data={data} x config.mesh.fsdp={fsdp} does not fit the "
                      f"{num_devices} device(s): data must divide it and data*fsdp equal it "
                      "(fsdp=-1 takes the rest)")
  enc = config.encoder
  if enc.path and not _is_remote(enc.path):
    if (enc.name in ENCODERS or enc.name in ALIASES) and encoder_spec(enc.name).random_init:
      warnings.warn(f"config.encoder.path={enc.path!r} is ignored: the {enc.name} encoder is "
                    "randomly initialised from config.seed", IgnoredFieldWarning, stacklevel=3)
    elif not os.path.exists(enc.path) and not _HF_REPO_ID.match(enc.path):
      raise ConfigError(f"config.encoder.path={enc.path!r}: no such file or directory (a local "
                        "HF checkpoint folder, or a Hugging Face repo id such as "
                        "'facebook/dinov2-with-registers-base')")
  if config.data.source in ("image_folder", "latents") and mode not in ("import_torch",
                                                                        "export_torch",
                                                                        "export_diffusers"):
    if not config.data.path:
      raise ConfigError(f"config.data.path is empty but config.data.source="
                        f"{config.data.source!r} reads from it")
    if not _is_remote(config.data.path) and not os.path.isdir(config.data.path):
      raise ConfigError(f"config.data.path={config.data.path!r}: no such directory")
  if mode in ("train_stage1", "all"):
    check_dino_weights(config.stage1, required=False)
  if config.stats.path and not _is_remote(config.stats.path) and not os.path.exists(
      config.stats.path):
    raise ConfigError(f"config.stats.path={config.stats.path!r}: file not found")


def check(config: mlc.ConfigDict, mode: str, num_devices: int) -> None:
  enc, dec, model = config.encoder, config.decoder, config.model
  _check_basics(config, mode, num_devices)
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
  accum1 = int(config.stage1.get("grad_accum_steps", 1))
  if mode in ("train_stage1", "all") and (
      accum1 < 1 or config.stage1.global_batch_size % (accum1 * data_shards)):
    raise ConfigError(f"config.stage1.grad_accum_steps={accum1} must divide "
                      f"config.stage1.global_batch_size / devices")
  if config.stage2.grad_accum_steps < 1 or (
      config.stage2.global_batch_size % (config.stage2.grad_accum_steps * data_shards)):
    raise ConfigError(f"config.stage2.grad_accum_steps={config.stage2.grad_accum_steps} must divide "
                      f"config.stage2.global_batch_size / devices")
  if config.guidance.method not in ("cfg", "autoguidance"):
    raise ConfigError(f"config.guidance.method={config.guidance.method!r}: use 'cfg' or 'autoguidance'")
  if config.eval.label_sampling not in ("equal", "random"):
    raise ConfigError(f"config.eval.label_sampling={config.eval.label_sampling!r}: 'equal' or 'random'")


# --- config drift on resume ------------------------------------------------------------------

# Sections/fields that cannot change a training run's math: changing them on resume is free.
RESUME_EXEMPT = ("log", "eval", "checkpoint", "resume", "distributed", "sample", "sampler",
                 "export", "interop", "mesh", "data.num_threads", "data.prefetch", "data.data_dir",
                 "data.eval_split", "profile", "compilation_cache", "model.attention_impl",
                 # Memory knobs (the recipes pick them per chip): remat never changes the math or
                 # the params. scan_layers does change the param layout, so it is not here.
                 "model.remat", "model.remat_policy", "decoder.remat", "decoder.remat_policy",
                 "stage1.grad_accum_steps", "stage2.grad_accum_steps")
# The length of a run (extending it keeps the LR schedule, which is set in epochs).
RESUME_EXEMPT_SUFFIXES = ("optim.num_steps", "optim.epochs")
# Sections the other stage's training never reads.
RESUME_EXEMPT_BY_STAGE = {"stage1": ("stage2", "model", "transport", "guidance"),
                          "stage2": ("stage1", "guidance")}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
  return {prefix: tree}


def _exempt(field: str, stage: str) -> bool:
  prefixes = RESUME_EXEMPT + RESUME_EXEMPT_BY_STAGE.get(stage, ())
  return (any(field == p or field.startswith(p + ".") for p in prefixes) or
          any(field.endswith(s) for s in RESUME_EXEMPT_SUFFIXES))


def resume_drift(saved: dict, current: dict, stage: str = "") -> list[tuple[str, Any, Any]]:
  """[(field, saved value, current value)] of run-defining fields that differ."""
  norm = json.loads(json.dumps(current, default=str))  # tuples -> lists, as saved
  old, new = _flatten(json.loads(json.dumps(saved, default=str))), _flatten(norm)
  missing = object()
  return [(k, old.get(k, "<unset>"), new.get(k, "<unset>")) for k in sorted(set(old) | set(new))
          if not _exempt(k, stage) and old.get(k, missing) != new.get(k, missing)]


def check_resume(saved: dict, current: dict, stage: str = "", where: str = "the checkpoint",
                 log: Optional[Any] = None) -> list[str]:
  """Refuses to resume with changed run-defining fields unless
  current['resume']['allow_changes'] (comma-separated field names, 'config.' optional) lists
  them; logs the allowed ones. Returns the changed field names."""
  import logging  # pylint: disable=g-import-not-at-top
  log = log or logging.getLogger(__name__)
  changes = resume_drift(saved, current, stage)
  allow_text = str((current.get("resume") or {}).get("allow_changes", "") or "")
  allowed = {a.strip().removeprefix("config.") for a in allow_text.split(",") if a.strip()}
  refused = [c for c in changes if c[0] not in allowed]
  if refused:
    listing = "; ".join(f"config.{k}: {a!r} -> {b!r}" for k, a, b in refused)
    names = ",".join(k for k, _, _ in refused)
    raise ConfigError(f"resuming from {where} with a changed config: {listing}. Revert them, use a "
                      f"new workdir, or accept with --config.resume.allow_changes={names}")
  for k, a, b in changes:
    log.warning("Resuming from %s with config.%s changed: %r -> %r (allowed)", where, k, a, b)
  return [k for k, _, _ in changes]
