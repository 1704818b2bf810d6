"""The stage-1 losses (official `train_stage1.py`): the decoder's (generator's) objective and the
discriminator update, one copy for the train step, its memory estimate and the benchmarks.

Images in [0, 1] for L1 and in [-1, 1] for LPIPS and the discriminator:
  rec   = l1_weight * |x_hat - x|  +  perceptual_weight * LPIPS(x_hat, x)
  total = rec + disc_weight * d_weight * G(D(DiffAug(x_hat)))
  d_weight = ||d rec / dW|| / (||d G / dW|| + 1e-6), clamped to [0, max_d_weight], W = the decoder's
  last layer (`decoder_pred` kernel), as the official `calculate_adaptive_weight`.
Discriminator: hinge / vanilla loss on DiffAug'ed fakes and reals, its own optimizer, one spectral
norm power iteration per D call, `disc_updates` updates per step.

To add a loss term: a field in `LossSettings` (and its config field in `pipeline/stage1.py`'s
`loss_settings`), its value in `reconstruction_loss` (or a term beside the GAN one in
`generator_terms`), and a metric name; the step, the estimate and the bench then all see it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from rae_jax.losses import gan
from rae_jax.losses.diffaug import apply_diffaug
from rae_jax.losses.discriminator import DinoDiscriminator, classify_pair
from rae_jax.losses.spectral_norm import SPECTRAL

LAST_LAYER = ("decoder_pred", "kernel")  # W of the adaptive weight


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """Static loss constants (hashable: they are baked into the compiled step)."""
  l1_weight: float = 1.0
  perceptual_weight: float = 0.0
  disc_weight: float = 0.0
  max_d_weight: float = 1e4
  disc_updates: int = 1
  disc_loss: str = "hinge"
  gen_loss: str = "vanilla"
  aug_prob: float = 1.0
  cutout: float = 0.0
  noise_tau: float = 0.8
  train_pos_embed: bool = True

  @property
  def lpips_on(self) -> bool:
    return self.perceptual_weight > 0.0

  @property
  def gan_on(self) -> bool:
    return self.disc_weight > 0.0


def disc_variables(dino: Any, heads: Any, spectral: Any) -> dict:
  """The discriminator's variables: the frozen DINO ViT, the heads, their spectral vectors."""
  variables = {"params": {"dino": dino, **heads}}
  if spectral:
    variables[SPECTRAL] = spectral
  return variables


def augment(s: LossSettings, draws: Any, x: jax.Array) -> jax.Array:
  return apply_diffaug(x, draws, s.aug_prob, s.cutout)


def reconstruction_loss(s: LossSettings, recon: jax.Array, x: jax.Array,
                        lpips: Optional[Callable] = None) -> tuple[jax.Array, dict]:
  """(l1_weight * L1 + perceptual_weight * LPIPS, {'l1'[, 'lpips']}); `lpips(a, b)` on [-1, 1]
  images, None while the term is off."""
  l1 = gan.l1_loss(recon, x)
  aux = {"l1": l1}
  total = s.l1_weight * l1
  if lpips is not None:
    lp = lpips(recon * 2.0 - 1.0, x * 2.0 - 1.0)
    total = total + s.perceptual_weight * lp
    aux["lpips"] = lp
  return total, aux


def gan_generator_loss(s: LossSettings, recon: jax.Array, disc: DinoDiscriminator,
                       d_vars: dict, g_aug: Any) -> jax.Array:
  """The generator's GAN loss of `recon` ([0, 1]); D in eval mode (stored spectral vectors, as the
  reference's disc.eval())."""
  g_loss_fn = gan.select_gan_losses(s.disc_loss, s.gen_loss)[1]
  return g_loss_fn(disc.apply(d_vars, augment(s, g_aug, recon * 2.0 - 1.0)))


def generator_objective(s: LossSettings, recon: jax.Array, x: jax.Array, *,
                        lpips: Optional[Callable] = None,
                        gan_loss: Optional[Callable] = None) -> jax.Array:
  """rec + disc_weight * G at adaptive weight 1: the forward the step differentiates, for
  estimates that need its saved activations but not the weight (a stop-gradient scalar)."""
  rec, _ = reconstruction_loss(s, recon, x, lpips)
  return rec if gan_loss is None else rec + s.disc_weight * gan_loss(recon)


def generator_terms(s: LossSettings, recon: jax.Array, x: jax.Array, *,
                    lpips: Optional[Callable] = None, gan_loss: Optional[Callable] = None):
  """(rec, aux, d rec / d recon, G, d G / d recon); G and its gradient are None without the GAN
  term. The gradients are w.r.t. the reconstruction: the caller pulls them back through the
  decoder (each term's last-layer part for the adaptive weight, see `combine_generator`)."""
  (rec, aux), g_rec = jax.value_and_grad(
      lambda xh: reconstruction_loss(s, xh, x, lpips), has_aux=True)(recon)
  if gan_loss is None:
    return rec, aux, g_rec, None, None
  g_val, g_gan = jax.value_and_grad(gan_loss)(recon)
  return rec, aux, g_rec, g_val, g_gan


def last_layer(grads: Any) -> Any:
  for name in LAST_LAYER:
    grads = grads[name]
  return grads


def combine_generator(s: LossSettings, rec, g_val, rec_grad, gan_grad, rec_last, gan_last):
  """(total loss, rec_grad + disc_weight * d_weight * gan_grad, d_weight). The gradients may be
  w.r.t. the reconstruction or the decoder's parameters (the loss is linear in them);
  `rec_last` / `gan_last` are the two terms' last-layer gradients."""
  d_weight = gan.adaptive_weight_from_grads(rec_last, gan_last, s.max_d_weight)
  scale = s.disc_weight * d_weight
  grads = jax.tree.map(lambda r, g: r + scale * g, rec_grad, gan_grad)
  return rec + scale * g_val, grads, d_weight


def discriminator_update(s: LossSettings, disc: DinoDiscriminator,
                         disc_tx: optax.GradientTransformation,
                         disc_lr: Optional[optax.Schedule], dino: Any, extra: dict,
                         fake: jax.Array, real: jax.Array, d_aug: Any) -> tuple[dict, dict]:
  """`s.disc_updates` updates of the discriminator heads on fakes / reals in [-1, 1] (fakes
  already 8-bit quantised, no gradient), DiffAug drawn per update (`d_aug`: {'fake', 'real'},
  leading axis disc_updates). extra: TrainState.extra ('disc', 'spectral', 'disc_opt',
  'disc_step', the D schedule's clock, which like the reference's disc scheduler only advances on
  D updates). Returns (extra, metrics of the last update, as the reference logs)."""
  d_loss_fn = gan.select_gan_losses(s.disc_loss, s.gen_loss)[0]
  zero = jnp.zeros((), jnp.float32)

  def d_update(carry, aug):
    heads, spectral, d_opt, count = carry

    def d_loss(hp):
      lf, lr, new_vars = classify_pair(disc, disc_variables(dino, hp, spectral),
                                       augment(s, aug["fake"], fake), augment(s, aug["real"], real),
                                       train=True)
      out = (new_vars.get(SPECTRAL, {}), gan.disc_accuracy(lr, lf), jnp.mean(lr), jnp.mean(lf))
      return d_loss_fn(lr, lf), out

    (dl, (spectral, acc, m_real, m_fake)), g = jax.value_and_grad(d_loss, has_aux=True)(heads)
    upd, d_opt = disc_tx.update(g, d_opt, heads)
    heads = optax.apply_updates(heads, upd)
    lr_now = jnp.asarray(disc_lr(count), jnp.float32) if disc_lr is not None else zero
    m = dict(d_loss=dl, disc_acc=acc, logits_real=m_real, logits_fake=m_fake, d_lr=lr_now)
    return (heads, spectral, d_opt, count + 1), m

  carry = (extra["disc"], extra.get("spectral", {}), extra["disc_opt"], extra["disc_step"])
  if s.disc_updates == 1:  # the official recipe; no loop to compile
    (heads, spectral, d_opt, count), d_ms = d_update(carry, jax.tree.map(lambda a: a[0], d_aug))
    d_ms = jax.tree.map(lambda v: v[None], d_ms)
  else:
    (heads, spectral, d_opt, count), d_ms = jax.lax.scan(d_update, carry, d_aug)
  extra = {**extra, "disc": heads, "disc_opt": d_opt, "disc_step": count}
  if spectral:
    extra["spectral"] = spectral
  return extra, {k: v[-1] for k, v in d_ms.items()}


DISC_METRICS = ("d_loss", "disc_acc", "logits_real", "logits_fake", "d_lr")
