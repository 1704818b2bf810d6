"""Class-conditional generation: per-index noise -> sampler (+ guidance) -> RAE decode -> [0,1].

Noise and SDE keys are derived from each sample's global index, so a sample is the same image
whether it was drawn on 1 device or 256, in one call or after a resume.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from rae_jax.diffusion import samplers
from rae_jax.diffusion.transport import Transport, transport_from_config


def transport_for(config: mlc.ConfigDict, latent_shape) -> Transport:
  t = config.transport
  return transport_from_config(dict(
      path_type=t.path_type, prediction=t.prediction, loss_weight=t.loss_weight or None,
      train_eps=t.train_eps or None, sample_eps=t.sample_eps or None,
      time_dist_type=t.time_dist_type, time_dist_shift_dim=t.shift_dim,
      time_dist_shift_base=t.shift_base), latent_shape)


def sampler_kwargs(config: mlc.ConfigDict) -> dict:
  s = config.sampler
  if s.mode.upper() == "ODE":
    return dict(sampling_method=s.method, num_steps=s.num_steps, atol=s.atol, rtol=s.rtol)
  return dict(sampling_method=s.method, num_steps=s.num_steps, diffusion_form=s.diffusion_form,
              diffusion_norm=s.diffusion_norm, last_step=s.last_step or None,
              last_step_size=s.last_step_size)


def index_noise(seed_key: jax.Array, indices: jax.Array, latent_shape) -> jax.Array:
  """Noise of sample i depends only on (seed, i)."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(seed_key, i), latent_shape))(
      indices)


def make_generate(config: mlc.ConfigDict, model, rae, transport: Transport, *,
                  guide_model=None) -> Callable:
  """generate(params, guide_params, rae_vars, labels, indices, seed_key) -> images in [0,1].

  Pure and jittable; the caller jits with shardings (batch-sharded labels/indices).
  """
  latent_shape = rae.latent_shape
  g = config.guidance
  method = g.method if float(g.scale) != 1.0 else None
  null_class = config.model.num_classes
  mode = config.sampler.mode
  kwargs = sampler_kwargs(config)

  def apply_fn(params, x, t, y):
    return model.apply({"params": params}, x, t, y)

  guide_apply = None
  if guide_model is not None:
    guide_apply = lambda p, x, t, y: guide_model.apply({"params": p}, x, t, y)  # noqa: E731

  def generate(params, guide_params, rae_vars, labels, indices, seed_key):
    noise = index_noise(seed_key, indices, latent_shape)
    model_fn = samplers.make_model_fn(
        apply_fn, params, labels, guidance=method, scale=float(g.scale),
        interval=(g.t_min, g.t_max), null_class=null_class, guide_apply_fn=guide_apply,
        guide_params=guide_params)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(seed_key, 1 << 30), i))(
        indices)  # SDE only (unused, so not computed, for ODE)
    latents = samplers.sample(transport, model_fn, noise, mode=mode, key=keys, **kwargs)
    images = rae.decode(rae_vars, latents)
    return jnp.clip(images, 0.0, 1.0)

  return generate


def class_labels(num_images: int, num_classes: int, mode: str = "equal",
                 key: Optional[jax.Array] = None) -> np.ndarray:
  """'equal': exactly num_images/num_classes per class in class order (official default);
  'random': uniform labels from `key`."""
  if mode == "equal":
    per = -(-num_images // num_classes)
    return np.repeat(np.arange(num_classes), per)[:num_images].astype(np.int32)
  if mode == "random":
    return np.asarray(jax.random.randint(key, (num_images,), 0, num_classes), np.int32)
  raise ValueError(f"label_sampling={mode!r}: use 'equal' or 'random'")

