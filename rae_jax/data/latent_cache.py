"""Cached encoder latents for stage 2: an atomic shard writer and a random-access reader.

`--mode=cache_latents` encodes each image and its mirror once; stage 2 then reads
latents instead of running the frozen encoder every step. A shard is two files:

  latents-p<process>-<k>.npy  float (n, 2, h, w, C): [:, 0] the image, [:, 1] its mirror
  meta-p<process>-<k>.npz     int64 'indices' (n,) dataset indices, int32 'labels' (n,)

Each file is written to a temp name and renamed; the meta file goes last, so a shard
is complete iff its meta file exists and a kill mid-write leaves nothing the reader
trusts. Latents are plain `.npy` so the reader memory-maps them (ImageNet-sized caches
do not fit in RAM). Examples are ordered by dataset index, so the cache reads the same
whatever number of processes wrote it.
"""
from __future__ import annotations

import os
import re

import numpy as np
from absl import logging

from rae_jax import storage

_META_RE = re.compile(r"meta-p(\d+)-(\d+)\.npz$")


def _shard_names(process_index: int, k: int) -> tuple[str, str]:
  stem = f"p{process_index:04d}-{k:06d}"
  return f"latents-{stem}.npy", f"meta-{stem}.npz"


def _atomic_save(path: str, save_fn) -> None:
  if storage.is_remote(path):
    storage.write_file(path, save_fn)  # one upload: the object appears whole or not at all
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      save_fn(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _complete_shards(directory: str) -> list[tuple[str, str]]:
  """(latents path, meta path) of every complete shard, in name order."""
  shards = []
  names = set(storage.listdir(directory)) if storage.isdir(directory) else set()
  for meta in sorted(os.path.join(directory, n) for n in names if _META_RE.match(n)):
    m = _META_RE.search(os.path.basename(meta))
    if m is None:
      continue
    latents = os.path.join(directory, _shard_names(int(m.group(1)), int(m.group(2)))[0])
    if os.path.basename(latents) not in names:
      raise FileNotFoundError(f"latent cache: {meta} has no matching latents file {latents}")
    shards.append((latents, meta))
  return shards


def cached_indices(directory: str) -> np.ndarray:
  """Sorted dataset indices already in complete shards (lets a cache run resume)."""
  idx = []
  for _, meta in _complete_shards(directory):
    with storage.load_npz(meta) as z:
      idx.append(z["indices"])
  return np.sort(np.concatenate(idx)) if idx else np.zeros((0,), np.int64)


# float16 halves the cache (~2 TB -> ~1 TB for ImageNet with flips) and the bytes sent to the
# device; its rounding (relative 2^-11) moved the tiny stage-2 loss by 4e-6 relative
# (tests/test_pod_scale.py). float32 stays available (stage2.latent_cache_dtype).
DEFAULT_DTYPE = np.float16


class LatentCacheWriter:
  """Appends complete shards for one process; numbering continues after existing shards."""

  def __init__(self, directory: str, *, process_index: int = 0, dtype=DEFAULT_DTYPE):
    self.directory = os.fspath(directory)
    self.process_index = int(process_index)
    self.dtype = np.dtype(dtype)
    if self.dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
      raise ValueError(f"latent cache dtype must be float32 or float16, got {self.dtype}")
    storage.makedirs(self.directory)
    mine = [_META_RE.search(os.path.basename(m)) for _, m in _complete_shards(self.directory)]
    ks = [int(m.group(2)) for m in mine if int(m.group(1)) == self.process_index]
    self._next = max(ks) + 1 if ks else 0

  def append(self, latents, labels, indices) -> str:
    """Write one shard: latents (n, 2, h, w, C) [image, mirror], labels (n,), indices (n,)."""
    latents = np.asarray(latents)
    labels = np.asarray(labels)
    indices = np.asarray(indices)
    if latents.ndim != 5 or latents.shape[1] != 2:
      raise ValueError(f"latent cache: latents must have shape (n, 2, h, w, C) "
                       f"[unflipped, flipped], got {latents.shape}")
    n = latents.shape[0]
    if labels.shape != (n,) or indices.shape != (n,):
      raise ValueError(f"latent cache: labels {labels.shape} and indices {indices.shape} must both "
                       f"have shape ({n},) to match latents {latents.shape}")
    lat_name, meta_name = _shard_names(self.process_index, self._next)
    lat_path = os.path.join(self.directory, lat_name)
    _atomic_save(lat_path, lambda f: np.save(f, latents.astype(self.dtype, copy=False)))
    _atomic_save(os.path.join(self.directory, meta_name),
                 lambda f: np.savez(f, indices=indices.astype(np.int64),
                                    labels=labels.astype(np.int32)))
    self._next += 1
    return lat_path


class _RangedNpy:
  """A C-order .npy on an object store, read row by row with ranged reads (there is no memory
  mapping of gs:// objects): `arr[row]` and `arr[row, j]` as on the memory-mapped array."""

  def __init__(self, path: str):
    self.path = path
    with storage.open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, fortran, dtype = read_header(f)
      self._offset = f.tell()
    if fortran:
      raise ValueError(f"latent cache: {path} is Fortran-ordered")
    self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)

  def __getitem__(self, key):
    row, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
    sub = self.shape[1:]
    if rest:  # arr[row, j]: one contiguous piece of the row
      j = int(rest[0])
      sub, skip = self.shape[2:], j
    else:
      skip = 0
    n = int(np.prod(sub)) * self.dtype.itemsize
    start = self._offset + int(row) * int(np.prod(self.shape[1:])) * self.dtype.itemsize + skip * n
    data = storage.read_range(self.path, start, start + n)
    return np.frombuffer(data, self.dtype).reshape(sub)


class LatentCacheSource:
  """Random access over a latent cache: `[i] -> (float (2, h, w, C) [image, mirror], label)`.

  The iterator picks one of the two flips per (seed, epoch, index), as the image path
  does with its random horizontal flip.
  """

  kind = "latent"

  def __init__(self, directory: str, num_classes: int | None = None):
    self.directory = os.fspath(directory)
    if not storage.isdir(self.directory):
      raise FileNotFoundError(f"latent cache directory (data.path) not found: {self.directory}; "
                              "run --mode=cache_latents first")
    shards = _complete_shards(self.directory)
    names = set(storage.listdir(self.directory))
    for lat in storage.glob(self.directory, "latents-p*-*.npy"):
      meta = os.path.join(self.directory, "meta-" + os.path.basename(lat)[len("latents-"):-4] + ".npz")
      if os.path.basename(meta) not in names:
        logging.warning("latent cache: ignoring incomplete shard %s (no %s)", lat, meta)
    if not shards:
      raise FileNotFoundError(f"latent cache {self.directory} has no complete shards")
    self._arrays, indices, labels, shard_of, row_of = [], [], [], [], []
    shape = None
    for s, (lat_path, meta_path) in enumerate(shards):
      arr = (_RangedNpy(lat_path) if storage.is_remote(lat_path)
             else np.load(lat_path, mmap_mode="r"))
      with storage.load_npz(meta_path) as z:
        meta = {k: z[k] for k in z.files}
      if arr.ndim != 5 or arr.shape[1] != 2 or arr.shape[0] != meta["indices"].shape[0]:
        raise ValueError(f"latent cache: {lat_path} has shape {arr.shape}, expected "
                         f"({meta['indices'].shape[0]}, 2, h, w, C) from {meta_path}")
      if shape is None:
        shape = arr.shape[2:]
      elif arr.shape[2:] != shape:
        raise ValueError(f"latent cache: {lat_path} holds latents of shape {arr.shape[2:]}, other "
                         f"shards {shape}")
      self._arrays.append(arr)
      indices.append(meta["indices"])
      labels.append(meta["labels"])
      shard_of.append(np.full(arr.shape[0], s, np.int32))
      row_of.append(np.arange(arr.shape[0], dtype=np.int64))
    indices = np.concatenate(indices)
    order = np.argsort(indices, kind="stable")
    self.dataset_indices = indices[order]
    dup = self.dataset_indices[1:][np.diff(self.dataset_indices) == 0]
    if dup.size:
      raise ValueError(f"latent cache {self.directory}: dataset index {int(dup[0])} is cached twice "
                       f"({dup.size} duplicates); remove the stale shards")
    self.labels = np.concatenate(labels)[order]
    self._shard = np.concatenate(shard_of)[order]
    self._row = np.concatenate(row_of)[order]
    self.latent_shape = tuple(int(d) for d in shape)
    self._num_classes = num_classes
    logging.info("latent cache %s: %d examples of shape %s in %d shards", self.directory,
                 len(self), self.latent_shape, len(shards))

  @property
  def num_classes(self) -> int:
    return self._num_classes if self._num_classes else int(self.labels.max()) + 1

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    arr = self._arrays[self._shard[index]]
    return np.asarray(arr[self._row[index]], np.float32), int(self.labels[index])

  def read_flip(self, index: int, flip: bool) -> tuple[np.ndarray, int]:
    """Only the chosen (h, w, C) half of the pair: half the disk reads of `self[index]`.

    Kept in the cache's dtype, so a float16 cache also sends half the bytes to the device (the
    stage-2 loss converts to float32 there)."""
    arr = self._arrays[self._shard[index]]
    return np.asarray(arr[self._row[index], int(flip)]), int(self.labels[index])

  def describe(self, index: int) -> str:
    return f"latent cache entry {index} (dataset index {int(self.dataset_indices[index])})"
