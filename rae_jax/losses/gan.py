"""Stage-1 loss pieces (official `disc/gan_loss.py` and `train_stage1.py`): GAN losses, L1, the
adaptive GAN weight and the epoch-based switches, all pure and jit-able."""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


def _reduce(x, reduction: str):
  if reduction == "mean":
    return jnp.mean(x)
  if reduction == "sum":
    return jnp.sum(x)
  raise ValueError(f"unsupported reduction {reduction!r} (expected 'mean' or 'sum')")


def hinge_d_loss(logits_real, logits_fake, reduction: str = "mean"):
  return 0.5 * (_reduce(jax.nn.relu(1.0 - logits_real), reduction)
                + _reduce(jax.nn.relu(1.0 + logits_fake), reduction))


def vanilla_d_loss(logits_real, logits_fake, reduction: str = "mean"):
  return 0.5 * (_reduce(jax.nn.softplus(-logits_real), reduction)
                + _reduce(jax.nn.softplus(logits_fake), reduction))


def vanilla_g_loss(logits_fake, reduction: str = "mean"):
  return -_reduce(logits_fake, reduction)


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
G_LOSSES = {"vanilla": vanilla_g_loss}


def select_gan_losses(disc_kind: str, gen_kind: str):
  """(d_loss_fn, g_loss_fn) by config name, as the official `select_gan_losses`."""
  if disc_kind not in D_LOSSES:
    raise ValueError(f"unsupported discriminator loss {disc_kind!r}; known {sorted(D_LOSSES)}")
  if gen_kind not in G_LOSSES:
    raise ValueError(f"unsupported generator loss {gen_kind!r}; known {sorted(G_LOSSES)}")
  return D_LOSSES[disc_kind], G_LOSSES[gen_kind]


def l1_loss(recon, target):
  return jnp.mean(jnp.abs(recon - target))


def disc_accuracy(logits_real, logits_fake):
  return jnp.mean((logits_real > logits_fake).astype(jnp.float32))


def quantize_pm1(x):
  """Clamp to [-1, 1] and snap to the 8-bit grid, as the reference does to fakes before D updates."""
  x = jnp.clip(x, -1.0, 1.0)
  return jnp.round((x + 1.0) * 127.5) / 127.5 - 1.0


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree)))


def adaptive_weight_from_grads(rec_grads, gan_grads, max_d_weight: float = 1e4):
  """||grad_rec|| / (||grad_gan|| + 1e-6), clamped to [0, max_d_weight], no gradient."""
  w = _global_norm(rec_grads) / (_global_norm(gan_grads) + 1e-6)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_d_weight))


def adaptive_gan_weight(rec_loss_fn: Callable, gan_loss_fn: Callable, last_layer,
                        max_d_weight: float = 1e4):
  """Adaptive GAN weight w.r.t. the decoder's last layer (official `calculate_adaptive_weight`).

  `rec_loss_fn(w)` and `gan_loss_fn(w)` map the last-layer weight (the reference uses the
  `decoder_pred` kernel only) to the scalar reconstruction loss (L1 + w_p * LPIPS) and generator
  loss. Cheapest when they start from stop-gradient'ed decoder features, so each backward pass
  stops at the last layer.
  """
  return adaptive_weight_from_grads(jax.grad(rec_loss_fn)(last_layer),
                                    jax.grad(gan_loss_fn)(last_layer), max_d_weight)


@dataclasses.dataclass(frozen=True)
class GanSchedule:
  """Epoch switches of the official loop, turned into step thresholds (epoch * steps_per_epoch).

  `use_lpips`, `use_gan` and `train_disc` take a step (int or traced) and return booleans, so they
  work inside jit (with lax.cond / jnp.where) and on the host.
  """
  steps_per_epoch: int
  lpips_start: int = 0        # epochs
  disc_start: int = 0         # epochs: GAN term in the generator loss
  disc_upd_start: int | None = None  # epochs: discriminator updates (default: disc_start)
  perceptual_weight: float = 0.0
  disc_weight: float = 0.0
  disc_updates: int = 1
  max_d_weight: float = 1e4

  def __post_init__(self):
    if self.steps_per_epoch <= 0:
      raise ValueError(f"GanSchedule: steps_per_epoch must be > 0, got {self.steps_per_epoch}")
    if self.disc_updates < 0:
      raise ValueError(f"GanSchedule: disc_updates must be >= 0, got {self.disc_updates}")

  @property
  def lpips_start_step(self) -> int:
    return int(self.lpips_start) * self.steps_per_epoch

  @property
  def gan_start_step(self) -> int:
    return int(self.disc_start) * self.steps_per_epoch

  @property
  def disc_update_step(self) -> int:
    start = self.disc_start if self.disc_upd_start is None else self.disc_upd_start
    return int(start) * self.steps_per_epoch

  def use_lpips(self, step):
    return jnp.logical_and(step >= self.lpips_start_step, self.perceptual_weight > 0.0)

  def use_gan(self, step):
    return jnp.logical_and(step >= self.gan_start_step, self.disc_weight > 0.0)

  def train_disc(self, step):
    return jnp.logical_and(step >= self.disc_update_step, self.disc_weight > 0.0)

  @classmethod
  def from_config(cls, loss_cfg, steps_per_epoch: int) -> "GanSchedule":
    """From the official `gan.loss` section (a dict or ConfigDict with the same field names)."""
    get = loss_cfg.get
    disc_start = int(get("disc_start", 0))
    return cls(steps_per_epoch=steps_per_epoch,
               lpips_start=int(get("lpips_start", 0)),
               disc_start=disc_start,
               disc_upd_start=int(get("disc_upd_start", disc_start)),
               perceptual_weight=float(get("perceptual_weight", 0.0)),
               disc_weight=float(get("disc_weight", 0.0)),
               disc_updates=int(get("disc_updates", 1)),
               max_d_weight=float(get("max_d_weight", 1e4)))
