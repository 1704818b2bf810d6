"""Load the frozen HF encoders (DINOv2-reg, DINOv3, SigLIP2, MAE) from a hub id or a local folder.

A folder needs config.json, weights (model.safetensors, a sharded safetensors index, or
pytorch_model.bin) and preprocessor_config.json (image mean/std and input size, as the official
RAE reads them through AutoImageProcessor). Checkpoints may carry wrapper prefixes
(`vision_model.` for SiglipModel, `vit.` for ViTMAEForPreTraining); we find and strip them.
DINOv3 layers are `layer.{i}.` on the hub and `model.layer.{i}.` in transformers>=5 modules; both
load, and export writes the hub form.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rae_jax.interop import vit_names as vn
from rae_jax.interop.common import StateDictError, flatten, to_numpy, unflatten
from rae_jax.models.vit_encoders import ENCODERS, build_encoder, canonical_encoder_name

_WEIGHT_PATTERNS = ["config.json", "preprocessor_config.json", "*.safetensors",
                    "model.safetensors.index.json", "pytorch_model.bin"]
# model_type in config.json -> our encoder name (from each encoder's record)
_MODEL_TYPES = {t: name for name, spec in ENCODERS.items() for t in spec.hf_model_types}
_PREFIXES = ("", "vision_model.", "vit.", "dinov2_with_registers.", "model.")


@dataclasses.dataclass(frozen=True)
class HFEncoder:
  """A loaded encoder: module + params, and the preprocessing the RAE wrapper applies."""
  name: str
  module: Any
  params: Any
  image_mean: tuple
  image_std: tuple
  input_size: Optional[int]


def resolve_folder(name_or_path: str) -> pathlib.Path:
  """A local folder as is; otherwise a hub id fetched (or read from cache) by huggingface_hub."""
  path = pathlib.Path(name_or_path).expanduser()
  if path.is_dir():
    return path
  if path.exists() or str(name_or_path).startswith((".", "/")):
    raise FileNotFoundError(f"{name_or_path}: not an HF model folder")
  from huggingface_hub import snapshot_download
  return pathlib.Path(snapshot_download(str(name_or_path), allow_patterns=_WEIGHT_PATTERNS))


def read_config(folder: pathlib.Path) -> dict:
  """config.json; for a full SiglipModel returns its vision_config (with model_type kept)."""
  f = folder / "config.json"
  if not f.exists():
    raise FileNotFoundError(f"{f}: missing config.json")
  cfg = json.loads(f.read_text())
  if cfg.get("model_type") == "siglip2":
    raise ValueError(f"{f}: model_type 'siglip2' (NaFlex Siglip2Model) is not what the official "
                     "SigLIP2wNorm wrapper loads; use a fixed-resolution checkpoint "
                     "(model_type 'siglip', e.g. google/siglip2-base-patch16-256)")
  if "vision_config" in cfg:
    vision = dict(cfg["vision_config"])
    vision.setdefault("model_type", cfg.get("model_type"))
    return vision
  return cfg


def read_preprocessor(folder: pathlib.Path) -> tuple[tuple, tuple, Optional[int]]:
  """image_mean, image_std and the processor's output size (crop if it crops)."""
  f = folder / "preprocessor_config.json"
  if not f.exists():
    raise FileNotFoundError(f"{f}: missing preprocessor_config.json (image mean/std)")
  proc = json.loads(f.read_text())
  for k in ("image_mean", "image_std"):
    if k not in proc:
      raise ValueError(f"{f}: missing field '{k}'")
  size = proc.get("crop_size") if proc.get("do_center_crop") else proc.get("size")
  if isinstance(size, Mapping):
    size = size.get("height", size.get("shortest_edge"))
  return tuple(float(v) for v in proc["image_mean"]), tuple(float(v) for v in proc["image_std"]), (
      int(size) if size is not None else None)


def read_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """One tensor file: .safetensors, .npz, or a torch pickle (.bin/.pt/.pth) of a state_dict."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such file")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file
    return load_file(str(path))
  if path.suffix == ".npz":
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  import torch
  sd = torch.load(str(path), map_location="cpu", weights_only=True)
  for wrapper in ("state_dict", "model"):
    if isinstance(sd, Mapping) and set(sd) == {wrapper}:
      sd = sd[wrapper]
  if not isinstance(sd, Mapping):
    raise StateDictError(f"{path}: expected a state_dict (dict of tensors), "
                         f"got {type(sd).__name__}")
  return {k: to_numpy(v) for k, v in sd.items() if hasattr(v, "shape")}


def read_weights(folder: pathlib.Path) -> dict[str, np.ndarray]:
  index = folder / "model.safetensors.index.json"
  if (folder / "model.safetensors").exists():
    return read_tensors(folder / "model.safetensors")
  if index.exists():
    out = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
      out.update(read_tensors(folder / shard))
    return out
  if (folder / "pytorch_model.bin").exists():
    return read_tensors(folder / "pytorch_model.bin")
  raise FileNotFoundError(f"{folder}: no model.safetensors, safetensors index or pytorch_model.bin")


def _vit_table(module, block_names, registers: bool) -> list[vn.Entry]:
  """DINOv2-reg / MAE layout (HF Dinov2WithRegistersModel, ViTMAEModel)."""
  t = vn.conv("patch_embed", "embeddings.patch_embeddings.projection")
  t += [("cls_token", "embeddings.cls_token", "same"),
        ("position_embeddings", "embeddings.position_embeddings", "same")]
  if registers:
    t.append(("register_tokens", "embeddings.register_tokens", "same"))
  for i in range(module.num_hidden_layers):
    t += vn.block(f"blocks_{i}", f"encoder.layer.{i}", block_names, module.qkv_bias)
  return t


def _dinov2_table(module) -> list[vn.Entry]:
  t = _vit_table(module, vn.DINOV2_BLOCK, registers=True)
  return t + (vn.norm("final_norm", "layernorm") if not module.normalize else [])


def _mae_table(module) -> list[vn.Entry]:
  return _vit_table(module, vn.MAE_BLOCK, registers=False)


def _dinov3_table(module) -> list[vn.Entry]:
  t = vn.conv("patch_embed", "embeddings.patch_embeddings")
  t.append(("cls_token", "embeddings.cls_token", "same"))
  if module.num_register_tokens:
    t.append(("register_tokens", "embeddings.register_tokens", "same"))
  for i in range(module.num_hidden_layers):
    t += vn.dinov3_block(f"blocks_{i}", f"layer.{i}", module)
  return t + (vn.norm("final_norm", "norm") if not module.normalize else [])


def _siglip_table(module) -> list[vn.Entry]:
  t = vn.conv("patch_embed", "embeddings.patch_embedding")
  t.append(("position_embedding", "embeddings.position_embedding.weight", "same"))
  for i in range(module.num_hidden_layers):
    t += vn.block(f"blocks_{i}", f"encoder.layers.{i}", vn.SIGLIP_BLOCK)
  return t


# EncoderSpec.name_table -> table builder (module -> entries)
NAME_TABLES = {"dinov2_reg": _dinov2_table, "mae": _mae_table, "dinov3": _dinov3_table,
               "siglip2": _siglip_table}


def encoder_table(name: str, module) -> list[vn.Entry]:
  """Our flat param keys <-> HF (canonical, prefix-free) keys for one encoder."""
  spec = ENCODERS[canonical_encoder_name(name)]
  if spec.name_table not in NAME_TABLES:
    raise ValueError(f"no HF name table for encoder {name!r}")
  return NAME_TABLES[spec.name_table](module)


def param_shapes(module, image_size: int) -> dict[str, tuple]:
  """Flat param shapes without allocating (jax.eval_shape)."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  tree = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x))["params"]
  return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def _strip_prefix(state_dict: Mapping, probe: str, source: str) -> dict:
  for prefix in _PREFIXES:
    if prefix + probe in state_dict:
      n = len(prefix)
      return {k[n:]: v for k, v in state_dict.items() if k.startswith(prefix)}
  raise StateDictError(f"{source}: missing key '{probe}' (looked under prefixes {list(_PREFIXES)})")


def params_from_hf(name: str, module, state_dict: Mapping, source: str = "HF checkpoint"):
  """HF state_dict -> our nested params; the final layernorm affine is dropped like the wrappers
  (kept only for dinov2_reg / dinov3 with normalize=False, as Dinov2withNorm(normalize=False))."""
  name = canonical_encoder_name(name)
  sd = _strip_prefix(state_dict, ENCODERS[name].probe_key, source)
  if name == "dinov3":  # transformers>=5 module names -> hub checkpoint names
    sd = {k[len("model."):] if k.startswith("model.layer.") else k: v for k, v in sd.items()}
  shapes = param_shapes(module, module.image_size)
  table = encoder_table(name, module)
  vn.check_table(table, shapes, name)
  return unflatten(vn.import_tensors(table, sd, shapes, source))


def params_to_hf(name: str, module, params) -> dict[str, np.ndarray]:
  """Our params -> HF keys (no final-norm affine: the wrappers never use it)."""
  name = canonical_encoder_name(name)
  return vn.export_tensors(encoder_table(name, module), flatten(params))


def square_sizes(config: Mapping, source: str) -> dict:
  """HF configs may give patch_size / image_size as [h, w]; our encoders take square ints."""
  out = dict(config)
  for k in ("patch_size", "image_size"):
    v = out.get(k)
    if isinstance(v, (list, tuple)):
      if len(v) != 2 or v[0] != v[1]:
        raise ValueError(f"{source}: config.json {k}={list(v)}; only square sizes are supported")
      out[k] = int(v[0])
  return out


def infer_encoder_name(config: Mapping) -> str:
  mt = config.get("model_type")
  if mt not in _MODEL_TYPES:
    raise ValueError(f"config.json model_type {mt!r} is not a supported encoder; "
                     f"expected one of {sorted(_MODEL_TYPES)}")
  return _MODEL_TYPES[mt]


def load_hf_encoder(name_or_path: str, encoder_name: Optional[str] = None,
                    dtype=jnp.float32, **overrides) -> HFEncoder:
  """Hub id or local folder -> HFEncoder. `encoder_name` defaults to the config's model_type;
  `overrides` are module fields (e.g. normalize=False for dinov2_reg)."""
  folder = resolve_folder(name_or_path)
  config = square_sizes(read_config(folder), str(folder / "config.json"))
  name = canonical_encoder_name(encoder_name) if encoder_name else infer_encoder_name(config)
  module = build_encoder(name, config, dtype=dtype, **overrides)
  params = params_from_hf(name, module, read_weights(folder), source=str(folder))
  mean, std, size = read_preprocessor(folder)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  return HFEncoder(name, module, params, mean, std, size)
