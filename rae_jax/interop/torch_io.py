"""Streaming reads and writes of PyTorch checkpoint files (.pt / .safetensors / .npz).

Tensors are opened lazily (torch.load(mmap=True), safetensors.safe_open), so shapes can be
validated before a byte of weights is read and conversion touches one tensor at a time: host
memory stays at about one copy of the checkpoint on top of the (page-cache) mapped file.
torch is optional: it is imported only when a .pt file is read or written.
"""
from __future__ import annotations

import json
import pathlib
import pickle
import warnings
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from rae_jax.atomic import set_default_mode
from rae_jax.interop.common import StateDictError, to_numpy

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Prefixes left by DistributedDataParallel and torch.compile (the official extract script strips
# the same ones).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def require_torch(what: str):
  try:
    import torch
  except ImportError as e:  # torch is an optional dependency
    raise ImportError(f"{what} needs PyTorch (`pip install torch`, the CPU build is enough); "
                      f"use .safetensors files to avoid it") from e
  return torch


class TensorFile(Mapping):
  """Read-only {key: numpy array} view of one checkpoint entry; `shape(key)` reads no data.

  `entry` says which part of the file it is: 'plain' (a bare state_dict), 'ema' or 'model'
  (official training checkpoints) or 'state_dict'.
  """

  def __init__(self, path: str, tensors: Mapping[str, Any], entry: str, shapes=None,
               rename: Optional[Mapping[str, str]] = None, entries: tuple = ()):
    self.path, self.entry = path, entry
    self.entries = tuple(entries) or (entry,)  # every weights entry the file has
    self._tensors = tensors
    self._shape_of = shapes  # backend's data-free shape lookup, if any
    # our key -> key in `tensors` (identity unless wrapper prefixes were stripped)
    self._src = dict(rename) if rename is not None else {k: k for k in tensors.keys()}

  def __getitem__(self, key: str) -> np.ndarray:
    return to_numpy(self._tensors[self._src[key]])

  def __iter__(self) -> Iterator[str]:
    return iter(self._src)

  def __len__(self) -> int:
    return len(self._src)

  def __contains__(self, key) -> bool:
    return key in self._src

  def shape(self, key: str) -> tuple[int, ...]:
    src = self._src[key]
    if self._shape_of is not None:
      return tuple(self._shape_of(src))
    return tuple(self._tensors[src].shape)

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {k: self.shape(k) for k in self._src}

  def with_keys(self, rename: Mapping[str, str]) -> "TensorFile":
    """A view with keys renamed ({new key: current key}); keys not named are dropped."""
    src = {new: self._src[old] for new, old in rename.items()}
    return TensorFile(self.path, self._tensors, self.entry, self._shape_of, src, self.entries)


class _Safetensors(Mapping):
  """safe_open as a Mapping whose `in` and shapes never read tensor data."""

  def __init__(self, path: pathlib.Path):
    from safetensors import safe_open
    self._path = path
    self._handle = safe_open(str(path), framework="numpy")
    self._keys = list(self._handle.keys())
    self._key_set = set(self._keys)

  def __getitem__(self, key):
    if key not in self._key_set:
      raise KeyError(key)
    if self._handle.get_slice(key).get_dtype() == "BF16":  # numpy has no bfloat16
      return self._bfloat16(key)
    return self._handle.get_tensor(key)

  def _bfloat16(self, key) -> np.ndarray:
    import ml_dtypes  # ships with jax
    with open(self._path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      info = json.loads(f.read(n))[key]
    start, end = info["data_offsets"]
    raw = np.memmap(self._path, np.uint8, mode="r", offset=8 + n + start, shape=(end - start,))
    return raw.view(ml_dtypes.bfloat16).reshape(info["shape"]).astype(np.float32)

  def __contains__(self, key):
    return key in self._key_set

  def __iter__(self):
    return iter(self._keys)

  def __len__(self):
    return len(self._keys)

  def shape(self, key):
    return tuple(self._handle.get_slice(key).get_shape())


def _torch_load(path: pathlib.Path):
  torch = require_torch(f"reading {path}")
  try:
    try:
      return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
      if "mmap" not in str(e) and "zip" not in str(e):
        raise
      # Legacy (pre-1.6, non-zip) pickles cannot be memory-mapped.
      return torch.load(str(path), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise StateDictError(f"{path}: not loadable with torch.load(weights_only=True) (it holds "
                         f"more than tensors and plain containers): {str(e)[:300]}") from e


WRAPPER_ENTRIES = ("ema", "model", "state_dict")


def _select_entry(obj, path: pathlib.Path, entry: Optional[str] = None
                  ) -> tuple[Mapping, str, tuple]:
  """Plain state_dict, or the `entry` (default: 'ema', else 'model', else 'state_dict') of a
  training-checkpoint wrapper; also returns every wrapper entry the file has."""
  if not isinstance(obj, Mapping):
    raise StateDictError(f"{path}: expected a state_dict (dict of tensors), got {type(obj).__name__}")
  found = tuple(e for e in WRAPPER_ENTRIES if isinstance(obj.get(e), Mapping))
  if entry is not None:
    if entry not in found:
      raise StateDictError(f"{path}: no '{entry}' entry (it has {list(found) or 'none'})")
    return obj[entry], entry, found
  if found:
    return obj[found[0]], found[0], found
  return obj, "plain", ("plain",)


def _strip_wrappers(keys) -> dict[str, str]:
  out = {}
  for k in keys:
    k2 = k
    while k2.startswith(WRAPPER_PREFIXES):
      for p in WRAPPER_PREFIXES:
        if k2.startswith(p):
          k2 = k2[len(p):]
    out[k2] = k
  return out


def open_tensors(path, entry: Optional[str] = None) -> TensorFile:
  """Lazily open a checkpoint: .safetensors, .npz, or a torch pickle (weights_only).

  A training checkpoint ({'model', 'ema', ...}) opens at `entry` (default 'ema', else 'model');
  `TensorFile.entries` lists the others, to open with `entry=`."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file")
  if entry not in (None, "plain") and path.suffix in (".safetensors", ".npz"):
    raise StateDictError(f"{path}: a plain state_dict has no '{entry}' entry")
  try:
    if path.suffix == ".safetensors":
      st = _Safetensors(path)
      tf = TensorFile(str(path), st, "plain", shapes=st.shape)
    elif path.suffix == ".npz":
      tf = TensorFile(str(path), np.load(path), "plain")
    else:
      obj = _torch_load(path)
  except (StateDictError, ImportError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    # torch/zip/safetensors errors do not say which file ("PytorchStreamReader failed reading
    # zip archive"); up to four files are imported at once.
    text = str(e).strip()
    raise StateDictError(f"{path}: cannot read this file ({type(e).__name__}: "
                         f"{text.splitlines()[0] if text else ''}); is it truncated or "
                         "damaged (an interrupted download)?") from e
  if path.suffix not in (".safetensors", ".npz"):
    sd, entry, found = _select_entry(obj, path, entry)
    sd = {k: v for k, v in sd.items() if hasattr(v, "shape")}  # drop e.g. `_metadata`
    tf = TensorFile(str(path), sd, entry, entries=found)
  rename = _strip_wrappers(tf)
  if any(k != v for k, v in rename.items()):
    tf = tf.with_keys(rename)
  return tf


def save_torch(state_dict: Mapping[str, np.ndarray], path) -> None:
  """torch.save of a {key: tensor} dict; tensors share memory with the numpy arrays."""
  torch = require_torch(f"writing {path}")
  with warnings.catch_warnings():  # read-only arrays (orbax restores) are only read here
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
  torch.save(sd, str(path))


def save_safetensors(state_dict: Mapping[str, np.ndarray], path) -> None:
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path))
  set_default_mode(str(path))  # safetensors creates it 0600
