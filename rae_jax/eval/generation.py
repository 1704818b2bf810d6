"""Sharded, resumable N-sample generation (ADM `samples.npz` layout).

Sample i is a pure function of (weights, config, seed, i) (contract C5), so the N samples are cut
into fixed shards of `shard_size` indices, each written once, atomically, by process 0 as
<dir>/shard_XXXXX.npz {arr_0: uint8 NHWC, arr_1: labels, indices}. A restart skips every shard
whose file exists: a preempted 50k-sample run loses at most one shard of work. A manifest pins
what the shards were drawn from, so a changed config or checkpoint cannot silently mix samples.

Every process computes (the batch is sharded over the whole mesh); only process 0 writes.
"""
from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rae_jax.eval import metrics as metrics_lib
from rae_jax.train import mesh as mesh_lib

MANIFEST = "manifest.json"
# Tags folded into the run seed, so evaluation draws never coincide with training draws.
EVAL_NOISE_TAG = 0x5EED
LABEL_TAG = 0x1ABE


def is_main() -> bool:
  return jax.process_index() == 0


def eval_seed_key(seed: int) -> jax.Array:
  """Key from which the noise of every evaluation sample index is folded."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), EVAL_NOISE_TAG)


def label_key(seed: int) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(seed), LABEL_TAG)


def images_to_uint8(images01: jax.Array) -> jax.Array:
  """On-device twin of `pipeline.images.to_uint8` (x*255+0.5, clamp, truncate): shipping uint8
  to the host moves 4x fewer bytes than float32."""
  return jnp.clip(images01.astype(jnp.float32) * 255.0 + 0.5, 0, 255).astype(jnp.uint8)


class ShardedSampler:
  """uint8 samples for any global sample indices, generated in batch-sharded global batches.

  `generate(params, guide_params, rae_vars, labels, indices, seed_key) -> images in [0,1]`
  (`pipeline.generate.make_generate`). The batch is per_device_batch x (batch shards of the
  mesh); a short last batch is padded with repeats of its last index and the padding dropped.
  Images stay batch-sharded on device (replicating them cost every device the whole batch:
  1.6 GB per batch at 256 devices); only the host that writes them fetches them whole.
  """

  def __init__(self, generate: Callable, mesh, per_device_batch: int):
    if per_device_batch <= 0:
      raise ValueError(f"eval.per_device_batch must be positive, got {per_device_batch}")
    self.mesh = mesh
    self.global_batch = int(per_device_batch) * mesh_lib.num_batch_shards(mesh)
    self._rows = mesh_lib.process_batch_slice(mesh, self.global_batch)
    self._fn = jax.jit(lambda *a: images_to_uint8(generate(*a)),
                       out_shardings=mesh_lib.batch_sharding(mesh))

  def sharded(self, params, guide_params, rae_vars, labels: np.ndarray, indices: np.ndarray,
              seed_key: jax.Array) -> jax.Array:
    """One global batch (len(labels) <= global_batch, padded) -> batch-sharded uint8 images."""
    n = len(labels)
    if not 0 < n <= self.global_batch:
      raise ValueError(f"one call takes 1..{self.global_batch} samples, got {n}")
    pos = np.minimum(np.arange(self.global_batch), n - 1)
    local = {"y": labels[pos][self._rows], "i": indices[pos][self._rows]}
    g = mesh_lib.global_batch(self.mesh, local, self.global_batch)
    return self._fn(params, guide_params, rae_vars, g["y"], g["i"], seed_key)

  def __call__(self, params, guide_params, rae_vars, labels: np.ndarray, indices: np.ndarray,
               seed_key: jax.Array) -> np.ndarray:
    labels = np.asarray(labels, np.int32)
    indices = np.asarray(indices, np.int32)
    if labels.shape != indices.shape or labels.ndim != 1:
      raise ValueError(f"labels {labels.shape} and indices {indices.shape} must be equal 1-D")
    out = []
    for start in range(0, len(labels), self.global_batch):
      stop = min(start + self.global_batch, len(labels))
      imgs = self.sharded(params, guide_params, rae_vars, labels[start:stop],
                          indices[start:stop], seed_key)
      out.append(fetch(imgs)[:stop - start])
    return np.concatenate(out)


def fetch(x: jax.Array) -> np.ndarray:
  """A batch-sharded array on the host. One process: straight from its shards (no on-device
  all-gather). Several: gathered across processes (process 0 writes every sample)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# --------------------------------------------------------------------------- shards
def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
  if num_samples <= 0 or shard_size <= 0:
    raise ValueError(f"eval.num_samples ({num_samples}) and eval.shard_size ({shard_size}) must "
                     "be positive")
  return [(a, min(a + shard_size, num_samples)) for a in range(0, num_samples, shard_size)]


def shard_path(directory: str, i: int) -> str:
  return os.path.join(directory, f"shard_{i:05d}.npz")


def _atomic_savez(path: str, **arrays) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _shard_is_complete(path: str, labels: np.ndarray) -> bool:
  """The final name only appears after a complete write; also check it holds these labels."""
  if not os.path.exists(path):
    return False
  try:
    shape, _ = metrics_lib.npz_array_shape(path, "arr_0")
    with np.load(path) as z:
      ok = shape[0] == len(labels) and np.array_equal(z["arr_1"], labels)
  except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
    logging.warning("eval: unreadable shard %s (%s): regenerating it", path, e)
    return False
  if not ok:
    logging.warning("eval: shard %s does not hold the expected samples: regenerating it", path)
  return ok


def _check_manifest(directory: str, manifest: dict) -> None:
  """Shards of another config/checkpoint must not be mixed in: refuse, naming what changed."""
  path = os.path.join(directory, MANIFEST)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    new = json.loads(json.dumps(manifest, default=str))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
      raise ValueError(
          f"{directory} holds samples of a different evaluation (changed: {changed}; e.g. "
          f"{changed[0]}: {old.get(changed[0])!r} -> {new.get(changed[0])!r}). Delete that "
          "directory or use another workdir to start a new evaluation.")
  elif is_main():
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(manifest, f, indent=2, default=str)
    os.replace(tmp, path)


def _agree(mask: np.ndarray) -> np.ndarray:
  """Process 0's view of which shards are done, so all processes run the same collectives."""
  if jax.process_count() == 1:
    return mask
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.broadcast_one_to_all(mask.astype(np.int32))).astype(bool)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def generate_shards(sample_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
                    labels: np.ndarray, directory: str, shard_size: int, *,
                    manifest: Optional[dict] = None,
                    on_shard: Optional[Callable[[int, str], None]] = None,
                    batch_size: Optional[int] = None) -> list[str]:
  """Writes every missing shard of samples 0..len(labels)-1; returns all shard paths in order.

  sample_fn(labels, indices) -> uint8 (n,H,W,3) (e.g. `bind(ShardedSampler, ...)`). Calls take
  `batch_size` samples (default: sample_fn.global_batch, else one shard) and span shard
  boundaries, so the work is the missing samples rounded up to one batch at most; padding each
  shard to whole global batches computed 2x the samples at 64 devices and 8x at 256 (shard 1000,
  32 per device). Shard files and their contents do not depend on batch_size. `on_shard(i,
  path)` runs after shard i is written (progress, tests).
  """
  labels = np.asarray(labels, np.int32)
  ranges = shard_ranges(len(labels), shard_size)
  _check_manifest(directory, dict(manifest or {}, num_samples=len(labels),
                                  shard_size=int(shard_size)))
  paths = [shard_path(directory, i) for i in range(len(ranges))]
  done = np.array([is_main() and _shard_is_complete(p, labels[a:b])
                   for p, (a, b) in zip(paths, ranges)])
  done = _agree(done)
  if done.any():
    logging.info("eval: %d of %d shards already in %s; generating the other %d", done.sum(),
                 len(ranges), directory, (~done).sum())
  todo = [i for i in range(len(ranges)) if not done[i]]
  batch = int(batch_size or getattr(sample_fn, "global_batch", 0) or shard_size)
  # The missing samples as one stream, cut into batches; a shard is written once complete.
  stream = (np.concatenate([np.arange(*ranges[i]) for i in todo]).astype(np.int32)
            if todo else np.zeros((0,), np.int32))
  pending: list[np.ndarray] = []
  have = 0
  next_shard = 0
  for start in range(0, len(stream), batch):
    idx = stream[start:start + batch]
    pending.append(np.asarray(sample_fn(labels[idx], idx)))
    have += len(idx)
    while next_shard < len(todo):
      i = todo[next_shard]
      a, b = ranges[i]
      if have < b - a:
        break
      rows = np.concatenate(pending)
      images, rest = rows[:b - a], rows[b - a:]
      pending, have = [rest], len(rest)
      if is_main():
        _atomic_savez(paths[i], arr_0=images, arr_1=labels[a:b], indices=np.arange(a, b))
        logging.info("eval: shard %d/%d (samples %d..%d) -> %s", i + 1, len(ranges), a, b - 1,
                     paths[i])
      next_shard += 1
      if on_shard is not None:
        on_shard(i, paths[i])
  _barrier("rae_jax_eval_shards_done")
  return paths


# --------------------------------------------------------------------------- reading / assembly
class ShardReader:
  """Random access to the rows of a list of shards (keeps the last shard it opened)."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)
    self.bounds = [0]
    self.image_shape = None
    for p in self.paths:
      shape, dtype = metrics_lib.npz_array_shape(p, "arr_0")
      if dtype != np.uint8 or len(shape) != 4:
        raise ValueError(f"{p}: arr_0 must be uint8 (N,H,W,3), got {shape} {dtype}")
      if self.image_shape not in (None, shape[1:]):
        raise ValueError(f"{p}: images {shape[1:]} differ from earlier shards' {self.image_shape}")
      self.image_shape = shape[1:]
      self.bounds.append(self.bounds[-1] + shape[0])
    self._cache: tuple[int, dict[str, np.ndarray]] = (-1, {})

  def __len__(self) -> int:
    return self.bounds[-1]

  def _shard(self, s: int) -> dict[str, np.ndarray]:
    if self._cache[0] != s:
      with np.load(self.paths[s]) as z:
        self._cache = (s, {"arr_0": z["arr_0"], "arr_1": z["arr_1"]})
    return self._cache[1]

  def read(self, indices: np.ndarray, key: str = "arr_0") -> np.ndarray:
    indices = np.asarray(indices)
    which = np.searchsorted(self.bounds, indices, side="right") - 1
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f"sample indices out of range [0, {len(self)})")
    rows = []
    for s in np.unique(which):
      rows.append((np.nonzero(which == s)[0], self._shard(int(s))[key][indices[which == s]
                                                                        - self.bounds[s]]))
    out = np.empty((len(indices),) + rows[0][1].shape[1:], rows[0][1].dtype)
    for pos, value in rows:
      out[pos] = value
    return out

  __call__ = read

  def labels(self) -> np.ndarray:
    out = []
    for p in self.paths:
      with np.load(p) as z:
        out.append(z["arr_1"])
    return np.concatenate(out)


def _write_npy_stream(zf: zipfile.ZipFile, name: str, shape: tuple, dtype,
                      chunks: Iterable[np.ndarray]) -> None:
  header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
            "shape": tuple(shape)}
  with zf.open(name + ".npy", "w", force_zip64=True) as f:
    np.lib.format.write_array_header_2_0(f, header)
    n = 0
    for c in chunks:
      c = np.ascontiguousarray(c, dtype)
      f.write(c.tobytes())
      n += len(c)
  if n != shape[0]:
    raise ValueError(f"{name}: wrote {n} rows, header says {shape[0]}")


def assemble_samples_npz(paths: Sequence[str], out_path: str) -> str:
  """ADM-format samples.npz (arr_0 uint8 NHWC, arr_1 labels) streamed shard by shard, so 50k
  256px samples (~10 GB) never sit in memory; written to a temp name and renamed."""
  reader = ShardReader(paths)
  n = len(reader)
  tmp = out_path + ".tmp"
  with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
    def chunks(key):
      for p in paths:
        with np.load(p) as z:
          yield z[key]
    _write_npy_stream(zf, "arr_0", (n,) + tuple(reader.image_shape), np.uint8, chunks("arr_0"))
    _write_npy_stream(zf, "arr_1", (n,), np.int64, chunks("arr_1"))
  os.replace(tmp, out_path)
  return out_path


class _Bound:
  """sample_fn(labels, indices) with the weights bound; carries the sampler's global batch."""

  def __init__(self, sampler: ShardedSampler, *args):
    self.sampler, self.args = sampler, args
    self.global_batch = sampler.global_batch

  def __call__(self, labels, indices):
    params, guide_params, rae_vars, seed_key = self.args
    return self.sampler(params, guide_params, rae_vars, labels, indices, seed_key)


def bind(sampler: ShardedSampler, params: Any, guide_params: Any, rae_vars: Any,
         seed_key: jax.Array) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
  return _Bound(sampler, params, guide_params, rae_vars, seed_key)
