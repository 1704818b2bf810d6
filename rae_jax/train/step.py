"""Generic jitted train step: loss -> grads (micro-batch scan) -> AdamW -> EMA.

One call is one optimizer update. Gradient accumulation runs as a lax.scan over micro-batches
inside the step, so the update count, the schedule and the checkpoints do not depend on it.
The step's key is fold_in(state.rng, state.step) and random numbers are drawn for the global
batch (threefry is partitionable), so results do not depend on the number of devices.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from rae_jax.train.ema import ema_update
from rae_jax.train.state import TrainState

# loss_fn(params, batch, key[, frozen]) -> (per-example loss (B,), aux dict of arrays)
LossFn = Callable[..., tuple[jax.Array, dict]]


def _mean_aux(aux: dict) -> dict:
  return {k: jnp.mean(jnp.asarray(v, jnp.float32)) for k, v in aux.items()}


def _split_micro(batch: Any, accum_steps: int, batch_sharding: NamedSharding) -> Any:
  """(B, ...) -> (accum, B / accum, ...), micro-batch j = rows j, j + accum, ...

  Strided rows keep every micro-batch spread over all batch shards (no data movement when
  B / accum is divisible by the number of shards).
  """
  def one(x):
    b = x.shape[0]
    if b % accum_steps:
      raise ValueError(f'train step: global batch {b} is not divisible by '
                       f'accum_steps={accum_steps}.')
    x = x.reshape((b // accum_steps, accum_steps) + x.shape[1:])
    x = jnp.moveaxis(x, 1, 0)
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(batch_sharding.mesh, P(None, *batch_sharding.spec)))
  return jax.tree.map(one, batch)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    ema_decay: float, state_shardings: TrainState,
                    batch_sharding: NamedSharding, accum_steps: int = 1, *,
                    lr_schedule: Optional[optax.Schedule] = None,
                    frozen_shardings: Any = None, donate: bool = True):
  """Returns step(state, batch[, frozen]) -> (state, metrics), jitted with explicit shardings.

  `frozen` (optional) is a pytree of non-trained arrays (e.g. the RAE encoder params) passed
  to loss_fn as a 4th argument; it is an argument rather than a closure so it is not baked into
  the executable as constants. Metrics: loss, grad_norm (before clipping), lr (if
  lr_schedule is given, the rate used by this update) and the batch-mean of each aux entry.
  """
  if accum_steps < 1:
    raise ValueError(f'accum_steps must be >= 1, got {accum_steps}.')
  mesh = batch_sharding.mesh
  with_frozen = frozen_shardings is not None

  def mean_loss(params, batch, key, frozen):
    args = (params, batch, key) + ((frozen,) if with_frozen else ())
    per_example, aux = loss_fn(*args)
    loss = jnp.mean(per_example.astype(jnp.float32))
    return loss, _mean_aux(aux)

  grad_fn = jax.value_and_grad(mean_loss, has_aux=True)

  def step(state: TrainState, batch: Any, frozen: Any = None):
    key = jax.random.fold_in(state.rng, state.step)
    if accum_steps == 1:
      (loss, aux), grads = grad_fn(state.params, batch, key, frozen)
    else:
      micro = _split_micro(batch, accum_steps, batch_sharding)
      constrain = lambda g: jax.lax.with_sharding_constraint(g, state_shardings.params)  # noqa: E731
      zeros = constrain(jax.tree.map(jnp.zeros_like, state.params))
      aux_shape = jax.eval_shape(
          lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), key, frozen))
      aux_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape[0][1])

      def body(carry, xs):
        g_acc, l_acc, a_acc = carry
        j, mb = xs
        (l, a), g = grad_fn(state.params, mb, jax.random.fold_in(key, j), frozen)
        g_acc = jax.tree.map(jnp.add, g_acc, constrain(g))
        a_acc = jax.tree.map(jnp.add, a_acc, a)
        return (g_acc, l_acc + l, a_acc), None

      (grads, loss, aux), _ = jax.lax.scan(
          body, (zeros, jnp.zeros((), jnp.float32), aux_zeros),
          (jnp.arange(accum_steps), micro))
      inv = 1.0 / accum_steps
      grads = jax.tree.map(lambda g: g * inv, grads)
      loss = loss * inv
      aux = jax.tree.map(lambda a: a * inv, aux)
    grads = jax.lax.with_sharding_constraint(grads, state_shardings.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params,
                              ema_params=ema_update(state.ema_params, params, ema_decay),
                              opt_state=opt_state)
    metrics = {'loss': loss, 'grad_norm': grad_norm, **aux}
    if lr_schedule is not None:
      metrics['lr'] = jnp.asarray(lr_schedule(state.step), jnp.float32)
    return new_state, metrics

  replicated = NamedSharding(mesh, P())
  in_shardings = (state_shardings, batch_sharding)
  if with_frozen:
    in_shardings += (frozen_shardings,)
    fn = step
  else:
    fn = lambda state, batch: step(state, batch)  # noqa: E731
  return jax.jit(fn, in_shardings=in_shardings, out_shardings=(state_shardings, replicated),
                 donate_argnums=(0,) if donate else ())
