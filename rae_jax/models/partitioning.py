"""Where the models meet the mesh: activation pins and per-device kernels, active only when a
step is traced under a mesh (train/step.py and the stage-1 step trace under its abstract mesh).

Without a mesh every function here is the identity, so single-device use and parity tests are
unchanged.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # mesh axes the batch is split over (train/mesh.py)


def batch_axes() -> tuple[tuple[str, ...], int]:
  """(batch axes of the current abstract mesh, number of batch shards); ((), 1) without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return (), 1
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return axes, int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins activations to batch sharding over ('data', 'fsdp').

  Inside nn.scan the partitioner loses the batch sharding of the carry and all-gathers whole
  global-batch activations in every layer (~97 GiB per device per step for DiTDH-XL at batch
  1024 on 64 devices); per-sample conditioning and the discriminator heads' weight-gradient
  convs gather the batch too. The constraint keeps them split. A batch the mesh does not divide
  is left alone.
  """
  axes, shards = batch_axes()
  if shards <= 1 or x.shape[0] % shards:
    return x
  return jax.lax.with_sharding_constraint(x, P(axes))


def replicate(x: jax.Array) -> jax.Array:
  """Pins a (small) weight whole on every device, as FSDP gathers it anyway."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, P())


def per_batch_shard(fn: Callable, batch: int) -> Callable:
  """`fn` applied to each device's slice of the batch (shard_map), for kernels XLA cannot
  partition (a Pallas/Mosaic call); `fn` itself when no mesh splits the batch."""
  axes, shards = batch_axes()
  if shards <= 1:
    return fn
  if batch % shards:
    raise ValueError(f"a per-device kernel needs the batch ({batch}) to divide into the "
                     f"mesh's {shards} batch shards {dict(jax.sharding.get_abstract_mesh().shape)}")
  spec = P(axes)
  # check_vma=False: Pallas outputs carry no varying-axes annotation (the kernel is per device).
  return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=spec, out_specs=spec,
                       check_vma=False)
