"""Config -> models and their weights. Each mode finds the previous stage's output in the workdir.

Workdir layout (every mode resumes from it):
  stage1/checkpoints/   orbax: decoder TrainState (params, EMA, optimizer, data state)
  stats/stat.npz        latent mean/var, official (C,h,w) layout (torch-free twin of stat.pt)
  stage2/checkpoints/   orbax: DiTDH/LightningDiT TrainState
  guide/checkpoints/    orbax: autoguidance guide model (import_torch or a copied run)
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import logging

from rae_jax import storage
from rae_jax.config_checks import COMPUTE_DTYPES
from rae_jax.interop.rae_loader import load_rae
from rae_jax.models.layers import to_layout
from rae_jax.models.ditdh import DiTDH
from rae_jax.models.lightning_dit import LightningDiT
from rae_jax.models.rae import RAE
from rae_jax.models.vit_encoders import ENCODERS, canonical_encoder_name

STAGE1_DIR = "stage1"
STAGE2_DIR = "stage2"
GUIDE_DIR = "guide"
STATS_FILE = os.path.join("stats", "stat.npz")

_MODEL_CLASSES = {"DiTDH": DiTDH, "DiTwDDTHead": DiTDH, "LightningDiT": LightningDiT}


def compute_dtype(config: mlc.ConfigDict):
  """Matmul/conv/attention dtype; params, optimizer state, EMA and losses stay float32.

  'auto' (the large recipes): bfloat16 on GPU/TPU, float32 on CPU (where bf16 is emulated).
  """
  name = config.compute_dtype
  if name == "auto":
    name = "bfloat16" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "float32"
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"config.compute_dtype={config.compute_dtype!r}; valid: {list(COMPUTE_DTYPES)}")
  return getattr(jnp, name)  # jnp.float32 / jnp.bfloat16


def attention_impl(config: mlc.ConfigDict) -> str:
  """config.model.attention_impl: the kernel of every transformer (encoder, decoder, DiT, disc)."""
  return config.model.get("attention_impl", "auto")


def decoder_config_dict(config: mlc.ConfigDict) -> dict:
  d = config.decoder
  return dict(decoder_hidden_size=d.decoder_hidden_size,
              decoder_num_hidden_layers=d.decoder_num_hidden_layers,
              decoder_num_attention_heads=d.decoder_num_attention_heads,
              decoder_intermediate_size=d.decoder_intermediate_size,
              layer_norm_eps=d.layer_norm_eps, hidden_act="gelu", qkv_bias=True)


def stats_path(config: mlc.ConfigDict, workdir: str) -> Optional[str]:
  """config.stats.path wins (official stat.pt), else what --mode=stats wrote, else none."""
  if config.stats.path:
    return config.stats.path
  ours = os.path.join(workdir, STATS_FILE)
  return ours if storage.exists(ours) else None


def build_rae(config: mlc.ConfigDict, workdir: str, *, with_stats: bool = True,
              decoder_weights: Optional[str] = None) -> tuple[RAE, dict]:
  """RAE description + variables; the decoder is random unless a file is named (see below)."""
  enc = config.encoder
  name = canonical_encoder_name(enc.name)
  overrides = None
  path = enc.path or None
  if ENCODERS[name].random_init:  # sized by config.encoder's fields
    path = None
    overrides = dict(hidden_size=enc.hidden_size, num_hidden_layers=enc.depth,
                     num_attention_heads=enc.num_heads, intermediate_size=4 * enc.hidden_size,
                     patch_size=enc.patch_size, image_size=enc.input_size)
  weights = decoder_weights or (config.decoder.pretrained or None)
  rae, variables = load_rae(
      name, path, decoder_config_dict(config), decoder_weights=weights,
      stats_path=stats_path(config, workdir) if with_stats else None,
      encoder_input_size=enc.input_size, decoder_patch_size=config.decoder.patch_size,
      noise_tau=0.0, eps=config.stats.eps, seed=config.seed, encoder_overrides=overrides,
      dtype=compute_dtype(config))
  if rae.encoder.hidden_size != enc.hidden_size:
    raise ValueError(f"config.encoder.hidden_size={enc.hidden_size} but the loaded encoder "
                     f"{enc.path!r} has width {rae.encoder.hidden_size}")
  if rae.encoder.patch_size != enc.patch_size:
    raise ValueError(f"config.encoder.patch_size={enc.patch_size} but the loaded encoder "
                     f"{enc.path!r} has patch size {rae.encoder.patch_size}")
  impl = attention_impl(config)
  scan = bool(config.decoder.get("scan_layers", False))
  if config.decoder.remat or impl != "auto" or scan:
    rae = RAE(rae.encoder.clone(attention_impl=impl),
              rae.decoder.clone(remat=bool(config.decoder.remat), attention_impl=impl,
                                remat_policy=config.decoder.get("remat_policy",
                                                                "nothing_saveable"),
                                scan_layers=scan),
              rae.encoder_input_size, rae.image_mean, rae.image_std, rae.noise_tau, rae.eps)
  if "decoder" in variables:  # loaded / initialised in the official per-layer layout
    variables["decoder"] = to_layout(variables["decoder"], rae.decoder.layer_layout, scan)
  return rae, variables


def model_kwargs(model_cfg: mlc.ConfigDict) -> dict:
  kw = {k: v for k, v in model_cfg.to_dict().items() if k != "name"}
  for k in ("hidden_size", "depth", "num_heads", "patch_size"):
    if isinstance(kw.get(k), list):
      kw[k] = tuple(kw[k])
  return kw


def build_stage2_model(model_cfg: mlc.ConfigDict, dtype=jnp.float32):
  """DiTDH / LightningDiT from the official constructor arguments."""
  if model_cfg.name not in _MODEL_CLASSES:
    raise ValueError(f"config.model.name={model_cfg.name!r}; valid: {sorted(_MODEL_CLASSES)}")
  cls = _MODEL_CLASSES[model_cfg.name]
  return cls(dtype=dtype, **model_kwargs(model_cfg))


def init_stage2_params(model, latent_shape: tuple, rng: jax.Array) -> Any:
  x = jnp.zeros((1, *latent_shape), jnp.float32)
  return model.init(rng, x, jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.int32))["params"]


def stage2_latent_shape(config: mlc.ConfigDict) -> tuple[int, int, int]:
  g = config.encoder.input_size // config.encoder.patch_size
  return (g, g, config.encoder.hidden_size)


def host_tree(tree: Any) -> Any:
  """Fully-addressable numpy copy (safe for multi-host: gathers shards)."""
  from jax.experimental import multihost_utils
  if jax.process_count() > 1:
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, tree)


def log_params(name: str, params: Any) -> None:
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  logging.info("%s: %.2fM parameters", name, n / 1e6)
