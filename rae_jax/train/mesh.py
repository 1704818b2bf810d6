"""Device mesh over all processes, and multi-host start-up.

One mesh with axes ('data', 'fsdp') spans every device of every process. Batches are split over
both axes (pure data parallelism across all devices); parameters are split over 'fsdp' only
(see sharding.py), so 'data' > 1 means those groups of devices hold replicated parameter shards.
The default bounds 'fsdp' at 64 devices (a size that divides the model widths) and puts the rest
on 'data'; on multi-slice TPU jobs 'data' spans the slices (DCN) and 'fsdp' stays within one (ICI).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rae_jax.train import sharding as sharding_lib

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  try:
    return int(value) if value is not None else None
  except ValueError:
    return None


def _launched_on_several_hosts() -> bool:
  """Cluster launchers that jax.distributed.initialize() can auto-detect."""
  tpu_hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if len([h for h in tpu_hosts.split(',') if h]) > 1:
    return True
  if os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return True
  for name in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'JAX_NUM_PROCESSES'):
    if (_env_int(name) or 1) > 1:
      return True
  return False


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None,
                                 local_device_ids: Optional[Sequence[int]] = None) -> bool:
  """Calls jax.distributed.initialize() when running on several hosts.

  Explicit flags (GPU clusters, localhost tests) win; otherwise TPU pods, SLURM and Open MPI
  launches are auto-detected. Must run before anything touches a JAX backend. Returns whether
  the distributed runtime is (now) initialized.
  """
  if jax.distributed.is_initialized():
    return True
  explicit = coordinator_address is not None or num_processes is not None
  if not explicit and not _launched_on_several_hosts():
    return False
  if explicit and (coordinator_address is None or num_processes is None or process_id is None):
    raise ValueError(
        'maybe_initialize_distributed: coordinator_address, num_processes and process_id must be '
        f'given together (got {coordinator_address!r}, {num_processes!r}, {process_id!r}).')
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
    if local_device_ids is not None:
      kwargs['local_device_ids'] = list(local_device_ids)
  if jax.config.values.get('jax_cpu_collectives_implementation') in (None, 'none'):
    # Multi-process CPU runs (tests, CPU clusters) need a collectives library; TPU/GPU ignore it.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed initialized: process %d of %d, %d local / %d global devices.',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


# The default mesh puts at most this many devices on 'fsdp' (see sharding.auto_fsdp_size).
MAX_FSDP = 64


def mesh_shape(num_devices: int, data: int = 1, fsdp: int = -1, *,
               max_fsdp: int = MAX_FSDP) -> tuple[int, int]:
  """Resolves -1 entries so that data * fsdp == num_devices.

  data = fsdp = -1 is the default: fsdp = the largest divisor of the device count <= max_fsdp,
  the rest on 'data' (256 devices -> 4 x 64). All devices on fsdp would leave widths like
  1152 = 2^7 * 9 with no dimension divisible by the fsdp size, i.e. silently replicated.
  """
  if data == -1 and fsdp == -1:
    fsdp = sharding_lib.auto_fsdp_size(num_devices, max_fsdp=max_fsdp)
  if data == -1:
    if fsdp <= 0 or num_devices % fsdp:
      raise ValueError(f'mesh.fsdp={fsdp} does not divide the {num_devices} devices.')
    data = num_devices // fsdp
  if fsdp == -1:
    if data <= 0 or num_devices % data:
      raise ValueError(f'mesh.data={data} does not divide the {num_devices} devices.')
    fsdp = num_devices // data
  if data * fsdp != num_devices:
    raise ValueError(f'mesh.data * mesh.fsdp = {data} * {fsdp} != {num_devices} devices.')
  return data, fsdp


def num_slices(devices: Sequence[jax.Device]) -> int:
  """Multi-slice TPU jobs: devices carry slice_index (one value per ICI-connected slice)."""
  return len({getattr(d, 'slice_index', 0) for d in devices})


def make_mesh(data: int = 1, fsdp: int = -1,
              devices: Optional[Sequence[jax.Device]] = None, *,
              max_fsdp: int = MAX_FSDP) -> Mesh:
  """Mesh ('data', 'fsdp') over `devices` (default: all devices of all processes).

  data = fsdp = -1 bounds fsdp (mesh_shape). On several slices the mesh is hybrid: 'fsdp' stays
  inside a slice (parameter all-gathers on ICI) and 'data' spans slices (only the gradient
  all-reduce crosses DCN). Devices of one process stay contiguous along the flattened mesh, so
  each process owns one contiguous slice of the global batch.
  """
  devices = list(jax.devices() if devices is None else devices)
  slices = num_slices(devices)
  if slices > 1:
    per_slice = len(devices) // slices
    if data == -1 and fsdp == -1:
      fsdp = sharding_lib.auto_fsdp_size(per_slice, max_fsdp=max_fsdp)
    shape = mesh_shape(len(devices), data, fsdp, max_fsdp=max_fsdp)
    if shape[0] % slices or per_slice % shape[1]:
      raise ValueError(f'mesh {shape} (data, fsdp) over {slices} slices of {per_slice} devices: '
                       'mesh.data must be a multiple of the slice count and mesh.fsdp must '
                       'divide the devices of one slice (fsdp stays on ICI).')
    grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, shape[1]), (slices, 1),
                                                devices=devices)
    return Mesh(grid, MESH_AXES)
  shape = mesh_shape(len(devices), data, fsdp, max_fsdp=max_fsdp)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Topology-aware layout is only available for some platforms and shapes.
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over all mesh axes; other dims whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def traced_under(mesh: Mesh, fn):
  """`fn` traced under the mesh (as an abstract mesh), for jax.jit: the models then pin their
  activations to batch shards and run per-device kernels in shard_map (models/partitioning.py).
  Every jitted program over batch-sharded data goes through this."""
  @functools.wraps(fn)
  def under_mesh(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return under_mesh


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def process_batch_slice(mesh: Mesh, global_batch_size: int) -> slice:
  """Rows of the global batch that this process must load (contiguous by construction)."""
  shards = num_batch_shards(mesh)
  if global_batch_size % shards:
    raise ValueError(f'global batch size {global_batch_size} is not divisible by the '
                     f'{shards} batch shards of mesh {dict(mesh.shape)}.')
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  starts = sorted({idx[0].start or 0 for idx in index_map.values()})
  stops = sorted({global_batch_size if idx[0].stop is None else idx[0].stop
                  for idx in index_map.values()})
  lo, hi = starts[0], stops[-1]
  per_shard = global_batch_size // shards
  if (hi - lo) != per_shard * len(starts):
    raise ValueError(f'process {jax.process_index()} owns a non-contiguous part of the batch on '
                     f'mesh {dict(mesh.shape)}; build the mesh with make_mesh().')
  return slice(lo, hi)


def global_batch(mesh: Mesh, local_batch, global_batch_size: int):
  """Assembles a global, batch-sharded jax.Array pytree from this process's rows."""
  sharding = batch_sharding(mesh)

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x,
                                                  (global_batch_size,) + x.shape[1:])
  return jax.tree.map(one, local_batch)
