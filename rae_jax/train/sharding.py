"""FSDP sharding rule: split each array on its largest dimension divisible by the fsdp size.

The rule depends only on shapes, so it works on abstract trees (jax.eval_shape) before any
parameter exists, and Adam moments and EMA copies get the same layout as their parameters.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

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


# Above this fraction of the state's bytes replicated on every device, start-up warns.
REPLICATED_WARN_FRACTION = 0.01


def _num_shards(sharding) -> int:
  spec = getattr(sharding, 'spec', None)
  if spec is None:
    return 1
  n = 1
  for entry in spec:
    for axis in (entry if isinstance(entry, tuple) else (entry,)):
      if axis is not None:
        n *= sharding.mesh.shape[axis]
  return n


def replication_report(abstract_tree: Any, shardings: Any) -> dict:
  """Bytes of the tree: total, replicated (not split at all), and held per device."""
  total = replicated = per_device = 0
  largest = []
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(abstract_tree),
                          jax.tree.leaves(shardings)):
    nbytes = int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
    shards = _num_shards(s)
    total += nbytes
    per_device += nbytes // shards
    if shards == 1:
      replicated += nbytes
      largest.append((nbytes, jax.tree_util.keystr(path), tuple(np.shape(x))))
  largest.sort(reverse=True)
  return dict(total_bytes=total, replicated_bytes=replicated, per_device_bytes=per_device,
              replicated_fraction=replicated / max(total, 1), largest_replicated=largest[:5])


def log_replication(name: str, abstract_tree: Any, shardings: Any, *,
                    warn_fraction: float = REPLICATED_WARN_FRACTION,
                    warn_bytes: int = 2**20) -> dict:
  """Logs replicated bytes per device at start; warns when the FSDP rule left too much whole
  (above `warn_fraction` of the tree and `warn_bytes`: tiny demo models stay quiet)."""
  r = replication_report(abstract_tree, shardings)
  msg = (f'{name}: {r["per_device_bytes"] / 2**20:.1f} MiB per device, '
         f'{r["replicated_bytes"] / 2**20:.2f} MiB replicated on every device '
         f'({100 * r["replicated_fraction"]:.2f}% of {r["total_bytes"] / 2**20:.1f} MiB)')
  if r['replicated_fraction'] > warn_fraction and r['replicated_bytes'] > warn_bytes:
    logging.warning('%s; largest replicated arrays: %s. Choose mesh.fsdp to divide the model '
                    'widths (e.g. a power of two <= 64) and put the other devices on mesh.data.',
                    msg, r['largest_replicated'])
  else:
    logging.info(msg)
  return r


def auto_fsdp_size(num_devices: int, abstract_params: Optional[Any] = None, *,
                   max_fsdp: int = 64, min_size: int = 1024,
                   max_replicated_fraction: float = REPLICATED_WARN_FRACTION) -> int:
  """Largest divisor of `num_devices` <= max_fsdp (that shards `abstract_params`, if given).

  Widths like 1152 = 2^7 * 9 have no dimension divisible by 256, so fsdp = all devices would
  silently replicate qkv/proj/adaLN kernels; a bounded fsdp keeps them split and the remaining
  devices do data parallelism (whose all-reduce is cheaper than replicated weights).
  """
  divisors = [d for d in range(min(max_fsdp, num_devices), 0, -1) if num_devices % d == 0]
  if abstract_params is None:
    return divisors[0]
  for d in divisors:
    specs = jax.tree.map(lambda x: fsdp_spec(tuple(np.shape(x)), d, min_size=min_size),
                         abstract_params)
    total = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(abstract_params))
    whole = sum(int(np.prod(np.shape(x))) for x, s in
                zip(jax.tree.leaves(abstract_params),
                    jax.tree.leaves(specs, is_leaf=lambda v: isinstance(v, P)))
                if d > 1 and all(a is None for a in s))
    if whole <= max_replicated_fraction * max(total, 1):
      return d
  return 1
