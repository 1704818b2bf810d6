"""Stage-1 loss pieces (official `disc/gan_loss.py` and `train_stage1.py`): GAN losses, L1 and the
adaptive GAN weight, all pure and jit-able; `decoder_loss.py` combines them."""
from __future__ import annotations

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
