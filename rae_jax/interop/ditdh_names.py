"""Name maps between our DiTDH / LightningDiT params and the official PyTorch `state_dict()`.

Pure numpy. The flax tree mirrors the PyTorch module tree, so one rule per path component
suffices: `blocks_7` <-> `blocks.7`, `mlp_0` <-> `mlp.0`, `adaLN_modulation` <->
`adaLN_modulation.1` (index 1 of nn.Sequential(SiLU, Linear)), `<module>/proj` stays; leaves
`kernel` <-> `weight` (transposed: Linear (out, in), Conv (out, in, kh, kw)), `scale`/`embedding`
<-> `weight`. Scanned stacks (`enc_blocks`, `head_blocks`, LightningDiT `blocks`) carry a leading
layer axis and fan out to `blocks.{first + i}`.

The fixed buffers (`pos_embed`, `*feat_rope.freqs_cos/sin`) are not params: export computes them
from the config, import checks their shape and that they equal those tables (a checkpoint for
another geometry fails loudly instead of silently using different positions). Export computes the
RoPE tables with torch float32 ops when torch is installed (it is, wherever export_torch runs), so
they are bit-identical to what the official `VisionRotaryEmbeddingFast` registers; numpy's
float32 cos/sin differ from torch's by 1 ulp on some elements.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rae_jax.interop.common import (StateDictError, check_keys, check_shape, flatten, to_numpy,
                                    unflatten)
from rae_jax.models import layers
from rae_jax.models.ditdh import DiTDH
from rae_jax.models.lightning_dit import LightningDiT

_INDEXED = re.compile(r"^(.*)_(\d+)$")
_BUFFER_ATOL = 1e-4


# ----------------------------------------------------------------------------------------------
# Model / config handling.


def _as_model(config, cls):
  if isinstance(config, cls):
    return config
  if isinstance(config, Mapping):
    cfg = dict(config)
    if "config" in cfg and isinstance(cfg["config"], Mapping):  # fixture-style {"config": {...}}
      cfg = dict(cfg["config"])
    return cls(**cfg)
  raise TypeError(f"config must be a {cls.__name__} or a mapping of its kwargs, got {type(config)}")


def _unwrap_params(params):
  if isinstance(params, Mapping) and set(params.keys()) == {"params"}:
    return params["params"]
  return params


def _param_shapes(model) -> dict[str, tuple[int, ...]]:
  """Flat {flax path: shape} without allocating anything (jax.eval_shape over init)."""
  n = model.input_size
  x = jax.ShapeDtypeStruct((1, n, n, model.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
  return {k: tuple(v.shape) for k, v in flatten(shapes["params"]).items()}


def _scan_groups(model) -> dict[str, int]:
  """Scanned module name -> global block index of its first layer."""
  if not model.scan_layers:
    return {}
  if isinstance(model, DiTDH):
    return {"enc_blocks": 0, "head_blocks": model.depths[0]}
  return {"blocks": 0}


# ----------------------------------------------------------------------------------------------
# Per-leaf rules.


def _torch_module(parts: list[str]) -> str:
  out = []
  for p in parts:
    m = _INDEXED.match(p)
    if p == "adaLN_modulation":
      out.append("adaLN_modulation.1")
    elif m:
      out.append(f"{m.group(1)}.{m.group(2)}")
    else:
      out.append(p)
  return ".".join(out)


def _leaf(name: str, ndim: int) -> tuple[str, str]:
  """flax leaf name + ndim (per layer) -> (torch leaf name, transform)."""
  if name == "kernel":
    return "weight", {2: "linear", 4: "conv"}[ndim]
  if name in ("scale", "embedding"):
    return "weight", "copy"
  if name in ("bias", "W"):
    return name, "copy"
  raise StateDictError(f"no PyTorch name rule for flax leaf '{name}'")


def _to_torch_array(a: np.ndarray, how: str) -> np.ndarray:
  if how == "linear":
    return np.ascontiguousarray(a.T)
  if how == "conv":  # (kh, kw, in, out) -> (out, in, kh, kw)
    return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
  return a


def _from_torch_array(a: np.ndarray, how: str) -> np.ndarray:
  if how == "linear":
    return np.ascontiguousarray(a.T)
  if how == "conv":  # (out, in, kh, kw) -> (kh, kw, in, out)
    return np.ascontiguousarray(a.transpose(2, 3, 1, 0))
  return a


def _torch_shape(shape: tuple[int, ...], how: str) -> tuple[int, ...]:
  if how == "linear":
    return shape[::-1]
  if how == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


def _plan(flat_shapes: Mapping[str, tuple], groups: Mapping[str, int]):
  """[(flax path, layer index or None, torch key, transform, per-layer flax shape)]."""
  plan = []
  for path, shape in flat_shapes.items():
    parts = path.split("/")
    if parts[0] in groups:
      for i in range(shape[0]):
        mod = [f"blocks_{groups[parts[0]] + i}"] + parts[1:-1]
        leaf, how = _leaf(parts[-1], len(shape) - 1)
        plan.append((path, i, f"{_torch_module(mod)}.{leaf}", how, tuple(shape[1:])))
    else:
      leaf, how = _leaf(parts[-1], len(shape))
      plan.append((path, None, f"{_torch_module(parts[:-1])}.{leaf}", how, tuple(shape)))
  return plan


def _torch_rope_tables(head_dim: int, grid: int, theta: float = 10000.0):
  """EVA's VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid) buffers, with the same
  torch float32 ops (and so the same rounding) as the official module; None without torch."""
  try:
    import torch
  except ImportError:
    return None
  dim = head_dim // 2
  inv = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
  pos = torch.arange(grid) / grid * grid
  ang = torch.einsum("n,f->nf", pos, inv).repeat_interleave(2, dim=-1)  # (grid, dim)
  full = torch.cat([ang[:, None, :].expand(grid, grid, dim),
                    ang[None, :, :].expand(grid, grid, dim)], dim=-1).reshape(grid * grid, -1)
  return full.cos().numpy(), full.sin().numpy()


def _rope_tables(head_dim: int, grid: int, exact: bool):
  tables = layers.rope_tables(head_dim, grid)  # also validates head_dim
  exact_tables = _torch_rope_tables(head_dim, grid) if exact else None
  return tables if exact_tables is None else exact_tables


def _buffers(model, exact: bool = False) -> dict[str, np.ndarray]:
  """The official non-parameter buffers implied by the config, keyed by torch name.

  exact=True (export) computes RoPE tables with torch so they match the official bit for bit."""
  out = {}
  if isinstance(model, DiTDH):
    (enc_w, dec_w), (enc_h, dec_h), (s_grid, x_grid) = model.widths, model.heads, model.grids
    if model.use_pos_embed:
      out["pos_embed"] = layers.get_2d_sincos_pos_embed(enc_w, s_grid)[None]
    if model.use_rope:
      for name, w, h, g in (("enc_feat_rope", enc_w, enc_h, s_grid),
                            ("dec_feat_rope", dec_w, dec_h, x_grid)):
        cos, sin = _rope_tables(w // h, g, exact)
        out[f"{name}.freqs_cos"], out[f"{name}.freqs_sin"] = cos, sin
  else:
    d, grid = model.hidden_size, model.grid
    out["pos_embed"] = layers.get_2d_sincos_pos_embed(d, grid)[None]
    if model.use_rope:
      cos, sin = _rope_tables(d // model.num_heads, grid, exact)
      out["feat_rope.freqs_cos"], out["feat_rope.freqs_sin"] = cos, sin
  return {k: np.array(v, np.float32) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Generic export / import.


def _to_torch(params, model) -> dict[str, np.ndarray]:
  flat = {k: np.asarray(v) for k, v in flatten(_unwrap_params(params)).items()}
  sd: dict[str, np.ndarray] = {}
  for path, i, key, how, _ in _plan({k: v.shape for k, v in flat.items()}, _scan_groups(model)):
    a = flat[path] if i is None else flat[path][i]
    sd[key] = _to_torch_array(a, how)
  sd.update(_buffers(model, exact=True))
  return sd


def _from_torch(state_dict: Mapping[str, Any], model, source: str) -> dict:
  plan = _plan(_param_shapes(model), _scan_groups(model))
  buffers = _buffers(model)
  check_keys([p[2] for p in plan] + list(buffers), state_dict.keys(), source)

  for key, table in buffers.items():
    got = to_numpy(state_dict[key])
    check_shape(key, got.shape, table.shape, source)
    diff = float(np.max(np.abs(got.astype(np.float64) - table))) if got.size else 0.0
    if diff > _BUFFER_ATOL:
      raise StateDictError(f"{source}: buffer '{key}' differs from the fixed table the config "
                           f"implies (max abs diff {diff:.3g}); wrong input_size/patch/heads?")

  layers_by_path: dict[str, dict[int, np.ndarray]] = {}
  flat: dict[str, np.ndarray] = {}
  for path, i, key, how, shape in plan:
    got = to_numpy(state_dict[key])
    check_shape(key, got.shape, _torch_shape(shape, how), source)
    a = _from_torch_array(got.astype(np.float32, copy=False), how)
    if i is None:
      flat[path] = a
    else:
      layers_by_path.setdefault(path, {})[i] = a
  for path, per_layer in layers_by_path.items():
    flat[path] = np.stack([per_layer[i] for i in range(len(per_layer))])
  return unflatten(flat)


# ----------------------------------------------------------------------------------------------
# Public API.


def ditdh_to_torch(params, config) -> dict[str, np.ndarray]:
  """DiTDH params (or {'params': ...}) -> official DiTwDDTHead state_dict (numpy, buffers too)."""
  return _to_torch(params, _as_model(config, DiTDH))


def ditdh_from_torch(state_dict: Mapping[str, Any], config, source: str = "DiTDH state_dict"):
  """Official DiTwDDTHead state_dict (numpy or torch tensors) -> DiTDH params (numpy float32).

  `config` is a DiTDH or its kwargs; its `scan_layers` picks the layout of the result.
  """
  return _from_torch(state_dict, _as_model(config, DiTDH), source)


def lightning_dit_to_torch(params, config) -> dict[str, np.ndarray]:
  """LightningDiT params -> official LightningDiT state_dict (numpy, buffers too)."""
  return _to_torch(params, _as_model(config, LightningDiT))


def lightning_dit_from_torch(state_dict: Mapping[str, Any], config,
                             source: str = "LightningDiT state_dict"):
  """Official LightningDiT state_dict -> LightningDiT params (numpy float32)."""
  return _from_torch(state_dict, _as_model(config, LightningDiT), source)


def torch_shapes(model) -> dict[str, tuple[int, ...]]:
  """{torch key: shape} that export produces for a DiTDH / LightningDiT, without any weights."""
  if not isinstance(model, (DiTDH, LightningDiT)):
    raise TypeError(f"expected a DiTDH or LightningDiT module, got {type(model)}")
  out = {key: _torch_shape(shape, how)
         for _, _, key, how, shape in _plan(_param_shapes(model), _scan_groups(model))}
  out.update({k: v.shape for k, v in _buffers(model).items()})
  return out
