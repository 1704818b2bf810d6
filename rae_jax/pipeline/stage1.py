"""Stage 1: the RAE decoder on tau-noised latents of the frozen encoder (official train_stage1.py).

The losses (L1 + LPIPS + the DINO-discriminator GAN term with its adaptive weight, and the
discriminator update) are `losses/decoder_loss.py`; this module turns the config into their
settings and phase switches, builds the frozen loss networks, and runs them on the shared
train-step core (`train/step.py`). Discriminator fakes are 8-bit-quantised reconstructions of the
*updated* decoder without latent noise (the reference switches the RAE to eval mode); the D update
runs after the generator update, in the same jitted step; EMA of the decoder after every update.

State: TrainState.params / ema_params / opt_state are the decoder's; state.extra holds the trainable
discriminator heads ('disc'), their spectral-norm vectors ('spectral'), the D optimizer state
('disc_opt') and the number of D updates done ('disc_step', the D schedule's clock, which like the
reference's disc scheduler only advances on D updates). The frozen encoder, LPIPS VGG and DINO ViT
are passed as the step's `frozen` argument (replicated, reloaded from their files, not checkpointed).
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from absl import logging

from rae_jax import data as data_lib
from rae_jax import storage
from rae_jax import config_checks
from rae_jax.config_checks import ConfigError
from rae_jax.losses import decoder_loss
from rae_jax.losses import gan as gan_lib
from rae_jax.losses.decoder_loss import LossSettings
from rae_jax.losses.diffaug import diffaug_draws
from rae_jax.losses.discriminator import DinoDiscriminator, DiscHead
from rae_jax.losses.lpips import LPIPS
from rae_jax.losses.spectral_norm import SPECTRAL
from rae_jax.models.rae import draw_latent_noise
from rae_jax.pipeline import builders, common, images
from rae_jax.train import loop as loop_lib
from rae_jax.train import memory as memory_lib
from rae_jax.train import mesh as mesh_lib
from rae_jax.train import step as step_lib
from rae_jax.train.state import TrainState, init_train_state
from rae_jax.train import multihost

LPIPS_LIN_FILE = "vgg.pth"
LPIPS_VGG_GLOB = "vgg16*.pth"
POS_EMBED = "decoder_pos_embed"


# --------------------------------------------------------------------------------------------
# Config -> loss settings and phase schedule


class Phase(NamedTuple):
  """Which terms one compiled stage-1 step has: LPIPS, the GAN term, the D update."""
  lpips: bool
  gan: bool
  disc_update: bool


@dataclasses.dataclass(frozen=True)
class Phases:
  """Epoch switches of the official loop as step thresholds (int(epochs * steps_per_epoch), the
  truncation the LR schedules use; equal to the official epoch * steps_per_epoch for whole epochs).
  """
  lpips_start: int = 0
  gan_start: int = 0
  disc_start: int = 0
  lpips_on: bool = False
  gan_on: bool = False

  @classmethod
  def from_config(cls, s1: mlc.ConfigDict, settings: LossSettings, steps_per_epoch: int) -> "Phases":
    loss = s1.loss

    def steps(epochs) -> int:
      return int(float(epochs) * steps_per_epoch)
    gan_start = steps(loss.disc_start)
    return cls(lpips_start=steps(loss.lpips_start), gan_start=gan_start,
               disc_start=steps(loss.get("disc_upd_start", loss.disc_start)),
               lpips_on=settings.lpips_on, gan_on=settings.gan_on)

  def at(self, step: int) -> Phase:
    """The phase of the update that starts at `step` (host int)."""
    return Phase(self.lpips_on and step >= self.lpips_start, self.gan_on and step >= self.gan_start,
                 self.gan_on and step >= self.disc_start)


def loss_settings(config: mlc.ConfigDict) -> LossSettings:
  s1 = config.stage1
  loss, disc = s1.loss, s1.disc
  disc_weight = float(loss.disc_weight) if disc.enabled else 0.0
  if disc.enabled and disc_weight <= 0:
    logging.warning("config.stage1.disc.enabled but config.stage1.loss.disc_weight=%s: no GAN "
                    "term and no discriminator updates (as the official loop).", loss.disc_weight)
  if not disc.enabled and float(loss.disc_weight) > 0:
    logging.info("config.stage1.disc.enabled=False: GAN loss off (disc_weight %s unused).",
                 loss.disc_weight)
  return LossSettings(
      l1_weight=float(loss.l1_weight), perceptual_weight=float(loss.perceptual_weight),
      disc_weight=disc_weight, max_d_weight=float(loss.max_d_weight),
      disc_updates=int(loss.disc_updates), disc_loss=str(loss.disc_loss),
      gen_loss=str(loss.gen_loss), aug_prob=float(disc.aug_prob), cutout=float(disc.cutout),
      noise_tau=float(s1.noise_tau), train_pos_embed=bool(s1.get("train_pos_embed", True)))


def check_stage1_config(config: mlc.ConfigDict) -> LossSettings:
  """Fails at start, naming the field, before any model is built."""
  s = loss_settings(config)
  s1 = config.stage1
  if s.lpips_on and not s1.loss.lpips_weights:
    raise ConfigError(
        f"config.stage1.loss.perceptual_weight={s.perceptual_weight} needs LPIPS weights, but "
        f"config.stage1.loss.lpips_weights is empty: set it to a folder holding torchvision's "
        f"'vgg16-397923af.pth' ({LPIPS_VGG_GLOB}) and the LPIPS '{LPIPS_LIN_FILE}', or set "
        f"config.stage1.loss.perceptual_weight=0")
  if s.gan_on:
    config_checks.check_dino_weights(s1)
    if s.disc_updates < 1:
      raise ConfigError(f"config.stage1.loss.disc_updates={s.disc_updates} must be >= 1")
    try:
      gan_lib.select_gan_losses(s.disc_loss, s.gen_loss)
    except ValueError as e:
      raise ConfigError(f"config.stage1.loss.disc_loss / gen_loss: {e}") from e
  if s.max_d_weight < 0:
    raise ConfigError(f"config.stage1.loss.max_d_weight={s.max_d_weight} must be >= 0")
  return s


# --------------------------------------------------------------------------------------------
# Frozen loss networks


def load_lpips_folder(folder: str) -> dict:
  """LPIPS params from a folder holding torchvision's VGG16 and the LPIPS linear heads.

  Expected files (see rae_jax.interop.lpips_weights for their formats):
    vgg16-397923af.pth  torchvision ImageNet vgg16 state_dict (any name matching 'vgg16*.pth';
                        the first in sorted order is used)
    vgg.pth             LPIPS v0.1 linear heads (lpips package weights/v0.1/vgg.pth)
  """
  from rae_jax.interop.lpips_weights import load_lpips_params
  field = "config.stage1.loss.lpips_weights"
  if storage.is_remote(folder):  # gs://: read through a local temporary copy
    if not storage.isdir(folder):
      raise ConfigError(f"{field}={folder!r} is not a folder")
    with storage.local_dir(folder) as local:
      return load_lpips_folder(local)
  if not os.path.isdir(folder):
    raise ConfigError(f"{field}={folder!r} is not a folder (expected one holding "
                      f"'vgg16-397923af.pth' and '{LPIPS_LIN_FILE}')")
  lin = os.path.join(folder, LPIPS_LIN_FILE)
  if not os.path.isfile(lin):
    raise ConfigError(f"{field}={folder!r}: missing the LPIPS linear heads '{LPIPS_LIN_FILE}'")
  trunks = sorted(glob.glob(os.path.join(folder, LPIPS_VGG_GLOB)))
  if not trunks:
    raise ConfigError(f"{field}={folder!r}: missing torchvision's VGG16 weights "
                      f"('vgg16-397923af.pth', any '{LPIPS_VGG_GLOB}')")
  return load_lpips_params(trunks[0], lin)


def build_discriminator(d_cfg: mlc.ConfigDict, dtype=jnp.float32,
                        attention_impl: str = "auto") -> DinoDiscriminator:
  """DinoDisc from config.stage1.disc; optional fields (tests, ablations) read with .get:
  key_depths, norm_eps, recipe_overrides (e.g. a tiny ViT: dict(depth=2, embed_dim=32, ...))."""
  overrides = d_cfg.get("recipe_overrides", None)
  if overrides is not None and hasattr(overrides, "to_dict"):
    overrides = overrides.to_dict()
  return DinoDiscriminator(recipe=d_cfg.recipe,
                           key_depths=tuple(int(k) for k in d_cfg.get("key_depths", (2, 5, 8, 11))),
                           ks=int(d_cfg.ks), norm_type=d_cfg.norm_type,
                           use_spectral_norm=bool(d_cfg.using_spec_norm),
                           norm_eps=float(d_cfg.get("norm_eps", 1e-6)),
                           recipe_overrides=dict(overrides) if overrides else None,
                           dtype=dtype, attention_impl=attention_impl)


def _dummy_image():
  return jnp.zeros((1, 16, 16, 3), jnp.float32)


def frozen_dino_params(disc: DinoDiscriminator, d_cfg: mlc.ConfigDict, key: jax.Array) -> Any:
  """The frozen DINO ViT: from dino_ckpt_path (checked against the architecture), or random."""
  if d_cfg.get("random_init", False):
    logging.warning("config.stage1.disc.random_init: the DINO discriminator ViT is RANDOM (tests).")
    return jax.jit(lambda k: disc.init(k, _dummy_image())["params"]["dino"])(key)
  from rae_jax.interop.dino_weights import disc_variables_from_torch, load_dino_checkpoint
  path = d_cfg.dino_ckpt_path  # checked by config_checks.check_dino_weights
  with storage.local_copy(path) as local:  # gs://: a local temporary copy
    variables = disc_variables_from_torch(disc, load_dino_checkpoint(local), rng=key, source=path)
  return variables["params"]["dino"]


def init_disc_heads(disc: DinoDiscriminator, key: jax.Array) -> tuple[dict, dict]:
  """(head params, spectral u/v) of fresh heads, as `disc_variables_from_torch` draws them (one key
  per head); traceable, and without running the ViT."""
  cfg = disc.vit_config()
  head = DiscHead(disc.ks, disc.norm_type, disc.norm_eps, disc.use_spectral_norm)
  tokens = jnp.zeros((1, 8, cfg["embed_dim"]), jnp.float32)
  heads, spectral = {}, {}
  for i, k in enumerate(jax.random.split(key, len(cfg["key_depths"]) + 1)):
    v = head.init(k, tokens)
    heads[f"head_{i}"] = v["params"]
    if SPECTRAL in v:
      spectral[f"head_{i}"] = v[SPECTRAL]
  return heads, spectral


def disc_extra_init(disc: DinoDiscriminator, disc_tx: optax.GradientTransformation):
  """key -> the discriminator part of TrainState.extra (heads, spectral u/v, D optimizer, D clock)."""
  def init(key):
    heads, spectral = init_disc_heads(disc, key)
    extra = {"disc": heads, "disc_opt": disc_tx.init(heads), "disc_step": jnp.zeros((), jnp.int32)}
    if spectral:
      extra["spectral"] = spectral
    return extra
  return init


# --------------------------------------------------------------------------------------------
# The train step


class Stage1Step:
  """step(state, batch, frozen) -> (state, metrics), one jitted, sharded executable per phase.

  Why static phases rather than lax.cond on the step: a disabled term (LPIPS before lpips_start,
  the GAN term and its adaptive weight before disc_start, the D update before disc_upd_start)
  then costs nothing, neither FLOPs nor memory (a cond keeps buffers for its largest branch and a
  GAN-free run would still compile the DINO discriminator); the official schedule has at most
  three switch points, so a run compiles at most four variants, each once, and the L1-only demo
  exactly one. The phase is chosen on the host from a step counter that is read from the device
  only when a state it did not produce comes in (start, resume), so the hot loop never syncs.
  """

  def __init__(self, build: Callable[[Phase], step_lib.TrainStep], phases: Phases):
    self._build = build
    self.phases = phases
    self.variants: dict[Phase, step_lib.TrainStep] = {}
    self._last: Optional[TrainState] = None
    self._host_step = 0

  def for_phase(self, phase: Sequence[bool], step: int = -1) -> step_lib.TrainStep:
    """The step of one phase (built once): call it, or `.lower(state, batch, frozen, draws)` it
    to inspect the compiled program (tests, bench)."""
    phase = Phase(*phase)
    fn = self.variants.get(phase)
    if fn is None:
      logging.info("stage 1: compiling the step for phase lpips=%s gan=%s disc_update=%s (step %d)",
                   *phase, step)
      fn = self.variants[phase] = self._build(phase)
    return fn

  def __call__(self, state: TrainState, batch: Any, frozen: Any, draws: Any = None):
    """One update; `draws` (see `draw_stage1`) replaces the draws made from the step key."""
    if state is not self._last:
      self._host_step = int(jax.device_get(state.step))
    fn = self.for_phase(self.phases.at(self._host_step), self._host_step)
    state, metrics = fn(state, batch, frozen, draws)
    self._host_step += 1
    self._last = state
    return state, metrics


def draw_stage1(key: jax.Array, batch_size: int, token_shape: tuple, disc_updates: int) -> dict:
  """Every random input of one stage-1 update, in the reference's order of use.

  latent_noise: the tau-noise of the generator's train-mode RAE forward (`draw_latent_noise`);
  g_aug: DiffAug of the fakes the generator's GAN term sees; d_aug: {'fake', 'real'} DiffAug draws
  of each D update (leading axis disc_updates). DiffAug draws are the official layout
  (u (3,), rand01 (7, B, 1, 1)). Unused entries cost nothing: XLA drops them.
  """
  k_noise, k_gaug, k_disc = jax.random.split(key, 3)
  k_fake, k_real = jax.random.split(k_disc)

  def aug(k):
    return jax.vmap(lambda kk: diffaug_draws(kk, batch_size))(jax.random.split(k, disc_updates))
  return {"latent_noise": draw_latent_noise(k_noise, (batch_size,) + tuple(token_shape)),
          "g_aug": diffaug_draws(k_gaug, batch_size),
          "d_aug": {"fake": aug(k_fake), "real": aug(k_real)}}


def split_stage1_draws(draws: dict, accum_steps: int, batch_sharding) -> dict:
  """Given draws (as `draw_stage1` makes them) -> micro-batch draws of the generator update
  (leading axis accum_steps, rows strided like the batch); the discriminator's `d_aug` stays
  with the whole batch (`after_update`)."""
  g_aug = draws["g_aug"]
  rand01 = jnp.moveaxis(step_lib.split_micro(jnp.moveaxis(g_aug["rand01"], 1, 0), accum_steps,
                                             batch_sharding), 1, 2)  # (accum, 7, B/accum, 1, 1)
  return {"latent_noise": step_lib.split_micro(draws["latent_noise"], accum_steps, batch_sharding),
          "g_aug": {"u": jnp.broadcast_to(g_aug["u"], (accum_steps,) + g_aug["u"].shape),
                    "rand01": rand01}}


def make_stage1_step(rae, settings: LossSettings, phases: Phases, *, gen_tx: optax.GradientTransformation,
                     gen_lr: optax.Schedule, ema_decay: float, state_shardings: TrainState,
                     batch_sharding, frozen_shardings: Any,
                     disc: Optional[DinoDiscriminator] = None,
                     disc_tx: Optional[optax.GradientTransformation] = None,
                     disc_lr: Optional[optax.Schedule] = None, donate: bool = True,
                     accum_steps: int = 1) -> Stage1Step:
  """The stage-1 step, on the shared train-step core (`train/step.py`: micro-batch accumulation,
  optimizer, EMA, donation). frozen = {'encoder', 'lpips' (if LPIPS is on), 'dino' (if the GAN is
  on)}; batch = {'image': (B, H, W, 3) in [0, 1]}; draws (optional) as `draw_stage1` makes them.

  With accum_steps > 1 the generator update runs over micro-batches (the adaptive GAN weight from
  the whole batch's last-layer gradients: each term's gradient is accumulated apart and combined
  once); the discriminator update sees the whole batch (its gradient keeps no decoder activations).

  Metrics (replicated scalars): loss, l1, grad_norm, lr; with LPIPS: lpips; with the GAN: g_loss,
  d_weight, d_loss, disc_acc, logits_real, logits_fake, d_lr (zeros while a term is not active, so
  every step of a run has the same keys).
  """
  if settings.gan_on and (disc is None or disc_tx is None):
    raise ValueError("make_stage1_step: the GAN term needs `disc` and `disc_tx`")
  lpips_net = LPIPS() if settings.lpips_on else None
  s = settings
  zero = jnp.zeros((), jnp.float32)
  h, w, c = rae.latent_shape
  token_shape = (h * w, c)

  def draw(key, batch):
    return draw_stage1(key, batch["image"].shape[0], token_shape, s.disc_updates)

  def no_pos_embed_grad(grads):  # frozen sin-cos table: no gradient, no Adam state, no decay
    return grads if s.train_pos_embed else {**grads, POS_EMBED: jnp.zeros_like(grads[POS_EMBED])}

  def build(phase):
    use_lpips, use_gan, train_disc = phase
    in_parts = use_gan and accum_steps > 1  # the adaptive weight needs the whole batch

    def grads_fn(params, batch, draws, frozen, extra):
      x = batch["image"].astype(jnp.float32)
      z = rae.encode({"encoder": frozen["encoder"]}, x, noise_tau=s.noise_tau,
                     noise=draws["latent_noise"])
      # One decoder forward; its VJP gives the last-layer gradients of each loss term (XLA keeps
      # only the decoder_pred part of those two pullbacks) and then the gradient of the total.
      recon, pullback = jax.vjp(lambda p: rae.decode({"decoder": p}, z), params)
      lpips = (functools.partial(lpips_net.apply, {"params": frozen["lpips"]}) if use_lpips
               else None)
      gan_loss = None
      if use_gan:
        d_vars = decoder_loss.disc_variables(frozen["dino"], extra["disc"], extra.get("spectral"))
        gan_loss = functools.partial(decoder_loss.gan_generator_loss, s, disc=disc,
                                     d_vars=d_vars, g_aug=draws["g_aug"])
      rec, aux, g_rec, g_val, g_gan = decoder_loss.generator_terms(s, recon, x, lpips=lpips,
                                                                   gan_loss=gan_loss)
      metrics = {"l1": aux["l1"]}
      if s.lpips_on:
        metrics["lpips"] = aux.get("lpips", zero)
      back = lambda g: pullback(g)[0]  # noqa: E731
      if in_parts:
        metrics.update(g_loss=g_val)
        return (rec, metrics), {"rec": back(g_rec), "gan": back(g_gan)}
      if use_gan:
        loss, g_img, d_weight = decoder_loss.combine_generator(
            s, rec, g_val, g_rec, g_gan, decoder_loss.last_layer(back(g_rec)),
            decoder_loss.last_layer(back(g_gan)))
      else:
        g_val, d_weight, g_img, loss = zero, zero, g_rec, rec
      if s.gan_on:
        metrics.update(g_loss=g_val, d_weight=d_weight)
      return (loss, metrics), no_pos_embed_grad(back(g_img))

    def finish_grads(rec, metrics, parts):
      loss, grads, d_weight = decoder_loss.combine_generator(
          s, rec, metrics["g_loss"], parts["rec"], parts["gan"],
          decoder_loss.last_layer(parts["rec"]), decoder_loss.last_layer(parts["gan"]))
      return loss, {**metrics, "d_weight": d_weight}, no_pos_embed_grad(grads)

    def after_update(state, params, batch, draws, frozen):
      if not s.train_pos_embed:
        params = {**params, POS_EMBED: state.params[POS_EMBED]}
      if not train_disc:
        return params, state.extra, ({k: zero for k in decoder_loss.DISC_METRICS} if s.gan_on
                                     else {})
      # Reference: a fresh forward of the updated RAE in eval mode (no latent noise), quantised.
      x = batch["image"].astype(jnp.float32)
      z_clean = rae.encode({"encoder": frozen["encoder"]}, x)
      fake = jax.lax.stop_gradient(
          gan_lib.quantize_pm1(rae.decode({"decoder": params}, z_clean) * 2.0 - 1.0))
      extra, metrics = decoder_loss.discriminator_update(
          s, disc, disc_tx, disc_lr, frozen["dino"], state.extra, fake, x * 2.0 - 1.0,
          draws["d_aug"])
      return params, extra, metrics

    return step_lib.make_train_step(
        None, gen_tx, ema_decay, state_shardings, batch_sharding, accum_steps,
        lr_schedule=gen_lr, frozen_shardings=frozen_shardings, draw_fn=draw, donate=donate,
        grads_fn=grads_fn, finish_grads=finish_grads if in_parts else None,
        split_draws=split_stage1_draws, after_update=after_update)

  return Stage1Step(build, phases)


@dataclasses.dataclass
class Stage1Parts:
  """What the config makes of the loop: loss settings, phase switches, both optimizers."""
  settings: LossSettings
  phases: Phases
  sched: common.Schedule
  disc: Optional[DinoDiscriminator] = None
  disc_sched: Optional[common.Schedule] = None


def build_parts(config: mlc.ConfigDict, dataset_size: int) -> Stage1Parts:
  """Settings, phases (epochs -> steps), G and D AdamW + schedules, the discriminator module."""
  settings = check_stage1_config(config)
  s1 = config.stage1
  sched = common.optimizer(s1.optim, dataset_size, s1.global_batch_size)
  phases = Phases.from_config(s1, settings, sched.steps_per_epoch)
  if not settings.gan_on:
    return Stage1Parts(settings, phases, sched)
  disc = build_discriminator(s1.disc, builders.compute_dtype(config),
                             builders.attention_impl(config))
  return Stage1Parts(settings, phases, sched, disc,
                     common.optimizer(s1.disc.optim, dataset_size, s1.global_batch_size))


def accum_steps(config: mlc.ConfigDict) -> int:
  return int(config.stage1.get("grad_accum_steps", 1))


def make_step(config: mlc.ConfigDict, rae, parts: Stage1Parts, shardings: TrainState, mesh,
              frozen_shardings: Any) -> Stage1Step:
  """The stage-1 step main.py runs (tests replay official trajectories through it)."""
  d = parts.disc_sched
  return make_stage1_step(
      rae, parts.settings, parts.phases, gen_tx=parts.sched.tx, gen_lr=parts.sched.lr,
      ema_decay=config.stage1.ema_decay, state_shardings=shardings,
      batch_sharding=mesh_lib.batch_sharding(mesh), frozen_shardings=frozen_shardings,
      disc=parts.disc, disc_tx=d.tx if d else None, disc_lr=d.lr if d else None,
      accum_steps=accum_steps(config))


def check_step_memory(config: mlc.ConfigDict, rae, parts: Stage1Parts, abstract_state: TrainState,
                      shardings: TrainState, frozen: Any, mesh, *, limit: Optional[int] = -1) -> dict:
  """Fails before the step compiles when the generator update's estimated per-device memory
  (train/memory.py: state, gradients, saved activations of decoder + L1 + LPIPS + the GAN term in
  its widest phase) exceeds the device's, naming the fields that reduce it. Returns the estimate."""
  s = parts.settings
  micro = config.stage1.global_batch_size // accum_steps(config)
  h, w, c = rae.latent_shape
  lpips_net = LPIPS() if s.lpips_on else None

  def loss_fn(p, batch, draws, frz):  # the step's generator forward (decoder_loss)
    x = step_lib.images_to_unit_float(batch)["image"].astype(jnp.float32)
    z = rae.encode({"encoder": frz["encoder"]}, x, noise_tau=s.noise_tau,
                   noise=draws["latent_noise"])
    lpips = functools.partial(lpips_net.apply, {"params": frz["lpips"]}) if lpips_net else None
    gan_loss = None
    if s.gan_on:
      gan_loss = functools.partial(
          decoder_loss.gan_generator_loss, s, disc=parts.disc, g_aug=draws["g_aug"],
          d_vars=decoder_loss.disc_variables(frz["dino"], frz["disc"], frz.get("spectral")))
    loss = decoder_loss.generator_objective(s, rae.decode({"decoder": p}, z), x, lpips=lpips,
                                            gan_loss=gan_loss)
    return jnp.broadcast_to(loss, (x.shape[0],)), {}

  def draw_fn(key, batch):
    return draw_stage1(key, batch["image"].shape[0], (h * w, c), s.disc_updates)

  frz = dict(frozen)
  if s.gan_on:  # the heads train, but the GAN term reads them like frozen weights
    frz.update(disc=abstract_state.extra["disc"], spectral=abstract_state.extra.get("spectral"))
  size = rae.image_size
  batch = {"image": jax.ShapeDtypeStruct((micro, size, size, 3), np.uint8)}
  est = memory_lib.check_train_step(loss_fn, draw_fn, abstract_state, shardings, batch, frz,
                                    batch_shards=mesh_lib.num_batch_shards(mesh), limit=limit,
                                    what="stage-1 train step")
  logging.info("stage-1 step estimate per device: %.2f GiB (state %.2f, gradients %.2f, saved "
               "activations %.2f)", *(est[k] / 2**30 for k in ("total", "state", "grads",
                                                                "activations")))
  return est


# --------------------------------------------------------------------------------------------
# The mode


def train_stage1(config: mlc.ConfigDict, workdir: str, *, hooks: Sequence[loop_lib.Hook] = ()):
  """Trains the decoder of config's RAE into <workdir>/stage1 (resumes from its checkpoints).

  LPIPS (config.stage1.loss.perceptual_weight > 0) reads config.stage1.loss.lpips_weights, a folder
  with torchvision's 'vgg16-397923af.pth' (any 'vgg16*.pth') and the LPIPS 'vgg.pth' lin weights.
  The GAN (config.stage1.disc.enabled and disc_weight > 0) reads the DINO ViT from
  config.stage1.disc.dino_ckpt_path (official 'dino_vit_small_patch8_224.pth'); optional
  config.stage1.disc fields: random_init (bool, tests), recipe_overrides, key_depths, norm_eps.
  `hooks` are extra train-loop hooks (step, state, metrics-or-None). Returns the final TrainState.
  """
  settings = check_stage1_config(config)
  s1 = config.stage1
  lpips_params = load_lpips_folder(s1.loss.lpips_weights) if settings.lpips_on else None

  mesh = common.make_mesh(config)
  rae, rae_vars = builders.build_rae(config, workdir, with_stats=False)
  source = data_lib.make_source(config.data)
  gb = s1.global_batch_size
  parts = build_parts(config, len(source))
  sched, phases, disc = parts.sched, parts.phases, parts.disc
  logging.info("stage 1: %d examples, %d steps/epoch, %d steps, batch %d, tau %.2f; L1 x%g, LPIPS "
               "x%g from step %d, GAN x%g from step %d, D updates from step %d", len(source),
               sched.steps_per_epoch, sched.num_steps, gb, settings.noise_tau, settings.l1_weight,
               settings.perceptual_weight, phases.lpips_start, settings.disc_weight,
               phases.gan_start, phases.disc_start)

  init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
  pretrained = rae_vars.pop("decoder") if config.decoder.pretrained else None
  rae_vars.pop("decoder", None)

  frozen = {"encoder": rae_vars["encoder"]}
  if lpips_params is not None:
    frozen["lpips"] = lpips_params
  if disc is not None:
    frozen["dino"] = frozen_dino_params(disc, s1.disc, jax.random.fold_in(init_key, 2))

  # A pretrained decoder is an argument of the jitted init, not a closure (no baked constants).
  state, shardings = init_train_state(
      rae.init_decoder if pretrained is None else None, sched.tx, init_key, train_key, mesh,
      params=pretrained,
      init_extra=disc_extra_init(disc, parts.disc_sched.tx) if disc is not None else None)
  builders.log_params("stage-1 decoder", state.params)
  if disc is not None:
    builders.log_params("discriminator heads", state.extra["disc"])
  frozen = common.replicated(mesh, frozen)
  step_fn = make_step(config, rae, parts, shardings, mesh,
                      jax.tree.map(lambda a: a.sharding, frozen))
  check_step_memory(config, rae, parts, jax.eval_shape(lambda: state), shardings, frozen, mesh)

  it = common.data_iterator(source, mesh, gb, config.seed, config=config, image_dtype=np.uint8)
  writer = common.writer(config, workdir, builders.STAGE1_DIR)
  all_hooks = list(hooks)
  if config.log.sample_every_steps > 0:
    all_hooks.append(_sample_hook(config, workdir, rae, frozen["encoder"], source, mesh, writer))
  ckpt = common.checkpointer(config, workdir, builders.STAGE1_DIR)
  try:
    state = loop_lib.train_loop(
        step_fn, state, it, num_steps=sched.num_steps, global_batch_size=gb, checkpointer=ckpt,
        config=config.to_dict(), log_every=config.log.every_steps, writer=writer, hooks=all_hooks,
        frozen=frozen, prepare_batch=lambda b: mesh_lib.global_batch(mesh, {"image": b["image"]}, gb),
        name="stage1")
  finally:
    it.close()
    writer.close()
  ckpt.close()
  return state


def _sample_hook(config, workdir, rae, enc_params, source, mesh, writer, num: int = 8):
  """Every log.sample_every_steps: originals (top row) and EMA reconstructions without noise."""
  n = min(num, len(source))
  originals = []
  for i in range(n):
    img = np.asarray(source[i][0])
    originals.append(data_lib.transforms.to_unit_float(img) if img.dtype == np.uint8 else img)
  originals = np.stack(originals).astype(np.float32)
  rep = mesh_lib.replicated(mesh)
  x = jax.device_put(originals, rep)
  recon = jax.jit(
      lambda p, e, x: jnp.clip(rae.decode({"decoder": p}, rae.encode({"encoder": e}, x)), 0.0, 1.0),
      out_shardings=rep)

  def hook(step, state, metrics):
    del metrics
    if step % config.log.sample_every_steps:
      return
    rec = np.asarray(jax.device_get(recon(state.ema_params, enc_params, x)))
    pair = np.concatenate([originals, rec], 0)
    writer.images(step, "stage1/reconstructions", pair)
    if multihost.is_main():
      grid = images.make_grid(images.to_uint8(pair), n)
      images.write_png(grid, os.path.join(workdir, builders.STAGE1_DIR, "samples",
                                          f"step_{step:08d}.png"))

  return hook
