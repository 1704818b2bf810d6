"""ViTDecoder params <-> official `GeneralDecoder.state_dict()` (the released decoder `model.pt`).

`decoder_pos_embed` is a parameter here (the official stage-1 trainer trains it, see
models/decoder.py): export writes our values and import reads the file's; a file without it (it is
a buffer-like entry some exports drop) gets the sin-cos table it was initialised to.
"""
from __future__ import annotations

import pathlib
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rae_jax.interop import vit_names as vn
from rae_jax.atomic import set_default_mode
from rae_jax.interop.common import StateDictError, flatten, unflatten
from rae_jax.interop.hf_encoders import read_tensors
from rae_jax.models.decoder import ViTDecoder
from rae_jax.models.layers import to_layout

POS_KEY = "decoder_pos_embed"


def decoder_table(module: ViTDecoder) -> list[vn.Entry]:
  t = vn.dense("decoder_embed", "decoder_embed")
  t.append(("decoder_pos_embed", POS_KEY, "same"))
  t.append(("trainable_cls_token", "trainable_cls_token", "same"))
  for i in range(module.decoder_num_hidden_layers):
    t += vn.block(f"decoder_layers_{i}", f"decoder_layers.{i}", vn.MAE_BLOCK, module.qkv_bias)
  t += vn.norm("decoder_norm", "decoder_norm")
  t += vn.dense("decoder_pred", "decoder_pred")
  return t


def param_shapes(module: ViTDecoder) -> dict[str, tuple]:
  """Flat param shapes (per-layer layout, whatever module.scan_layers) via jax.eval_shape:
  nothing is allocated, so XL is cheap."""
  module = module.clone(scan_layers=False)
  z = jax.ShapeDtypeStruct((1, module.num_patches, module.hidden_size), jnp.float32)
  tree = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), z)["params"]
  return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def state_dict_shapes(module: ViTDecoder) -> dict[str, tuple]:
  """{torch key: shape} of the official module's state_dict for this config."""
  shapes = param_shapes(module)
  table = decoder_table(module)
  vn.check_table(table, shapes, "decoder")
  return {t: vn.torch_shape(kind, shapes[o]) for o, t, kind in table}


def to_state_dict(module: ViTDecoder, params) -> dict[str, np.ndarray]:
  """Our params (either layout) -> official state_dict (numpy, torch layout)."""
  params = to_layout(jax.device_get(params), module.layer_layout, scanned=False)
  return vn.export_tensors(decoder_table(module), flatten(params))


def from_state_dict(module: ViTDecoder, state_dict: Mapping, source: str = "decoder state_dict"):
  """Official state_dict -> our nested params. Strict: unknown keys are an error too."""
  shapes = param_shapes(module)
  table = decoder_table(module)
  vn.check_table(table, shapes, "decoder")
  unexpected = sorted(set(state_dict) - {t for _, t, _ in table})
  if unexpected:
    raise StateDictError(f"{source}: unexpected keys ({len(unexpected)}): {unexpected[:20]}")
  if POS_KEY not in state_dict:
    state_dict = {**state_dict, POS_KEY: module.pos_embed()}
  params = unflatten(vn.import_tensors(table, state_dict, shapes, source))
  return to_layout(params, module.layer_layout, module.scan_layers)


def load_decoder_params(module: ViTDecoder, path) -> dict:
  """Read an official decoder checkpoint (model.pt / .safetensors / .npz) into our params."""
  path = pathlib.Path(path)
  params = from_state_dict(module, read_tensors(path), source=str(path))
  return jax.tree_util.tree_map(jnp.asarray, params)


def save_decoder_state_dict(module: ViTDecoder, params, path) -> None:
  """Write an official-layout checkpoint: torch.save for .pt/.pth, else safetensors."""
  path = pathlib.Path(path)
  sd = to_state_dict(module, params)
  if path.suffix in (".pt", ".pth", ".bin"):
    import torch
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, str(path))
  else:
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
    set_default_mode(str(path))  # safetensors creates it 0600
