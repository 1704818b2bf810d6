"""Multi-host helpers in one place: which process writes, where processes wait for each other,
and what a process gathers. Each is a no-op (or a plain conversion) on one process, so single-host
code pays nothing for them."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np


def is_main() -> bool:
  """Process 0 writes what all processes share (logs, metrics, summaries)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (`name` must match across processes)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def gather_to_host(x: Any) -> np.ndarray:
  """A batch-sharded array as a numpy array on every process. One process: straight from its
  shards (no on-device all-gather); several: all-gathered (for small things: previews, counts)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
