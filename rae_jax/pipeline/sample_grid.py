"""--mode=sample: a class-labelled grid (<workdir>/samples.png) and its uint8 images (.npz)."""
from __future__ import annotations

import os

import jax
import ml_collections as mlc
import numpy as np
from absl import logging

from rae_jax import storage

from rae_jax.eval import sample_shards
from rae_jax.pipeline import common, image_generator, images
from rae_jax.pipeline.loaders import load_models
from rae_jax.train import multihost


def requested_labels(config: mlc.ConfigDict) -> np.ndarray:
  """config.sample.classes: '' -> equal share of every class, else e.g. '207,360,387'."""
  n = config.sample.num_images
  if config.sample.classes:
    classes = np.array([int(c) for c in str(config.sample.classes).split(",") if c.strip()])
    bad = classes[(classes < 0) | (classes >= config.model.num_classes)]
    if bad.size:
      raise ValueError(f"config.sample.classes has labels {bad.tolist()} outside "
                       f"[0, {config.model.num_classes})")
    return np.repeat(classes, -(-n // len(classes)))[:n].astype(np.int32)
  return image_generator.class_labels(n, config.model.num_classes, "equal")


def generate_batched(config, generate_fn, params, guide_params, rae_vars, labels, mesh,
                     seed_key) -> np.ndarray:
  """uint8 NHWC images for `labels` (sample i has index i), generated batch-sharded.

  generate_fn is the un-jitted `image_generator.make_generate(...)`; images stay sharded on device
  (eval.generation.ShardedSampler) and only their uint8 form reaches the host.
  """
  sampler = sample_shards.ShardedSampler(generate_fn, mesh, max(config.eval.per_device_batch, 1))
  labels = np.asarray(labels, np.int32)
  return sampler(params, guide_params, rae_vars, labels, np.arange(len(labels), dtype=np.int32),
                 seed_key)


def run_sample(config: mlc.ConfigDict, workdir: str) -> str:
  mesh = common.make_mesh(config)
  model, params, guide_model, guide_params, rae, rae_vars = load_models(
      config, workdir, mesh, "ema" if config.sample.use_ema else "params")
  transport = image_generator.transport_for(config, rae.latent_shape)
  gen = image_generator.make_generate(config, model, rae, transport, guide_model=guide_model)
  labels = requested_labels(config)
  key = jax.random.PRNGKey(config.seed)
  imgs = generate_batched(config, gen, params, guide_params, rae_vars, labels, mesh, key)
  path = os.path.join(workdir, "samples.png")
  if multihost.is_main():
    grid = images.make_grid(imgs, config.sample.grid_cols)
    images.write_png(grid, path, upscale=max(1, 128 // imgs.shape[1]))
    storage.write_file(os.path.join(workdir, "samples.npz"),
                       lambda f: np.savez(f, arr_0=imgs, arr_1=labels))
    logging.info("Wrote %d samples (%s guidance, scale %.2f, %s %d steps) to %s", len(imgs),
                 config.guidance.method, config.guidance.scale, config.sampler.method,
                 config.sampler.num_steps, path)
  return path
