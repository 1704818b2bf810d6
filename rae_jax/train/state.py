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


def init_train_state(init_params: Optional[Callable[[jax.Array], Any]],
                     tx: optax.GradientTransformation, init_rng: jax.Array, train_rng: jax.Array,
                     mesh: Mesh, *, init_extra: Optional[Callable[[jax.Array], dict]] = None,
                     params: Any = None, min_size: int = 1024) -> tuple[TrainState, TrainState]:
  """Initialises the state directly in its sharded layout (no full copy on one device).

  init_params(init_rng) -> params (e.g. lambda k: model.init(k, ...)['params']). Imported weights
  go in as `params` (arrays): they are placed in their FSDP shardings and passed to the jitted
  init as an argument. A closure would bake them into the executable as constants (the program
  grows by the model's size) and fails on several hosts for arrays spanning other processes.
  Returns (state, shardings); the shardings are what make_train_step and the checkpointer need.
  """
  init, args, shardings = init_program(init_params, tx, init_rng, train_rng, mesh,
                                       init_extra=init_extra, params=params, min_size=min_size)
  sharding_lib.log_replication('train state', jax.eval_shape(init, *args), shardings)
  return init(*args), shardings


def init_program(init_params: Optional[Callable[[jax.Array], Any]],
                 tx: optax.GradientTransformation, init_rng: jax.Array, train_rng: jax.Array,
                 mesh: Mesh, *, init_extra: Optional[Callable[[jax.Array], dict]] = None,
                 params: Any = None, min_size: int = 1024):
  """(jitted init, its arguments, state shardings): init_train_state without running it."""
  if (init_params is None) == (params is None):
    raise ValueError('init_train_state: give exactly one of init_params (a function) and params '
                     '(imported arrays).')

  def create(key, given):
    extra = init_extra(jax.random.fold_in(key, 1)) if init_extra is not None else None
    p = init_params(key) if given is None else given
    return create_train_state(p, tx, train_rng, extra)
  abstract = jax.eval_shape(create, init_rng, params)
  shardings = state_shardings(abstract, mesh, min_size=min_size)
  rep = NamedSharding(mesh, P())
  if params is not None:
    params = jax.device_put(params, shardings.params)
  init = jax.jit(create, in_shardings=(rep, None if params is None else shardings.params),
                 out_shardings=shardings)
  return init, (init_rng, params), shardings


def abstract_state(state_or_fn, shardings: TrainState, *args) -> TrainState:
  """ShapeDtypeStructs with shardings, from a state or from a state-building function."""
  abstract = jax.eval_shape(state_or_fn, *args) if callable(state_or_fn) else state_or_fn
  return sharding_lib.abstract_with_shardings(abstract, shardings)

