"""Name tables between our flax ViT params and PyTorch state_dicts (decoder and HF encoders).

A table is a list of (our_flat_key, torch_key, kind); `kind` says how the tensor layout changes:
  'linear': torch (out, in)          <-> flax kernel (in, out)
  'conv':   torch (out, in, kh, kw)  <-> flax kernel (kh, kw, in, out)
  'same':   identical layout
Tables are written out explicitly per model (readable, greppable) and checked for completeness
against the module's parameter tree, so a forgotten or stray entry fails loudly.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from rae_jax.interop.common import StateDictError, check_shape, to_numpy

Entry = tuple[str, str, str]

# Per-block module names: our ViTBlock path -> torch sub-module name.
MAE_BLOCK = {  # ViTMAELayer (official decoder, HF ViT-MAE)
    "norm1": "layernorm_before", "attn/q": "attention.attention.query",
    "attn/k": "attention.attention.key", "attn/v": "attention.attention.value",
    "attn/o": "attention.output.dense", "norm2": "layernorm_after",
    "mlp/fc1": "intermediate.dense", "mlp/fc2": "output.dense",
}
DINOV2_BLOCK = {
    "norm1": "norm1", "attn/q": "attention.attention.query", "attn/k": "attention.attention.key",
    "attn/v": "attention.attention.value", "attn/o": "attention.output.dense",
    "ls1": "layer_scale1.lambda1", "norm2": "norm2", "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2",
    "ls2": "layer_scale2.lambda1",
}
# DINOv3ViTLayer; k has no bias in the release (key_bias=False), so biases are listed per config.
DINOV3_BLOCK = {
    "norm1": "norm1", "attn/q": "attention.q_proj", "attn/k": "attention.k_proj",
    "attn/v": "attention.v_proj", "attn/o": "attention.o_proj", "ls1": "layer_scale1.lambda1",
    "norm2": "norm2", "mlp/up": "mlp.up_proj", "mlp/down": "mlp.down_proj",
    "ls2": "layer_scale2.lambda1",
}
SIGLIP_BLOCK = {
    "norm1": "layer_norm1", "attn/q": "self_attn.q_proj", "attn/k": "self_attn.k_proj",
    "attn/v": "self_attn.v_proj", "attn/o": "self_attn.out_proj", "norm2": "layer_norm2",
    "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2",
}


def dense(ours: str, theirs: str, bias: bool = True) -> list[Entry]:
  out = [(f"{ours}/kernel", f"{theirs}.weight", "linear")]
  return out + ([(f"{ours}/bias", f"{theirs}.bias", "same")] if bias else [])


def conv(ours: str, theirs: str) -> list[Entry]:
  return [(f"{ours}/kernel", f"{theirs}.weight", "conv"),
          (f"{ours}/bias", f"{theirs}.bias", "same")]


def norm(ours: str, theirs: str) -> list[Entry]:
  return [(f"{ours}/scale", f"{theirs}.weight", "same"), (f"{ours}/bias", f"{theirs}.bias", "same")]


def _entries(ours: str, theirs: str, names: Mapping[str, str], has_bias) -> list[Entry]:
  out: list[Entry] = []
  for sub, tsub in names.items():
    o, t = f"{ours}/{sub}", f"{theirs}.{tsub}"
    if sub.startswith("norm"):
      out += norm(o, t)
    elif sub.startswith("ls"):
      out.append((o, t, "same"))
    else:
      out += dense(o, t, bias=has_bias(sub))
  return out


def block(ours: str, theirs: str, names: Mapping[str, str], qkv_bias: bool = True) -> list[Entry]:
  """Entries of one ViTBlock under our prefix `ours` and torch prefix `theirs`."""
  return _entries(ours, theirs, names,
                  lambda sub: qkv_bias or sub in ("attn/o", "mlp/fc1", "mlp/fc2"))


def dinov3_block(ours: str, theirs: str, module) -> list[Entry]:
  """One DINOv3 layer; `module` (a Dinov3Encoder) says which biases exist and if the MLP is gated."""
  bias = {"attn/q": module.query_bias, "attn/k": module.key_bias, "attn/v": module.value_bias,
          "attn/o": module.proj_bias, "mlp/up": module.mlp_bias, "mlp/down": module.mlp_bias,
          "mlp/gate": module.mlp_bias}
  names = dict(DINOV3_BLOCK)
  if module.use_gated_mlp:
    names["mlp/gate"] = "mlp.gate_proj"
  return _entries(ours, theirs, names, bias.__getitem__)


def torch_shape(kind: str, shape) -> tuple:
  shape = tuple(shape)
  if kind == "linear":
    return shape[::-1]
  if kind == "conv":
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  return shape


def to_ours(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == "linear":
    return np.ascontiguousarray(x.T)
  if kind == "conv":
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
  return x


def to_torch(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == "linear":
    return np.ascontiguousarray(x.T)
  if kind == "conv":
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
  return x


def check_table(table: Iterable[Entry], our_shapes: Mapping[str, tuple], what: str) -> None:
  """The table must name exactly the module's parameters (guards the tables themselves)."""
  keys = {e[0] for e in table}
  if keys != set(our_shapes):
    raise RuntimeError(f"{what} name table out of sync with the module: "
                       f"unmapped params {sorted(set(our_shapes) - keys)[:10]}, "
                       f"stale entries {sorted(keys - set(our_shapes))[:10]}")


def import_tensors(table: Iterable[Entry], state_dict: Mapping, our_shapes: Mapping[str, tuple],
                   source: str, dtype=np.float32) -> dict[str, np.ndarray]:
  """torch tensors -> our flat params, naming any missing key or wrong shape."""
  out = {}
  for ours, theirs, kind in table:
    if theirs not in state_dict:
      raise StateDictError(f"{source}: missing key '{theirs}' (needed for '{ours}')")
    x = to_numpy(state_dict[theirs])
    check_shape(theirs, x.shape, torch_shape(kind, our_shapes[ours]), source)
    out[ours] = to_ours(kind, x).astype(dtype)
  return out


def export_tensors(table: Iterable[Entry], flat_params: Mapping) -> dict[str, np.ndarray]:
  return {theirs: to_torch(kind, np.asarray(flat_params[ours])) for ours, theirs, kind in table}
