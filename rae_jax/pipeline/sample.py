"""--mode=sample: a class-labelled grid (<workdir>/samples.png) and its uint8 images (.npz)."""
from __future__ import annotations

import os

import jax
import ml_collections as mlc
import numpy as np
from absl import logging

from rae_jax.pipeline import builders, common, generate, images
from rae_jax.pipeline.loaders import load_models
from rae_jax.train import mesh as mesh_lib


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
  return generate.class_labels(n, config.model.num_classes, "equal")


def generate_batched(config, generate_fn, params, guide_params, rae_vars, labels, mesh,
                     seed_key) -> np.ndarray:
  """Runs generate over padded, batch-sharded chunks; returns uint8 NHWC (len(labels) images)."""
  shards = mesh_lib.num_batch_shards(mesh)
  per_call = max(config.eval.per_device_batch, 1) * shards
  out = []
  for start in range(0, len(labels), per_call):
    idx = np.arange(start, start + per_call)
    lab = labels[np.minimum(idx, len(labels) - 1)]
    rows = mesh_lib.process_batch_slice(mesh, per_call)
    g = mesh_lib.global_batch(mesh, {"y": lab[rows], "i": idx[rows].astype(np.int32)}, per_call)
    imgs = generate_fn(params, guide_params, rae_vars, g["y"], g["i"], seed_key)
    imgs = builders.host_tree(imgs) if jax.process_count() > 1 else np.asarray(imgs)
    out.append(images.to_uint8(imgs))
  return np.concatenate(out)[:len(labels)]


def run_sample(config: mlc.ConfigDict, workdir: str) -> str:
  mesh = common.make_mesh(config)
  model, params, guide_model, guide_params, rae, rae_vars = load_models(
      config, workdir, mesh, "ema" if config.sample.use_ema else "params")
  transport = generate.transport_for(config, rae.latent_shape)
  gen = jax.jit(generate.make_generate(config, model, rae, transport, guide_model=guide_model))
  labels = requested_labels(config)
  key = jax.random.PRNGKey(config.seed)
  imgs = generate_batched(config, gen, params, guide_params, rae_vars, labels, mesh, key)
  path = os.path.join(workdir, "samples.png")
  if common.is_main():
    grid = images.make_grid(imgs, config.sample.grid_cols)
    images.write_png(grid, path, upscale=max(1, 128 // imgs.shape[1]))
    tmp = os.path.join(workdir, "samples.tmp.npz")
    np.savez(tmp, arr_0=imgs, arr_1=labels)
    os.replace(tmp, os.path.join(workdir, "samples.npz"))
    logging.info("Wrote %d samples (%s guidance, scale %.2f, %s %d steps) to %s", len(imgs),
                 config.guidance.method, config.guidance.scale, config.sampler.method,
                 config.sampler.num_steps, path)
  return path
