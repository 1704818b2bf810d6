"""Deterministic, resumable, per-process batch iterator with threaded prefetch.

Order. Epoch e visits the source in `permutation(seed, e)` (numpy PCG64 seeded by
(seed, e)); global batch s of epoch e is positions [s*B, (s+1)*B) of it, and process
p of P takes the p-th contiguous b = B/P slice of that global batch. So a batch is a
pure function of (seed, epoch, step), per-process slices are disjoint, and the global
batch is the same whatever P is (a run resumes on another process count). The last
N mod B positions of each epoch are dropped (as `drop_last=True` in the official
DistributedSampler loaders); they differ from epoch to epoch, so no example is
systematically left out.
Horizontal flips are a second pure function of (seed, epoch, dataset index).

State. `{'epoch', 'step_in_epoch'}` (plain ints) names the next batch `__next__`
returns; it goes into the checkpoint and `restore` resumes with identical batches.

Unreadable examples. If reading index i fails (corrupt file, decode error), the
example is replaced by the next readable index i+1, i+2, ... (mod N) with the flip
of the original position: batches stay full and the result depends only on which
files are bad, not on timing. Each replacement is counted (`num_skipped`, per process,
cumulative since construction, for the trainer's metrics) and logged; the first
failure of each file is logged with its path and error.

Prefetch. A `ThreadPoolExecutor` decodes the next `prefetch` batches while the
accelerator runs, one task per example, each writing into its fixed slot of a
preallocated batch buffer. Threads rather than processes because (i) hosts may have
2 cores, and PIL's decode/resize and numpy's uint8 -> float conversion release the GIL,
so threads use both cores without pickling images between processes; (ii) forking a
process that has initialised JAX is unsafe; (iii) grain or tf.data would be extra
heavy dependencies for the same result. `num_threads` defaults to the cores this process may
run on (`resolve_num_threads`): on a 2-core host 2 threads beat 4 (580 vs 534 img/s), which
fight for the cores.
Because slots and replacements are fixed before any task runs, the output never
depends on thread scheduling.
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from rae_jax.data.transforms import hflip, to_unit_float


_LOGGED_THREADS: set[tuple[int | None, int]] = set()
_LOGGED_THREADS_LOCK = threading.Lock()


def usable_cores() -> int:
  """CPU cores this process may run on (its affinity mask: what a container or taskset grants)."""
  try:
    return max(len(os.sched_getaffinity(0)), 1)
  except (AttributeError, OSError):  # No sched_getaffinity (macOS).
    return max(os.cpu_count() or 1, 1)


def resolve_num_threads(num_threads: int | None) -> int:
  """data.num_threads: a positive count is kept; 0 or None means `usable_cores()`. Logged once."""
  requested = None if num_threads is None or int(num_threads) <= 0 else int(num_threads)
  resolved = usable_cores() if requested is None else requested
  with _LOGGED_THREADS_LOCK:
    first = (requested, resolved) not in _LOGGED_THREADS
    _LOGGED_THREADS.add((requested, resolved))
  if first:
    logging.info("data: %d loader threads (%s; this process may use %d cores)", resolved,
                 "data.num_threads=0: one per usable core" if requested is None
                 else f"data.num_threads={requested}", usable_cores())
  return resolved


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The visiting order of epoch `epoch`: a pure function of (seed, epoch)."""
  return np.random.Generator(np.random.PCG64([int(seed), int(epoch), 0])).permutation(n)


def epoch_flips(seed: int, epoch: int, n: int) -> np.ndarray:
  """Per-dataset-index horizontal flip bits of epoch `epoch` (p = 0.5)."""
  return np.random.Generator(np.random.PCG64([int(seed), int(epoch), 1])).random(n) < 0.5


class _PendingBatch:
  """One batch being decoded: fixed slots, filled by worker tasks."""

  def __init__(self, epoch: int, step: int, size: int):
    self.epoch, self.step, self.size = epoch, step, size
    self.futures: list[concurrent.futures.Future] = []
    self.data: np.ndarray | None = None
    self.labels = np.zeros((size,), np.int32)
    self.skipped = np.zeros((size,), np.int64)
    self._lock = threading.Lock()

  def slot(self, j: int, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    with self._lock:
      if self.data is None:
        self.data = np.empty((self.size,) + shape, dtype)
    if self.data.shape[1:] != shape:
      raise ValueError(f"example shapes differ within a batch: {shape} vs {self.data.shape[1:]} "
                       "(image sources must be center-cropped to data.image_size)")
    return self.data[j]


class _Inline:
  """Stands in for the thread pool when prefetch is 0."""

  def submit(self, fn, *args):
    future = concurrent.futures.Future()
    try:
      future.set_result(fn(*args))
    except BaseException as e:  # pylint: disable=broad-except
      future.set_exception(e)
    return future

  def shutdown(self, **_):
    pass


class DataIterator:
  """Yields this process's slice of each global batch: {'image'|'latent': f32, 'label': i32}.

  Image sources give 'image' (b, H, W, 3) in [0, 1] (or the raw uint8 with image_dtype=uint8, 4x
  fewer bytes to the device; train.step converts there); latent caches give 'latent'
  (b, h, w, C) in the cache's dtype. `train=False` visits the source in index order without flips (stats,
  evaluation); it still drops the final incomplete global batch.
  """

  def __init__(self, source, global_batch_size: int, *, seed: int = 0,
               process_index: int | None = None, process_count: int | None = None,
               train: bool = True, flip: bool = True, prefetch: int = 2,
               num_threads: int | None = None, max_consecutive_failures: int = 100,
               image_dtype=np.float32):
    self.source = source
    self.image_dtype = np.dtype(image_dtype)
    if self.image_dtype not in (np.dtype(np.float32), np.dtype(np.uint8)):
      raise ValueError(f"image_dtype must be float32 ([0, 1]) or uint8, got {self.image_dtype}")
    self.global_batch_size = int(global_batch_size)
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    if self.process_count <= 0 or not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index={self.process_index} must be in [0, process_count="
                       f"{self.process_count})")
    if self.global_batch_size <= 0 or self.global_batch_size % self.process_count:
      raise ValueError(f"global batch size {self.global_batch_size} must be a positive multiple "
                       f"of the number of processes ({self.process_count})")
    if int(seed) < 0:
      raise ValueError(f"data seed must be non-negative, got {seed}")
    self.seed = int(seed)
    self.train, self.flip = bool(train), bool(flip) and bool(train)
    self.local_batch_size = self.global_batch_size // self.process_count
    self.num_examples = len(source)
    self.steps_per_epoch = self.num_examples // self.global_batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"dataset has {self.num_examples} examples, fewer than one global batch "
                       f"({self.global_batch_size})")
    self.kind = getattr(source, "kind", "image")
    if self.kind not in ("image", "latent"):
      raise ValueError(f"source kind must be 'image' or 'latent', got {self.kind!r}")
    self.prefetch = max(int(prefetch), 0)
    self.max_consecutive_failures = int(max_consecutive_failures)
    self.num_skipped = 0
    self._bad: dict[int, str] = {}
    self._bad_lock = threading.Lock()
    self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self._pending: collections.deque[_PendingBatch] = collections.deque()
    self._epoch = self._step = 0          # Next batch to return.
    self._next_epoch = self._next_step = 0  # Next batch to schedule.
    self._closed = False
    if self.prefetch > 0:  # num_threads 0/None: one per usable core.
      self._pool = concurrent.futures.ThreadPoolExecutor(
          resolve_num_threads(num_threads), thread_name_prefix="rae_jax_data")
    else:
      self._pool = _Inline()

  # --- order ---------------------------------------------------------------------------------

  def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(permutation, flips by dataset index) of an epoch; cached for the last two epochs."""
    if epoch not in self._orders:
      n = self.num_examples
      if self.train:
        order = (epoch_permutation(self.seed, epoch, n),
                 epoch_flips(self.seed, epoch, n) if self.flip else np.zeros(n, bool))
      else:
        order = (np.arange(n), np.zeros(n, bool))
      self._orders[epoch] = order
      for old in [e for e in self._orders if e < epoch - 1]:
        del self._orders[old]
    return self._orders[epoch]

  def batch_indices(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Dataset indices and flip bits of this process's slice of global batch (epoch, step)."""
    perm, flips = self._order(epoch)
    start = step * self.global_batch_size + self.process_index * self.local_batch_size
    idx = perm[start:start + self.local_batch_size]
    return idx, flips[idx]

  # --- reading -------------------------------------------------------------------------------

  def _mark_bad(self, index: int, error: BaseException) -> None:
    with self._bad_lock:
      first = index not in self._bad
      self._bad[index] = f"{type(error).__name__}: {error}"
    if first:
      describe = getattr(self.source, "describe", None)
      where = describe(index) if describe else f"example {index}"
      logging.warning("data: skipping unreadable example %d (%s): %s: %s", index, where,
                      type(error).__name__, error)

  def _read(self, index: int, flip: bool) -> tuple[Any, int, bool]:
    """source[index], or the next readable index; also returns whether it was replaced (one bad
    example, however many bad neighbours were stepped over to replace it)."""
    read_flip = getattr(self.source, "read_flip", None) if self.kind == "latent" else None
    n = self.num_examples
    for attempt in range(min(self.max_consecutive_failures, n)):
      candidate = (index + attempt) % n
      if candidate in self._bad:
        continue
      try:
        if read_flip is not None:  # Reads only the chosen half of a cached latent pair.
          example, label = read_flip(candidate, flip)
        else:
          example, label = self.source[candidate]
          if self.kind == "latent":
            example = np.asarray(example)[int(flip)]
      except Exception as e:  # pylint: disable=broad-except
        self._mark_bad(candidate, e)
        continue
      return example, label, attempt > 0
    raise RuntimeError(
        f"data: {min(self.max_consecutive_failures, n)} consecutive unreadable examples from index "
        f"{index}; last error: {self._bad.get(candidate)}")

  def _fill(self, batch: _PendingBatch, j: int, index: int, flip: bool) -> None:
    example, label, replaced = self._read(int(index), bool(flip))
    if self.kind == "latent":
      example = np.asarray(example)
      if example.ndim != 3:
        raise ValueError(f"latent source gave a latent of shape {example.shape} after choosing the "
                         "flip, expected (h, w, C) (sources return (2, h, w, C) pairs)")
      batch.slot(j, example.shape, example.dtype)[...] = example
    else:
      example = np.asarray(example)
      if example.dtype != np.uint8 or example.ndim != 3 or example.shape[-1] != 3:
        raise ValueError(f"image source returned {example.dtype} {example.shape}, "
                         "expected uint8 (H, W, 3)")
      example = hflip(example) if flip else example
      if self.image_dtype == np.uint8:  # 4x fewer bytes to the device; converted there
        batch.slot(j, example.shape, np.uint8)[...] = example
      else:
        to_unit_float(example, out=batch.slot(j, example.shape))
    batch.labels[j] = label
    batch.skipped[j] = int(replaced)

  def _schedule(self) -> None:
    epoch, step = self._next_epoch, self._next_step
    indices, flips = self.batch_indices(epoch, step)
    batch = _PendingBatch(epoch, step, self.local_batch_size)
    batch.futures = [self._pool.submit(self._fill, batch, j, i, f)
                     for j, (i, f) in enumerate(zip(indices, flips))]
    self._pending.append(batch)
    self._next_step += 1
    if self._next_step == self.steps_per_epoch:
      self._next_epoch, self._next_step = epoch + 1, 0

  def _cancel_pending(self) -> None:
    for batch in self._pending:
      for future in batch.futures:
        future.cancel()
    for batch in self._pending:  # Let running tasks finish before their buffers are dropped.
      concurrent.futures.wait(batch.futures)
    self._pending.clear()

  # --- iterator protocol ---------------------------------------------------------------------

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._closed:
      raise RuntimeError("DataIterator is closed")
    if not self._pending:
      self._schedule()
    batch = self._pending.popleft()
    while len(self._pending) < self.prefetch:
      self._schedule()
    try:
      for future in batch.futures:
        future.result()  # Re-raises a worker's error here, in the training thread.
    except BaseException:
      self.restore(self.state())  # Keep state() and the schedule consistent for a retry.
      raise
    skipped = int(batch.skipped.sum())
    if skipped:
      self.num_skipped += skipped
      logging.warning("data: replaced %d unreadable example(s) in batch (epoch %d, step %d); "
                      "%d replaced so far on this process", skipped, batch.epoch, batch.step,
                      self.num_skipped)
    self._epoch, self._step = batch.epoch, batch.step + 1
    if self._step == self.steps_per_epoch:
      self._epoch, self._step = self._epoch + 1, 0
    return {self.kind: batch.data, "label": batch.labels}

  # --- state ---------------------------------------------------------------------------------

  def state(self) -> dict[str, int]:
    """JSON-serialisable position of the next batch (identical on every process)."""
    return {"epoch": int(self._epoch), "step_in_epoch": int(self._step)}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continue from `state()`: the following batches equal the uninterrupted run's."""
    try:
      epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"data iterator state must be {{'epoch': int, 'step_in_epoch': int}}, "
                       f"got {state!r}") from e
    if epoch < 0 or not 0 <= step < self.steps_per_epoch:
      raise ValueError(f"data iterator state {dict(state)} out of range: step_in_epoch must be in "
                       f"[0, steps_per_epoch={self.steps_per_epoch}) (did the dataset size or "
                       "global batch size change?)")
    self._cancel_pending()
    self._epoch = self._next_epoch = epoch
    self._step = self._next_step = step

  @property
  def skipped_indices(self) -> list[int]:
    """Dataset indices found unreadable so far on this process."""
    with self._bad_lock:
      return sorted(self._bad)

  def metrics(self) -> dict[str, int]:
    return {"data/num_skipped": self.num_skipped}

  # --- shutdown ------------------------------------------------------------------------------

  def close(self) -> None:
    """Stop the workers (pending decodes are cancelled). Idempotent."""
    if self._closed:
      return
    self._closed = True
    self._cancel_pending()
    self._pool.shutdown(wait=True, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def to_global(batch: Mapping[str, Any], sharding) -> dict[str, jax.Array]:
  """Per-process batch slices -> global jax.Arrays sharded by `sharding` (one or a dict per key).

  Every process must call this with its own slice (`DataIterator` output), in the same step.
  """
  out = {}
  for key, value in batch.items():
    s = sharding[key] if isinstance(sharding, Mapping) else sharding
    try:
      out[key] = jax.make_array_from_process_local_data(s, np.asarray(value))
    except Exception as e:
      raise ValueError(f"to_global: cannot shard batch['{key}'] of local shape "
                       f"{np.shape(value)} with {s}: {e}") from e
  return out
