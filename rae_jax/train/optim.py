"""AdamW with the official RAE learning-rate schedules, torch-style grad clipping.

The official schedule is a LambdaLR stepped once per optimizer update, so the k-th update
(k = 0, 1, ...) uses base_lr * f(k); optax's schedule count has the same meaning.

Official semantics (utils/optim_utils.py):
- warmup_steps = int(warmup_epochs * steps_per_epoch),
  decay_end_steps = max(int(decay_end_epoch * steps_per_epoch), warmup_steps).
- warmup: f(k) = (k + 1) / warmup_steps if warmup_from_zero else 1 (a constant base_lr: the
  stage-2 recipes do not ramp up, they hold base_lr for 40 epochs, then decay).
- after warmup, with p = (k - warmup_steps) / max(decay_end_steps - warmup_steps, 1):
  linear f = 1 - (1 - r) p, cosine f = r + (1 - r) (1 + cos(pi p)) / 2, r = final_lr / base_lr;
  f = r from decay_end_steps on.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


def steps_per_epoch(dataset_size: int, global_batch_size: int, accum_steps: int = 1) -> int:
  """Optimizer updates per epoch with drop_last batching (as the official DataLoader)."""
  if global_batch_size <= 0:
    raise ValueError(f'global_batch_size must be positive, got {global_batch_size}.')
  steps = dataset_size // global_batch_size
  if steps <= 0:
    raise ValueError(f'dataset of {dataset_size} examples is smaller than one global batch of '
                     f'{global_batch_size}: zero optimizer steps per epoch.')
  del accum_steps  # The global batch already includes all micro-batches of one update.
  return steps


def lr_schedule(base_lr: float, final_lr: float, warmup_steps: int, decay_end_steps: int,
                kind: str = 'linear', warmup_from_zero: bool = False) -> optax.Schedule:
  """The official LambdaLR schedule as an optax schedule of the update count."""
  kind = kind.lower()
  if kind not in ('linear', 'cosine'):
    raise ValueError(f"optim.schedule: unsupported '{kind}', choose 'linear' or 'cosine'.")
  warmup_steps = max(int(warmup_steps), 0)
  decay_end_steps = max(int(decay_end_steps), warmup_steps)
  total_decay = max(decay_end_steps - warmup_steps, 1)
  ratio = final_lr / base_lr if base_lr > 0 else 1.0

  def schedule(count):
    k = jnp.asarray(count, jnp.float32)
    if warmup_from_zero and warmup_steps > 0:
      warm = (k + 1.0) / warmup_steps
    else:
      warm = jnp.ones_like(k)
    progress = (k - warmup_steps) / total_decay
    if kind == 'linear':
      decay = 1.0 - (1.0 - ratio) * progress
    else:
      decay = ratio + (1.0 - ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    factor = jnp.where(k < warmup_steps, warm,
                       jnp.where(k >= decay_end_steps, ratio, decay))
    return base_lr * factor
  return schedule


def lr_schedule_from_epochs(base_lr: float, final_lr: float, warmup_epochs: float,
                            decay_end_epoch: float, steps_per_epoch: int, kind: str = 'linear',
                            warmup_from_zero: bool = False) -> optax.Schedule:
  """Epoch-based official config -> step-based schedule (truncation as the official int())."""
  warmup = int(warmup_epochs * steps_per_epoch)
  decay_end = int(decay_end_epoch * steps_per_epoch)
  return lr_schedule(base_lr, final_lr, warmup, decay_end, kind, warmup_from_zero)


class ClipState(NamedTuple):
  pass


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
  """torch.nn.utils.clip_grad_norm_: g * min(1, max_norm / (||g|| + 1e-6))."""

  def init_fn(params):
    del params
    return ClipState()

  def update_fn(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state
  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(learning_rate: optax.ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8, weight_decay: float = 0.0,
                   clip_grad: Optional[float] = 1.0) -> optax.GradientTransformation:
  """torch.optim.AdamW (decoupled decay on all params) after optional global-norm clipping.

  clip_grad None or <= 0 disables clipping, as in the official scripts (stage 1 uses 0.0).
  """
  adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if clip_grad is None or clip_grad <= 0:
    return adamw
  return optax.chain(clip_by_global_norm_torch(float(clip_grad)), adamw)


def official_stage2_schedule(steps_per_epoch: int, base_lr: float = 2e-4, final_lr: float = 2e-5,
                             warmup_epochs: float = 40, decay_end_epoch: float = 800):
  """DiTDH recipes: constant 2e-4 for 40 epochs, linear to 2e-5 at epoch 800, then flat."""
  return lr_schedule_from_epochs(base_lr, final_lr, warmup_epochs, decay_end_epoch,
                                 steps_per_epoch, 'linear', warmup_from_zero=False)


def official_stage1_schedule(steps_per_epoch: int, base_lr: float = 2e-4, final_lr: float = 2e-5,
                             warmup_epochs: float = 1, decay_end_epoch: float = 16):
  """Decoder recipe: linear ramp from ~0 over 1 epoch, cosine to 2e-5 at epoch 16."""
  return lr_schedule_from_epochs(base_lr, final_lr, warmup_epochs, decay_end_epoch,
                                 steps_per_epoch, 'cosine', warmup_from_zero=True)


__all__ = ['steps_per_epoch', 'lr_schedule', 'lr_schedule_from_epochs', 'make_optimizer',
           'clip_by_global_norm_torch', 'official_stage1_schedule', 'official_stage2_schedule']
