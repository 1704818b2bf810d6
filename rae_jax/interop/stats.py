"""Latent normalisation stats: official `stat.pt` ({'mean','var'}, each (C, h, w)) <-> (h, w, C).

Either entry may be absent (the reference then uses mean 0 / var 1); we keep only what exists.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

import numpy as np

from rae_jax import storage
from rae_jax.interop.common import StateDictError, to_numpy

KEYS = ("mean", "var")


def _read(path: str) -> Mapping:
  suffix = os.path.splitext(path)[1]
  if suffix == ".safetensors":
    from safetensors.numpy import load
    return load(storage.read_bytes(path))
  if suffix == ".npz":
    with storage.load_npz(path) as z:
      return {k: z[k] for k in z.files}
  import torch
  with storage.open(path, "rb") as f:
    return torch.load(f, map_location="cpu", weights_only=True)


def load_stats(path, shape: Optional[tuple] = None) -> dict[str, np.ndarray]:
  """Read stat.pt (or a .safetensors/.npz twin, same (C,h,w) layout) -> {'mean','var'} (h,w,C).

  `shape`, if given, is the expected latent (h, w, C); a mismatch names the key and both shapes.
  """
  path = os.fspath(path)
  if not storage.exists(path):
    raise FileNotFoundError(f"{path}: no such stats file")
  raw = _read(path)
  if not isinstance(raw, Mapping) or not any(raw.get(k) is not None for k in KEYS):
    raise StateDictError(f"{path}: expected a dict with 'mean' and/or 'var'")
  out = {}
  for k in KEYS:
    if raw.get(k) is None:
      continue
    x = np.asarray(to_numpy(raw[k]), np.float32)
    if x.ndim != 3:
      raise StateDictError(f"{path}: key '{k}' has shape {x.shape}, expected (C, h, w)")
    x = np.ascontiguousarray(x.transpose(1, 2, 0))
    if shape is not None and x.shape != tuple(shape):
      raise StateDictError(
          f"{path}: key '{k}' has shape {x.shape} (h,w,C), expected {tuple(shape)}")
    out[k] = x
  return out


def save_stats(stats: Mapping[str, np.ndarray], path) -> None:
  """Write (h,w,C) stats in the official (C,h,w) layout: torch.save for .pt, else by suffix."""
  path = os.fspath(path)
  chw = {k: np.ascontiguousarray(np.asarray(v, np.float32).transpose(2, 0, 1))
         for k, v in stats.items() if k in KEYS}
  suffix = os.path.splitext(path)[1]
  if suffix == ".safetensors":
    from safetensors.numpy import save
    storage.write_bytes(path, save(chw))  # atomic; the mode open() would give (not 0600)
  elif suffix == ".npz":
    storage.write_file(path, lambda f: np.savez(f, **chw))
  else:
    import torch
    storage.write_file(path, lambda f: torch.save({k: torch.from_numpy(v) for k, v in chw.items()},
                                                  f))
