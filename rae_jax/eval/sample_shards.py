"""Sharded, resumable N-sample generation (ADM `samples.npz` layout).

Sample i is a pure function of (weights, config, seed, i), so the N samples are cut
into fixed shards of `shard_size` indices, each written once, atomically, as
<dir>/shard_XXXXX.npz {arr_0: uint8 NHWC, arr_1: labels, indices}. A restart skips every complete
shard: a preempted 50k-sample run loses at most one shard of work. A manifest pins what the
shards were drawn from, so a changed config or checkpoint cannot silently mix samples.

Every process writes what it generated and nothing crosses hosts: the missing samples are cut
into one contiguous chunk per process, generated in that process's rows of each global batch
(gathering every batch to one writer cost every host 1.6 GB per batch at 256 devices). A shard
split between two chunks is written as part files shard_XXXXX.part_<a>_<b>.npz (samples a..b-1)
by each process holding some of it; a shard is complete when its whole file or parts tiling its
range are valid.
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rae_jax import progress, storage
from rae_jax.eval import metrics as metrics_lib
from rae_jax.train import mesh as mesh_lib
from rae_jax.train import multihost


MANIFEST = "manifest.json"
# Tags folded into the run seed, so evaluation draws never coincide with training draws.
EVAL_NOISE_TAG = 0x5EED
LABEL_TAG = 0x1ABE


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
  (`pipeline.image_generator.make_generate`). The batch is per_device_batch x (batch shards of the
  mesh); a short last batch is padded with repeats of its last index and the padding dropped.
  Images stay batch-sharded on device (replicating them cost every device the whole batch:
  1.6 GB per batch at 256 devices); `local` hands each process only its own rows.
  """

  def __init__(self, generate: Callable, mesh, per_device_batch: int):
    if per_device_batch <= 0:
      raise ValueError(f"eval.per_device_batch must be positive, got {per_device_batch}")
    self.mesh = mesh
    self.global_batch = int(per_device_batch) * mesh_lib.num_batch_shards(mesh)
    self._rows = mesh_lib.process_batch_slice(mesh, self.global_batch)
    self.local_batch = self._rows.stop - self._rows.start
    self._fn = jax.jit(mesh_lib.traced_under(mesh, lambda *a: images_to_uint8(generate(*a))),
                       out_shardings=mesh_lib.batch_sharding(mesh))

  def _run(self, params, guide_params, rae_vars, local_labels, local_indices,
           seed_key) -> jax.Array:
    g = mesh_lib.global_batch(self.mesh, {"y": local_labels, "i": local_indices},
                              self.global_batch)
    return self._fn(params, guide_params, rae_vars, g["y"], g["i"], seed_key)

  def sharded(self, params, guide_params, rae_vars, labels: np.ndarray, indices: np.ndarray,
              seed_key: jax.Array) -> jax.Array:
    """One global batch (len(labels) <= global_batch, padded) -> batch-sharded uint8 images."""
    n = len(labels)
    if not 0 < n <= self.global_batch:
      raise ValueError(f"one call takes 1..{self.global_batch} samples, got {n}")
    pos = np.minimum(np.arange(self.global_batch), n - 1)[self._rows]
    return self._run(params, guide_params, rae_vars, np.asarray(labels)[pos],
                     np.asarray(indices)[pos], seed_key)

  def local(self, params, guide_params, rae_vars, labels: np.ndarray, indices: np.ndarray,
            seed_key: jax.Array) -> np.ndarray:
    """This process's rows of one global batch (1..local_batch samples, padded) -> their uint8
    images, taken from this process's own devices: no collective moves images between hosts.
    Every process calls it together (the generation itself is one sharded computation)."""
    labels = np.asarray(labels, np.int32)
    indices = np.asarray(indices, np.int32)
    n = len(labels)
    if labels.shape != indices.shape or not 0 < n <= self.local_batch:
      raise ValueError(f"one local call takes 1..{self.local_batch} labels and as many indices, "
                       f"got {labels.shape} and {indices.shape}")
    pos = np.minimum(np.arange(self.local_batch), n - 1)
    out = self._run(params, guide_params, rae_vars, labels[pos], indices[pos], seed_key)
    return local_rows(out, self._rows)[:n]

  def batches(self, params, guide_params, rae_vars, labels: np.ndarray, indices: np.ndarray,
              seed_key: jax.Array) -> Iterator[tuple[jax.Array, int]]:
    """(batch-sharded uint8 images, real rows) per global batch, in order: the batches
    `Scorer.global_batches` builds from the same images (same padding), so features can be
    taken without the images leaving the devices (the online eval hook)."""
    labels = np.asarray(labels, np.int32)
    indices = np.asarray(indices, np.int32)
    if labels.shape != indices.shape or labels.ndim != 1:
      raise ValueError(f"labels {labels.shape} and indices {indices.shape} must be equal 1-D")
    for start in range(0, len(labels), self.global_batch):
      stop = min(start + self.global_batch, len(labels))
      yield self.sharded(params, guide_params, rae_vars, labels[start:stop],
                         indices[start:stop], seed_key), stop - start

  def __call__(self, params, guide_params, rae_vars, labels: np.ndarray, indices: np.ndarray,
               seed_key: jax.Array) -> np.ndarray:
    """All samples on every host: for small previews only (large sets: generate_shards)."""
    return np.concatenate([multihost.gather_to_host(x)[:k] for x, k in self.batches(
        params, guide_params, rae_vars, labels, indices, seed_key)])


def local_rows(x: jax.Array, rows: slice) -> np.ndarray:
  """Rows `rows` (this process's contiguous slice) of a batch-sharded array, read from the
  addressable shards only."""
  parts = {}
  for s in x.addressable_shards:
    parts.setdefault(s.index[0].start or 0, s)
  starts = sorted(parts)
  out = np.concatenate([np.asarray(parts[k].data) for k in starts])
  if starts[0] != rows.start or len(out) != rows.stop - rows.start:
    raise ValueError(f"process {jax.process_index()} holds rows {starts[0]}..{starts[0] + len(out)}"
                     f" of the batch, expected {rows.start}..{rows.stop}")
  return out


# --------------------------------------------------------------------------- shards
def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
  if num_samples <= 0 or shard_size <= 0:
    raise ValueError(f"eval.num_samples ({num_samples}) and eval.shard_size ({shard_size}) must "
                     "be positive")
  return [(a, min(a + shard_size, num_samples)) for a in range(0, num_samples, shard_size)]


def shard_path(directory: str, i: int) -> str:
  return os.path.join(directory, f"shard_{i:05d}.npz")


def part_path(directory: str, i: int, a: int, b: int) -> str:
  """Samples a..b-1 of shard i, written by the process whose chunk holds them."""
  return os.path.join(directory, f"shard_{i:05d}.part_{a:09d}_{b:09d}.npz")


_PART = re.compile(r"^shard_(\d+)\.part_(\d+)_(\d+)\.npz$")


def _list_parts(directory: str) -> dict[int, list[tuple[int, int, str]]]:
  """{shard: [(a, b, path), ...] sorted by a} of the part files in `directory`."""
  out: dict[int, list[tuple[int, int, str]]] = {}
  if storage.isdir(directory):
    for name in storage.listdir(directory):
      m = _PART.match(name)
      if m:
        i, a, b = (int(g) for g in m.groups())
        out.setdefault(i, []).append((a, b, os.path.join(directory, name)))
  return {i: sorted(v) for i, v in out.items()}


def _tiles(parts: Sequence[tuple[int, int, str]], a: int, b: int) -> bool:
  ends = [a] + [q for _, q, _ in parts]
  return bool(parts) and [p for p, _, _ in parts] == ends[:-1] and ends[-1] == b


def _atomic_savez(path: str, **arrays) -> None:
  storage.write_file(path, lambda f: np.savez(f, **arrays))


def _shard_is_complete(path: str, labels: np.ndarray) -> bool:
  """The final name only appears after a complete write; also check it holds these labels."""
  if not storage.exists(path):
    return False
  try:
    shape, _ = metrics_lib.npz_array_shape(path, "arr_0")
    with storage.load_npz(path) as z:
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
  if storage.exists(path):
    old = json.loads(storage.read_text(path))
    new = json.loads(json.dumps(manifest, default=str))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
      raise ValueError(
          f"{directory} holds samples of a different evaluation (changed: {changed}; e.g. "
          f"{changed[0]}: {old.get(changed[0])!r} -> {new.get(changed[0])!r}). Delete that "
          "directory or use another workdir to start a new evaluation.")
  elif multihost.is_main():
    storage.makedirs(directory)
    storage.write_text(path, json.dumps(manifest, indent=2, default=str))


def _agree(mask: np.ndarray) -> np.ndarray:
  """Process 0's view of which shards are done, so all processes run the same collectives."""
  if jax.process_count() == 1:
    return mask
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.broadcast_one_to_all(mask.astype(np.int32))).astype(bool)


def _complete_shards(directory: str, ranges, labels: np.ndarray) -> np.ndarray:
  """Process 0: which shards are complete (whole file, or valid parts tiling the range). Then
  removes everything else a shard left behind (invalid whole files, parts of incomplete shards
  or of shards that have a whole file, temp files), so that a run resumed with another process
  or device count can never mix old parts into its shards."""
  parts = _list_parts(directory)
  done = np.zeros(len(ranges), bool)
  for i, (a, b) in enumerate(ranges):
    whole = shard_path(directory, i)
    mine = parts.get(i, [])
    if _shard_is_complete(whole, labels[a:b]):
      done[i], stale = True, [p for _, _, p in mine]
    else:
      done[i] = _tiles(mine, a, b) and all(_shard_is_complete(p, labels[pa:pb])
                                           for pa, pb, p in mine)
      stale = ([] if done[i] else [p for _, _, p in mine]) + (
          [whole] if storage.exists(whole) else [])
    for p in stale:
      logging.info("eval: removing %s (its shard is regenerated or already whole)", p)
      storage.remove(p)
  if storage.isdir(directory):
    for name in storage.listdir(directory):
      if name.startswith("shard_") and name.endswith((".tmp.npz", ".tmp")):  # killed writes
        storage.remove(os.path.join(directory, name))
  return done


def shard_files(directory: str, num_samples: int, shard_size: int) -> list[str]:
  """Files covering samples 0..num_samples-1 in index order: each shard's whole file, else its
  parts. Raises naming the first shard they do not cover."""
  parts = _list_parts(directory)
  out = []
  for i, (a, b) in enumerate(shard_ranges(num_samples, shard_size)):
    whole = shard_path(directory, i)
    if storage.exists(whole):
      out.append(whole)
    elif _tiles(parts.get(i, []), a, b):
      out.extend(p for _, _, p in parts[i])
    else:
      raise FileNotFoundError(f"{directory}: shard {i} (samples {a}..{b - 1}) has no file and "
                              f"its parts {[os.path.basename(p) for *_, p in parts.get(i, [])]} "
                              "do not cover it (is the directory on a filesystem shared by "
                              "every process?)")
  return out


def _pieces(todo, ranges, lo: int, hi: int) -> list[tuple[int, int, int, int]]:
  """(shard, first sample, end sample, end position in the chunk) of what stream positions
  lo..hi-1 (the missing shards' samples, concatenated) hold, in order."""
  out, off = [], 0
  for i in todo:
    a, b = ranges[i]
    s, e = max(off, lo), min(off + b - a, hi)
    if s < e:
      out.append((i, a + s - off, a + e - off, e - lo))
    off += b - a
  return out


def generate_shards(sample_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
                    labels: np.ndarray, directory: str, shard_size: int, *,
                    manifest: Optional[dict] = None,
                    on_shard: Optional[Callable[[int, str], None]] = None,
                    batch_size: Optional[int] = None) -> list[str]:
  """Writes every missing shard of samples 0..len(labels)-1; returns the files covering them, in
  index order (whole shards and parts).

  sample_fn(labels, indices) -> uint8 (n,H,W,3). With several processes it must also have
  `local(labels, indices)` (this process's rows of one global batch -> their images) and
  `local_batch` (`bind(ShardedSampler, ...)` has both): the missing samples are cut into
  process_count() contiguous chunks of whole local batches, every process makes the same number
  of calls (an exhausted chunk pads with a repeated sample and drops it) and writes its own
  chunk. Calls span shard boundaries, so the work is the missing samples rounded up to one
  global batch at most (padding each shard to whole global batches computed 2x the samples at
  64 devices and 8x at 256). One process calls `local` (or, with `batch_size` or without
  `local`, sample_fn itself with batch_size / sample_fn.global_batch / shard_size samples).
  Sample values and the union of the files never depend on batch or process counts.
  `on_shard(i, path)` runs after this process wrote (its part of) shard i.
  """
  labels = np.asarray(labels, np.int32)
  ranges = shard_ranges(len(labels), shard_size)
  _check_manifest(directory, dict(manifest or {}, num_samples=len(labels),
                                  shard_size=int(shard_size)))
  nproc, me = jax.process_count(), jax.process_index()
  call = getattr(sample_fn, "local", None) if batch_size is None else None
  if call is not None:
    step = int(sample_fn.local_batch)
  elif nproc > 1:
    raise ValueError(f"generate_shards on {nproc} processes needs a sample_fn with a per-process "
                     "`local(labels, indices)` and `local_batch` (generation.bind(ShardedSampler"
                     ", ...)) and no batch_size: each process writes only the rows it generated")
  else:
    call = sample_fn
    step = int(batch_size or getattr(sample_fn, "global_batch", 0) or shard_size)
  # Process 0 decides and cleans up before the broadcast, which nobody passes before it does.
  done = _agree(_complete_shards(directory, ranges, labels) if multihost.is_main()
                else np.zeros(len(ranges), bool))
  if done.any():
    logging.info("eval: %d of %d shards already in %s; generating the other %d", done.sum(),
                 len(ranges), directory, (~done).sum())
  todo = [i for i in range(len(ranges)) if not done[i]]
  stream = (np.concatenate([np.arange(*ranges[i]) for i in todo]).astype(np.int32)
            if todo else np.zeros((0,), np.int32))
  chunk = -(-len(stream) // (nproc * step)) * step
  lo, hi = min(me * chunk, len(stream)), min((me + 1) * chunk, len(stream))
  pieces = _pieces(todo, ranges, lo, hi)
  pending: list[np.ndarray] = []
  written = have = 0
  bar = progress.bar(hi - lo, "eval: generating (process 0's part)" if nproc > 1
                     else "eval: generating")
  for start in range(lo, lo + chunk, step):
    idx = stream[start:min(start + step, hi)]
    n = len(idx)
    if n == 0:  # this chunk is exhausted; the others still need this process's devices
      idx = stream[:1]
    pending.append(np.asarray(call(labels[idx], idx))[:n])
    have += n
    bar.update(n)
    while pieces and pieces[0][3] <= have:
      i, a, b, end = pieces.pop(0)
      rows = np.concatenate(pending)
      images, rest = rows[:end - written], rows[end - written:]
      pending, written = [rest], end
      path = shard_path(directory, i) if (a, b) == ranges[i] else part_path(directory, i, a, b)
      _atomic_savez(path, arr_0=images, arr_1=labels[a:b], indices=np.arange(a, b))
      logging.info("eval: shard %d/%d (samples %d..%d) -> %s", i + 1, len(ranges), a, b - 1,
                   path)
      if on_shard is not None:
        on_shard(i, path)
  bar.close()
  multihost.barrier("rae_jax_eval_shards_done")
  return shard_files(directory, len(labels), shard_size)


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
      with storage.load_npz(self.paths[s]) as z:
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
      with storage.load_npz(p) as z:
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
  def write(f):
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
      def chunks(key):
        for p in paths:
          with storage.load_npz(p) as z:
            yield z[key]
      _write_npy_stream(zf, "arr_0", (n,) + tuple(reader.image_shape), np.uint8,
                        chunks("arr_0"))
      _write_npy_stream(zf, "arr_1", (n,), np.int64, chunks("arr_1"))
  storage.write_file(out_path, write)
  return out_path


class _Bound:
  """sample_fn(labels, indices) with the weights bound; carries the sampler's global batch and
  the per-process path `local` / `local_batch` that generate_shards uses."""

  def __init__(self, sampler: ShardedSampler, *args):
    self.sampler, self.args = sampler, args
    self.global_batch = sampler.global_batch
    self.local_batch = sampler.local_batch

  def __call__(self, labels, indices):
    params, guide_params, rae_vars, seed_key = self.args
    return self.sampler(params, guide_params, rae_vars, labels, indices, seed_key)

  def local(self, labels, indices):
    params, guide_params, rae_vars, seed_key = self.args
    return self.sampler.local(params, guide_params, rae_vars, labels, indices, seed_key)


def bind(sampler: ShardedSampler, params: Any, guide_params: Any, rae_vars: Any,
         seed_key: jax.Array) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
  return _Bound(sampler, params, guide_params, rae_vars, seed_key)
