"""Models and weights the modes load: the workdir's trained RAE / stage-2 models (train_stage2,
sample, eval) and the FID Inception scorer.

One module below stage2 / sample / evaluate, so none of those imports another for its loaders.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections as mlc
from absl import logging

from rae_jax.eval import scoring
from rae_jax.interop import inception_weights
from rae_jax.models.layers import to_layout
from rae_jax.pipeline import builders, common, snapshots


def load_inference_rae(config: mlc.ConfigDict, workdir: str, mesh) -> tuple[Any, dict]:
  """RAE with the decoder this workdir trained (stage-1 EMA) or imported, else config's file."""
  rae, variables = builders.build_rae(config, workdir)
  try:
    dec, desc = snapshots.load_params(workdir, builders.STAGE1_DIR, mesh, "ema")
    # Written with either decoder.scan_layers: brought to this config's layout.
    variables["decoder"] = to_layout(dec, rae.decoder.layer_layout, rae.decoder.scan_layers)
    logging.info("decoder weights: %s", desc)
  except FileNotFoundError:
    if not config.decoder.pretrained:
      logging.warning("No trained decoder in %s and config.decoder.pretrained is empty: images "
                      "are decoded by a RANDOM decoder.", workdir)
  if "stats" not in variables:
    logging.warning("No latent stats (config.stats.path or --mode=stats): latents are used "
                    "un-normalised.")
  # Encoder and decoder FSDP-sharded (only hooks and the uncached encode use them); the small
  # latent stats replicated.
  return rae, {k: (common.replicated(mesh, v) if k == "stats" else common.fsdp_placed(mesh, v))
               for k, v in variables.items()}


def load_models(config: mlc.ConfigDict, workdir: str, mesh, which: str = "ema"):
  """(model, params, guide_model, guide_params, rae, rae_vars) for sampling and eval."""
  dtype = builders.compute_dtype(config)
  rae, rae_vars = load_inference_rae(config, workdir, mesh)
  model = builders.build_stage2_model(config.model, dtype)
  params, desc = snapshots.load_params(workdir, builders.STAGE2_DIR, mesh, which)
  params = to_layout(params, model.layer_layout, model.scan_layers)  # either scan_layers
  logging.info("stage-2 weights: %s", desc)
  g = config.guidance
  guide_model = guide_params = None
  if g.method == "autoguidance" and float(g.scale) != 1.0:
    guide_model = builders.build_stage2_model(g.guide_model, dtype)
    params_g, desc = snapshots.load_params(workdir, builders.GUIDE_DIR, mesh, which)
    guide_params = to_layout(params_g, guide_model.layer_layout, guide_model.scan_layers)
    logging.info("autoguidance guide weights: %s (scale %.3f)", desc, g.scale)
  return model, params, guide_model, guide_params, rae, rae_vars


def load_scorer(mesh, weights_path: str, per_device_batch: int) -> scoring.Scorer:
  """FID Inception from the official pt_inception .pth, or (path '' / missing) random weights
  that every score carries a RANDOM label for."""
  params, is_random = inception_weights.load_fid_inception_or_random(
      weights_path or None, jax.random.PRNGKey(scoring.RANDOM_INCEPTION_SEED))
  if not is_random:
    logging.info("FID Inception weights: %s", weights_path)
  return scoring.Scorer.create(mesh, params, is_random, per_device_batch)


def scorer_from_config(config: mlc.ConfigDict, mesh) -> scoring.Scorer:
  return load_scorer(mesh, config.eval.inception_weights, config.eval.per_device_batch)
