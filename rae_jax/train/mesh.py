"""Device mesh over all processes, and multi-host start-up.

One mesh with axes ('data', 'fsdp') spans every device of every process. Batches are split over
both axes (pure data parallelism across all devices); parameters are split over 'fsdp' only
(see sharding.py), so 'data' > 1 means those groups of devices hold replicated parameter shards.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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


def mesh_shape(num_devices: int, data: int = 1, fsdp: int = -1) -> tuple[int, int]:
  """Resolves one -1 entry so that data * fsdp == num_devices."""
  if data == -1 and fsdp == -1:
    raise ValueError('mesh: at most one of mesh.data, mesh.fsdp may be -1.')
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


def make_mesh(data: int = 1, fsdp: int = -1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Mesh ('data', 'fsdp') over `devices` (default: all devices of all processes).

  Defaults put every device on 'fsdp'. Devices of one process stay contiguous along the
  flattened mesh, so each process owns one contiguous slice of the global batch.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(len(devices), data, fsdp)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Topology-aware layout is only available for some platforms and shapes.
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over all mesh axes; other dims whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


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
