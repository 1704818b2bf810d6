"""Generic jitted train step: loss -> grads (micro-batch scan) -> AdamW -> EMA.

One call is one optimizer update. Gradient accumulation runs as a lax.scan over micro-batches
inside the step, so the update count, the schedule and the checkpoints do not depend on it.
The step's key is fold_in(state.rng, state.step) and random numbers are drawn for the global
batch (threefry is partitionable), so results do not depend on the number of devices.

Draws are explicit: `draw_fn(key, batch)` makes every random input of the loss, and the loss is a
pure function of (params, batch, draws[, frozen]). The same jitted step accepts recorded draws
instead (`step(state, batch, frozen, draws=...)`), which is how the official training trajectories
are replayed in tests: there is no second, test-only step.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from rae_jax.train import mesh as mesh_lib
from rae_jax.train.ema import ema_update
from rae_jax.train.state import TrainState

# loss_fn(params, batch, draws[, frozen]) -> (per-example loss (B,), aux dict of arrays)
LossFn = Callable[..., tuple[jax.Array, dict]]
# draw_fn(key, batch) -> draws (any pytree); the default passes the key itself as the draws
DrawFn = Callable[[jax.Array, Any], Any]
# grads_fn(params, batch, draws, frozen, extra) -> ((loss, aux scalars), grads): a loss whose
# gradient is not plain autodiff of one scalar (stage 1's adaptive GAN weight); `grads` is a
# params-shaped tree, or a dict of them ("parts") that `finish_grads` combines after accumulation
GradsFn = Callable[..., tuple[tuple[jax.Array, dict], Any]]


def _key_as_draws(key: jax.Array, batch: Any) -> jax.Array:
  del batch
  return key


class TrainStep:
  """step(state, batch, frozen=None, draws=None) -> (state, metrics); `.lower` for inspection."""

  def __init__(self, jitted, with_frozen: bool):
    self.jitted = jitted
    self._with_frozen = with_frozen

  def _args(self, state, batch, frozen, draws):
    if self._with_frozen and frozen is None:
      raise ValueError("this train step needs its `frozen` argument")
    return state, batch, frozen if self._with_frozen else None, draws

  def __call__(self, state, batch, frozen=None, draws=None):
    return self.jitted(*self._args(state, batch, frozen, draws))

  def lower(self, state, batch, frozen=None, draws=None):
    return self.jitted.lower(*self._args(state, batch, frozen, draws))


# v / 255 for every byte, divided on the host: XLA turns a division by a constant into a
# multiplication (1 ulp off), a table keeps device and host paths bit-identical.
_UNIT_FLOAT = np.arange(256, dtype=np.float32) / np.float32(255.0)


def images_to_unit_float(batch: Any) -> Any:
  """uint8 'image' leaves (sent as bytes: 4x less host-to-device traffic) -> float32 in [0, 1],
  bit-identical to the host path (data.transforms.to_unit_float)."""
  if isinstance(batch, dict) and getattr(batch.get('image'), 'dtype', None) == jnp.uint8:
    batch = dict(batch, image=jnp.asarray(_UNIT_FLOAT)[batch['image'].astype(jnp.int32)])
  return batch


def _mean_aux(aux: dict) -> dict:
  return {k: jnp.mean(jnp.asarray(v, jnp.float32)) for k, v in aux.items()}


def split_micro(batch: Any, accum_steps: int, batch_sharding: NamedSharding) -> Any:
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


def _accumulate(grad_fn, micro: Any, given: Any, micro_draws: Callable, accum_steps: int,
                constrain: Callable) -> tuple[jax.Array, dict, Any]:
  """Means of (loss, aux, grads) over the micro-batches (leading axis accum_steps), one lax.scan;
  grad_fn(micro_batch, draws) -> ((loss, aux), grads)."""
  first = lambda t: None if t is None else jax.tree.map(lambda x: x[0], t)  # noqa: E731
  shapes = jax.eval_shape(
      lambda: grad_fn(first(micro), micro_draws(0, first(micro), first(given))))
  zeros_of = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)  # noqa: E731
  zeros = constrain(zeros_of(shapes[1]))
  aux_zeros = zeros_of(shapes[0][1])

  def body(carry, xs):
    g_acc, l_acc, a_acc = carry
    j, mb, given_j = xs
    (l, a), g = grad_fn(mb, micro_draws(j, mb, given_j))
    g_acc = jax.tree.map(jnp.add, g_acc, constrain(g))
    a_acc = jax.tree.map(jnp.add, a_acc, a)
    return (g_acc, l_acc + l, a_acc), None

  (grads, loss, aux), _ = jax.lax.scan(
      body, (zeros, jnp.zeros((), jnp.float32), aux_zeros),
      (jnp.arange(accum_steps), micro, given))
  inv = 1.0 / accum_steps
  return loss * inv, jax.tree.map(lambda a: a * inv, aux), jax.tree.map(lambda g: g * inv, grads)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    ema_decay: float, state_shardings: TrainState,
                    batch_sharding: NamedSharding, accum_steps: int = 1, *,
                    lr_schedule: Optional[optax.Schedule] = None,
                    frozen_shardings: Any = None, draw_fn: Optional[DrawFn] = None,
                    donate: bool = True, grads_fn: Optional[GradsFn] = None,
                    finish_grads: Optional[Callable] = None,
                    split_draws: Optional[Callable] = None,
                    after_update: Optional[Callable] = None) -> TrainStep:
  """Returns step(state, batch[, frozen][, draws]) -> (state, metrics), jitted with shardings.

  `frozen` (optional) is a pytree of non-trained arrays (e.g. the RAE encoder params) passed
  to loss_fn as a 4th argument; it is an argument rather than a closure so it is not baked into
  the executable as constants. `draws` (optional, replicated) replaces draw_fn's output; with
  gradient accumulation its leaves must be batch-leading (they are split like the batch).
  Metrics (float32 scalars): loss, grad_norm (before clipping), lr (if lr_schedule is given,
  the rate used by this update) and the batch-mean of each aux entry.

  Losses that are more than autodiff of one scalar (stage 1) plug in here, and so share the
  accumulation, optimizer, EMA, shardings and donation:
    grads_fn(params, batch, draws, frozen, extra) -> ((loss, aux), grads) replaces loss_fn's
      value_and_grad (one micro-batch; extra is state.extra, read-only);
    finish_grads(loss, aux, grads) -> (loss, aux, grads) runs once on the micro-batch means
      (e.g. combining gradient parts with a weight that needs the whole batch);
    split_draws(draws, accum_steps, batch_sharding) splits given draws into micro-batches
      (default: `split_micro`, for batch-leading leaves);
    after_update(state, params, batch, draws, frozen) -> (params, extra, metrics) runs after the
      optimizer update on the whole batch (draws: the given ones or draw_fn's of the whole
      batch), before the EMA: stage 1's discriminator update.
  """
  if accum_steps < 1:
    raise ValueError(f'accum_steps must be >= 1, got {accum_steps}.')
  mesh = batch_sharding.mesh
  with_frozen = frozen_shardings is not None
  draw = draw_fn or _key_as_draws
  split_draws = split_draws or split_micro

  def mean_loss(params, batch, draws, frozen):
    args = (params, batch, draws) + ((frozen,) if with_frozen else ())
    per_example, aux = loss_fn(*args)
    loss = jnp.mean(per_example.astype(jnp.float32))
    return loss, _mean_aux(aux)

  if grads_fn is None:
    value_and_grad = jax.value_and_grad(mean_loss, has_aux=True)
    grads_fn = lambda p, b, d, f, extra: value_and_grad(p, b, d, f)  # noqa: E731

  def constrain(g):  # a gradient, or a dict of gradient parts
    if jax.tree.structure(g) == jax.tree.structure(state_shardings.params):
      return jax.lax.with_sharding_constraint(g, state_shardings.params)
    return {k: jax.lax.with_sharding_constraint(v, state_shardings.params) for k, v in g.items()}

  def step(state: TrainState, batch: Any, frozen: Any, draws: Any):
    batch = images_to_unit_float(batch)
    key = jax.random.fold_in(state.rng, state.step)
    grad_fn = lambda p, b, d, f: grads_fn(p, b, d, f, state.extra)  # noqa: E731
    if accum_steps == 1 or after_update is not None:
      whole_draws = draw(key, batch) if draws is None else draws
    if accum_steps == 1:
      (loss, aux), grads = grad_fn(state.params, batch, whole_draws, frozen)
    else:
      micro = split_micro(batch, accum_steps, batch_sharding)
      given = None if draws is None else split_draws(draws, accum_steps, batch_sharding)
      micro_draws = lambda j, mb, given_j: (  # noqa: E731
          draw(jax.random.fold_in(key, j), mb) if given_j is None else given_j)
      loss, aux, grads = _accumulate(
          lambda mb, d: grad_fn(state.params, mb, d, frozen), micro, given, micro_draws,
          accum_steps, constrain)
    if finish_grads is not None:
      loss, aux, grads = finish_grads(loss, aux, grads)
    grads = jax.lax.with_sharding_constraint(grads, state_shardings.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'grad_norm': grad_norm, **aux}
    if lr_schedule is not None:
      metrics['lr'] = jnp.asarray(lr_schedule(state.step), jnp.float32)
    extra = state.extra
    if after_update is not None:
      params, extra, more = after_update(state, params, batch, whole_draws, frozen)
      metrics.update(more)
    new_state = state.replace(step=state.step + 1, params=params,
                              ema_params=ema_update(state.ema_params, params, ema_decay),
                              opt_state=opt_state, extra=extra)
    return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

  replicated = NamedSharding(mesh, P())
  in_shardings = (state_shardings, batch_sharding,
                  frozen_shardings if with_frozen else replicated, replicated)
  jitted = jax.jit(mesh_lib.traced_under(mesh, step), in_shardings=in_shardings,
                   out_shardings=(state_shardings, replicated),
                   donate_argnums=(0,) if donate else ())
  return TrainStep(jitted, with_frozen)
