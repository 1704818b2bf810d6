"""Shared helpers for name maps: flat dicts, clear errors naming file, key and shapes."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np


class StateDictError(ValueError):
  """A state_dict / checkpoint does not match the model it is loaded into."""


def flatten(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  """Nested dict (flax params) -> {'a/b/c': leaf}."""
  out: dict[str, Any] = {}

  def rec(prefix, node):
    if isinstance(node, Mapping):
      for k, v in node.items():
        rec(f"{prefix}{sep}{k}" if prefix else str(k), v)
    else:
      out[prefix] = node

  rec("", tree)
  return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  """{'a/b/c': leaf} -> nested dict."""
  out: dict[str, Any] = {}
  for key, value in flat.items():
    node = out
    parts = key.split(sep)
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = value
  return out


def check_keys(expected, got, source: str = "state_dict") -> None:
  """Raise naming the missing and unexpected keys."""
  expected, got = set(expected), set(got)
  missing, unexpected = sorted(expected - got), sorted(got - expected)
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing keys ({len(missing)}): {missing[:20]}")
    if unexpected:
      parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}")
    raise StateDictError(f"{source}: " + "; ".join(parts))


def check_shape(key: str, got_shape, expected_shape, source: str = "state_dict") -> None:
  """Raise naming the key and both shapes."""
  if tuple(got_shape) != tuple(expected_shape):
    raise StateDictError(
        f"{source}: key '{key}' has shape {tuple(got_shape)}, expected {tuple(expected_shape)}")


def to_numpy(x) -> np.ndarray:
  """torch.Tensor / jax.Array / numpy -> numpy (no torch import needed)."""
  if hasattr(x, "detach"):
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      x = x.float()
    return x.numpy()
  return np.asarray(x)


def seeded_state_dict(shapes: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Stand-in float32 weights for a {key: shape} state_dict by the golden vectors' numpy-only
  rule (../shared/reference README): seeded by crc32(key), BN running stats kept plausible. For
  tests and benchmarks where the real file (VGG, DINO, FID Inception) cannot be downloaded."""
  import zlib  # pylint: disable=g-import-not-at-top
  out = {}
  for key, shape in shapes.items():
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    if key.endswith("running_var"):
      out[key] = rng.uniform(0.5, 1.5, size=tuple(shape)).astype(np.float32)
    elif key.endswith("running_mean"):
      out[key] = (rng.standard_normal(size=tuple(shape)) * 0.1).astype(np.float32)
    else:
      out[key] = (rng.standard_normal(size=tuple(shape)) * 0.05).astype(np.float32)
  return out
