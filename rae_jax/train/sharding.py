"""FSDP sharding rule: split each array on its largest dimension divisible by the fsdp size.

The rule depends only on shapes, so it works on abstract trees (jax.eval_shape) before any
parameter exists, and Adam moments and EMA copies get the same layout as their parameters.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

FSDP_AXIS = 'fsdp'


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, *, axis: str = FSDP_AXIS,
              min_size: int = 0) -> P:
  """PartitionSpec putting `axis` on the largest dimension divisible by `fsdp_size`.

  Scalars, arrays with fewer than `min_size` elements and arrays with no divisible dimension
  are replicated. Ties go to the earliest dimension (deterministic across runs).
  """
  if fsdp_size <= 1 or len(shape) == 0 or int(np.prod(shape)) < min_size:
    return P()
  best = None
  for dim, size in enumerate(shape):
    if size % fsdp_size == 0 and size >= fsdp_size and (best is None or size > shape[best]):
      best = dim
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = axis
  return P(*spec)


def fsdp_shardings(tree: Any, mesh: Mesh, *, axis: str = FSDP_AXIS, min_size: int = 0) -> Any:
  """NamedSharding pytree for `tree` (arrays or jax.ShapeDtypeStruct leaves)."""
  fsdp_size = mesh.shape[axis]

  def one(x):
    return NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), fsdp_size, axis=axis,
                                         min_size=min_size))
  return jax.tree.map(one, tree)


def replicated_shardings(tree: Any, mesh: Mesh) -> Any:
  """Everything replicated (small frozen modules, RNG keys, counters)."""
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry their target sharding (orbax restore, jit lowering)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
      abstract_tree, shardings)


def describe(tree: Any) -> str:
  """One line per array: path, shape, partition spec (for logs and debugging)."""
  lines = []
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    spec = getattr(getattr(x, 'sharding', None), 'spec', None)
    lines.append(f'{jax.tree_util.keystr(path)} {tuple(np.shape(x))} {spec}')
  return '\n'.join(lines)
