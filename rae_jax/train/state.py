"""Train state pytree, its shardings, and sharded initialisation.

`rng` is the run's base key: the key of step s is fold_in(rng, s), so it never has to be
updated and a resumed run draws exactly the keys an uninterrupted one would.
`extra` holds further trainable collections (e.g. a GAN discriminator and its optimizer state),
sharded by the same rule and checkpointed with the rest.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rae_jax.train import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
  extra: Any = flax.struct.field(default_factory=dict)


def create_train_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array,
                       extra: Optional[dict] = None) -> TrainState:
  """Fresh state; the EMA starts as a copy of the initial parameters (as the official code)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                    rng=jnp.asarray(rng), extra={} if extra is None else extra)


def state_shardings(abstract_state: TrainState, mesh: Mesh, *,
                    min_size: int = 1024) -> TrainState:
  """FSDP rule for params/EMA/optimizer/extra; step and rng replicated."""
  rep = NamedSharding(mesh, P())

  def fsdp(tree):
    return sharding_lib.fsdp_shardings(tree, mesh, min_size=min_size)
  return TrainState(step=rep, params=fsdp(abstract_state.params),
                    ema_params=fsdp(abstract_state.ema_params),
                    opt_state=fsdp(abstract_state.opt_state), rng=rep,
                    extra=fsdp(abstract_state.extra))


def init_train_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                     init_rng: jax.Array, train_rng: jax.Array, mesh: Mesh, *,
                     init_extra: Optional[Callable[[jax.Array], dict]] = None,
                     min_size: int = 1024) -> tuple[TrainState, TrainState]:
  """Initialises the state directly in its sharded layout (no full copy on one device).

  init_params(init_rng) -> params (e.g. lambda k: model.init(k, ...)['params']). Returns
  (state, shardings); the shardings are what make_train_step and the checkpointer need.
  """
  def create(key):
    extra = init_extra(jax.random.fold_in(key, 1)) if init_extra is not None else None
    return create_train_state(init_params(key), tx, train_rng, extra)
  abstract = jax.eval_shape(create, init_rng)
  shardings = state_shardings(abstract, mesh, min_size=min_size)
  state = jax.jit(create, out_shardings=shardings)(init_rng)
  return state, shardings


def abstract_state(state_or_fn, shardings: TrainState, *args) -> TrainState:
  """ShapeDtypeStructs with shardings, from a state or from a state-building function."""
  abstract = jax.eval_shape(state_or_fn, *args) if callable(state_or_fn) else state_or_fn
  return sharding_lib.abstract_with_shardings(abstract, shardings)


def param_count(tree: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))
