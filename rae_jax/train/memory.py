"""Per-device memory estimate of a train step, from shapes alone (before compiling it).

A pod run that does not fit should fail at start with the numbers and the fields that shrink
them, not after minutes of compilation with an allocator error. The activation part is what the
backward pass keeps: the residuals of jax.vjp, read off an abstract trace (jax.eval_shape), so it
follows the model's remat policy exactly; the state part is each array's bytes over its shards.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import numpy as np

from rae_jax.train import sharding as sharding_lib

# Fields that reduce the estimate, named in the error.
REDUCE_HINT = ('model.remat=True with remat_policy="nothing_saveable" (or decoder.remat), '
               'a larger stage*.grad_accum_steps, a smaller stage*.global_batch_size, '
               'compute_dtype="bfloat16", or more devices on mesh.fsdp')


def _nbytes(tree: Any) -> int:
  return int(sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def residual_bytes(fn: Callable[..., Any], params: Any, *args, exclude: Any = None) -> int:
  """Bytes the backward pass of fn(params, *args) keeps, for the given (abstract) inputs.

  Counts the leaves of the vjp closure, which hold every saved residual (remat policies apply);
  the parameters it references are excluded (they are counted with the train state), and so are
  leaves shaped like those of `exclude` (frozen weights, counted separately).
  """
  def residuals(p, *a):
    return jax.vjp(lambda q: fn(q, *a), p)[1]
  saved = jax.eval_shape(residuals, params, *args)
  param_ids = {(tuple(np.shape(x)), np.dtype(x.dtype))
               for x in jax.tree.leaves((params, exclude))}
  return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(saved)
                 if (tuple(x.shape), np.dtype(x.dtype)) not in param_ids))


# Remat settings from least to most recompute (None: remat off). A policy later in the list
# recomputes more in the backward pass and keeps fewer activations.
RECOMPUTE_ORDER = (None, 'dots_saveable', 'dots_with_no_batch_dims_saveable',
                   'save_attention_out', 'nothing_saveable')
# Per-chip HBM of the pod targets the recipes plan for (GiB).
CHIP_GIB = {'v5e': 16, 'v4': 32, 'v5p': 95}


def least_recompute(totals: dict, limit: int, headroom: float = 0.9) -> Optional[str]:
  """The first of RECOMPUTE_ORDER whose estimated total (bytes) fits `headroom` of `limit`;
  'none fits' when even nothing_saveable does not (then grad accumulation or more chips)."""
  for policy in RECOMPUTE_ORDER:
    if policy in totals and totals[policy] <= headroom * limit:
      return 'remat off' if policy is None else policy
  return 'none fits'


def device_memory_bytes(device: Optional[jax.Device] = None) -> Optional[int]:
  """The allocator's limit on an accelerator; None where unknown (CPU)."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001  (backends without memory stats)
    return None
  return int(stats['bytes_limit']) if stats and 'bytes_limit' in stats else None


def estimate(abstract_state: Any, state_shardings: Any, activation_bytes_global: int,
             batch_shards: int, accum_steps: int = 1) -> dict:
  """Per-device bytes: train state (sharded), gradients (like params), saved activations."""
  state = sharding_lib.replication_report(abstract_state, state_shardings)['per_device_bytes']
  grads = sharding_lib.replication_report(abstract_state.params,
                                          state_shardings.params)['per_device_bytes']
  acts = activation_bytes_global // max(batch_shards * accum_steps, 1)
  return dict(state=state, grads=grads, activations=acts, total=state + grads + acts)


def check_fits(est: dict, limit: Optional[int], *, what: str = 'train step',
               headroom: float = 0.9) -> None:
  """Raises before compiling when the estimate exceeds `headroom` of the device memory."""
  if limit is None or est['total'] <= headroom * limit:
    return
  gib = lambda b: f'{b / 2**30:.2f} GiB'  # noqa: E731
  raise MemoryError(
      f'{what}: estimated {gib(est["total"])} per device (state {gib(est["state"])}, gradients '
      f'{gib(est["grads"])}, saved activations {gib(est["activations"])}) exceeds '
      f'{headroom:.0%} of the device memory {gib(limit)}. Reduce it with: {REDUCE_HINT}.')


def check_train_step(loss_fn: Callable[..., Any], draw_fn: Callable[..., Any],
                     abstract_state: Any, state_shardings: Any, micro_batch: Any, frozen: Any,
                     *, batch_shards: int, accum_steps: int = 1,
                     limit: Optional[int] = -1, what: str = 'train step') -> dict:
  """Estimates a step of loss_fn(params, batch, draws, frozen) and fails if it cannot fit.

  micro_batch: ShapeDtypeStructs of one global micro-batch. limit=-1: this device's memory.
  Returns the estimate (logged by the caller).
  """
  def loss(p, b, f):
    draws = draw_fn(jax.random.PRNGKey(0), b)
    per_example, _ = loss_fn(p, b, draws, f)
    return per_example.mean()
  acts = residual_bytes(loss, abstract_state.params, micro_batch, frozen)
  est = estimate(abstract_state, state_shardings, acts, batch_shards)
  check_fits(est, device_memory_bytes() if limit == -1 else limit, what=what)
  del accum_steps  # micro_batch is already one micro-batch
  return est
