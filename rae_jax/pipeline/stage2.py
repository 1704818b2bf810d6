"""Stage 2: a DiTDH / LightningDiT velocity model on frozen, normalised RAE latents."""
from __future__ import annotations

import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import logging

from rae_jax import data as data_lib
from rae_jax.eval import sample_shards
from rae_jax.models.layers import draw_label_drop, to_layout
from rae_jax.pipeline import builders, common, image_generator, images, loaders, snapshots
from rae_jax.pipeline.latents import LATENT_CACHE
from rae_jax.train import loop as loop_lib
from rae_jax.train import memory as memory_lib
from rae_jax.train import mesh as mesh_lib
from rae_jax.train import step as step_lib
from rae_jax.train.state import init_train_state
from rae_jax.train.step import make_train_step
from rae_jax.train import multihost


def normalise(z: jax.Array, stats: dict, eps: float) -> jax.Array:
  if not stats:
    return z
  mean = stats.get("mean", 0.0)
  var = stats.get("var", 1.0)
  return (z - mean) / jnp.sqrt(var + eps)


def make_loss_fn(config: mlc.ConfigDict, model, rae, transport, *, from_cache: bool,
                 latent_shape: Optional[tuple] = None) -> tuple[Callable, Callable]:
  """(loss_fn(params, batch, draws, frozen), draw_fn(key, batch)) for make_train_step.

  The official step: loss = transport.training_losses(model, x1, {y}).loss.mean() with the model in
  train mode. Its random inputs are the draws: flow-matching time t and noise (transport.draw) and
  the label-dropout mask ('drop', only if the model has a null class). `latent_shape` (h, w, C)
  defaults to the RAE's.
  """
  eps = config.stats.eps
  shape = tuple(latent_shape or rae.latent_shape)
  drop_prob = float(getattr(model, "class_dropout_prob", 0.0))

  def draw_fn(key, batch):
    k_drop, k_loss = jax.random.split(key)
    b = batch["label"].shape[0]
    draws = transport.draw(k_loss, (b,) + shape)
    if drop_prob > 0:
      draws["drop"] = draw_label_drop(k_drop, (b,), drop_prob)
    return draws

  def loss_fn(params, batch, draws, frozen):
    if from_cache:
      x = normalise(batch["latent"].astype(jnp.float32), frozen["stats"], eps)
    else:
      x = rae.encode({"encoder": frozen["encoder"], "stats": frozen["stats"]}, batch["image"])
    x = jax.lax.stop_gradient(x)

    def apply_fn(p, x_t, t, y):
      return model.apply({"params": p}, x_t, t, y, train=True, force_drop_ids=draws.get("drop"))

    loss = transport.training_loss_from_draws(params, apply_fn, x, draws, y=batch["label"])
    return loss, {}

  return loss_fn, draw_fn


def make_step(config: mlc.ConfigDict, model, rae, transport, sched: common.Schedule, shardings,
              mesh, *, from_cache: bool, frozen_shardings, latent_shape: Optional[tuple] = None):
  """The jitted stage-2 train step main.py runs (tests replay official trajectories through it)."""
  loss_fn, draw_fn = make_loss_fn(config, model, rae, transport, from_cache=from_cache,
                                  latent_shape=latent_shape)
  s2 = config.stage2
  return make_train_step(loss_fn, sched.tx, s2.ema_decay, shardings, mesh_lib.batch_sharding(mesh),
                         accum_steps=s2.grad_accum_steps, lr_schedule=sched.lr,
                         frozen_shardings=frozen_shardings, draw_fn=draw_fn)


def train_stage2(config: mlc.ConfigDict, workdir: str):
  mesh = common.make_mesh(config)
  rae, rae_vars = loaders.load_inference_rae(config, workdir, mesh)
  model = builders.build_stage2_model(config.model, builders.compute_dtype(config))
  transport = image_generator.transport_for(config, rae.latent_shape)
  s2 = config.stage2
  from_cache = bool(s2.use_latent_cache)
  if from_cache:
    source = data_lib.LatentCacheSource(os.path.join(workdir, LATENT_CACHE),
                                        num_classes=config.data.num_classes)
  else:
    source = data_lib.make_source(config.data)
  gb = s2.global_batch_size
  sched = common.optimizer(s2.optim, len(source), gb)
  logging.info("stage 2: %d examples, %d steps/epoch, %d steps, batch %d%s", len(source),
               sched.steps_per_epoch, sched.num_steps, gb, " (cached latents)" if from_cache else "")

  latent_shape = rae.latent_shape
  init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
  imported = None
  if snapshots.has_weights(workdir, builders.STAGE2_DIR):
    imported, desc = snapshots.load_params(workdir, builders.STAGE2_DIR, mesh, "ema")
    imported = to_layout(imported, model.layer_layout, model.scan_layers)  # either scan_layers
    logging.info("stage 2 starts from %s", desc)

  def init_params(key):
    return builders.init_stage2_params(model, latent_shape, key)

  # Imported weights are an argument of the jitted init: closed over, they would be baked into
  # the executable (and several hosts refuse arrays spanning other processes).
  state, shardings = init_train_state(None if imported is not None else init_params, sched.tx,
                                      init_key, train_key, mesh, params=imported)
  builders.log_params("stage-2 model", state.params)
  frozen = {"encoder": rae_vars["encoder"], "stats": rae_vars.get("stats", {})}
  if from_cache:
    frozen = {"stats": rae_vars.get("stats", {})}
  frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
  step_fn = make_step(config, model, rae, transport, sched, shardings, mesh,
                      from_cache=from_cache, frozen_shardings=frozen_shardings)
  # Images travel as uint8 and become float on device (train.step.images_to_unit_float).
  _check_step_memory(config, model, rae, transport, state, shardings, frozen, mesh,
                     from_cache=from_cache)
  it = common.data_iterator(source, mesh, gb, config.seed, config=config, image_dtype=np.uint8)
  writer = common.writer(config, workdir, builders.STAGE2_DIR)
  hooks = []
  if config.log.sample_every_steps > 0 or config.eval.online_every_steps > 0:
    s_config, guide_model, guide_params = _guidance_during_training(config, workdir, mesh)
  if config.log.sample_every_steps > 0:
    hooks.append(_sample_hook(s_config, workdir, model, rae, rae_vars, transport, mesh, writer,
                              guide_model, guide_params))
  if config.eval.online_every_steps > 0:
    from rae_jax.pipeline import evaluate
    hooks.append(evaluate.make_online_eval_hook(
        s_config, workdir, model=model, rae=rae, rae_vars=rae_vars, mesh=mesh, writer=writer,
        guide_model=guide_model, guide_params=guide_params))
  ckpt = common.checkpointer(config, workdir, builders.STAGE2_DIR)
  try:
    state = loop_lib.train_loop(
        step_fn, state, it, num_steps=sched.num_steps, global_batch_size=gb, checkpointer=ckpt,
        config=config.to_dict(), log_every=config.log.every_steps, writer=writer, hooks=hooks,
        frozen=frozen, prepare_batch=lambda b: mesh_lib.global_batch(mesh, b, gb),
        name="stage2")
  finally:
    it.close()
    writer.close()
  ckpt.close()
  return state


def _check_step_memory(config, model, rae, transport, state, shardings, frozen, mesh, *,
                       from_cache: bool) -> None:
  """Fails before the step compiles when its estimated per-device memory exceeds the device's
  (train/memory.py), naming the fields that reduce it."""
  s2 = config.stage2
  micro = s2.global_batch_size // max(s2.grad_accum_steps, 1)
  if from_cache:
    x = jax.ShapeDtypeStruct((micro, *rae.latent_shape), np.dtype(s2.get("latent_cache_dtype",
                                                                          "float16")))
    batch = {"latent": x}
  else:
    size = config.data.image_size
    batch = {"image": jax.ShapeDtypeStruct((micro, size, size, 3), np.uint8)}
  batch["label"] = jax.ShapeDtypeStruct((micro,), np.int32)
  loss_fn, draw_fn = make_loss_fn(config, model, rae, transport, from_cache=from_cache)

  def loss_on_float_images(p, b, d, f):
    return loss_fn(p, step_lib.images_to_unit_float(b), d, f)
  est = memory_lib.check_train_step(
      loss_on_float_images, draw_fn, jax.eval_shape(lambda: state), shardings, batch, frozen,
      batch_shards=mesh_lib.num_batch_shards(mesh), what="stage-2 train step")
  logging.info("stage-2 step estimate per device: %.2f GiB (state %.2f, gradients %.2f, saved "
               "activations %.2f)", *(est[k] / 2**30 for k in ("total", "state", "grads",
                                                                "activations")))


def _guidance_during_training(config: mlc.ConfigDict, workdir: str, mesh):
  """Samples during training use the configured guidance; autoguidance needs the guide's
  weights in <workdir>/guide, else those samples fall back to unguided (with a warning)."""
  g = config.guidance
  if g.method != "autoguidance" or float(g.scale) == 1.0:
    return config, None, None
  try:
    guide_params, desc = snapshots.load_params(workdir, builders.GUIDE_DIR, mesh, "ema")
  except FileNotFoundError:
    logging.warning("Autoguidance configured but no guide weights in %s: training-time samples "
                    "and online eval are unguided.", workdir)
    unguided = config.copy_and_resolve_references()
    unguided.guidance.scale = 1.0
    return unguided, None, None
  logging.info("Training-time samples use autoguidance with %s", desc)
  guide = builders.build_stage2_model(g.guide_model, builders.compute_dtype(config))
  return config, guide, guide_params


def _sample_hook(config, workdir, model, rae, rae_vars, transport, mesh, writer,
                 guide_model=None, guide_params=None):
  """Every log.sample_every_steps: a class-per-row grid from the EMA params."""
  # Batch-sharded like eval: each device generates its share, not every image.
  n = min(config.sample.num_images, 8 * config.data.num_classes)
  sampler = sample_shards.ShardedSampler(
      image_generator.make_generate(config, model, rae, transport, guide_model=guide_model), mesh,
      per_device_batch=-(-n // mesh_lib.num_batch_shards(mesh)))
  labels = image_generator.class_labels(n, config.data.num_classes)
  idx = np.arange(n, dtype=np.int32)
  key = jax.random.PRNGKey(config.seed + 1)

  def hook(step, state, metrics):
    del metrics
    if step % config.log.sample_every_steps:
      return
    imgs = sampler(state.ema_params, guide_params, rae_vars, labels, idx, key)  # uint8
    writer.images(step, "stage2/samples", imgs.astype(np.float32) / 255.0)
    if multihost.is_main():
      grid = images.make_grid(imgs, config.sample.grid_cols)
      images.write_png(grid, os.path.join(workdir, builders.STAGE2_DIR, "samples",
                                          f"step_{step:08d}.png"))

  return hook
