"""LPIPS weights from the usual PyTorch files.

- VGG16 trunk: torchvision's ImageNet `vgg16` state_dict (`vgg16-397923af.pth`, what
  `torchvision.models.vgg16(pretrained=True)` downloads to ~/.cache/torch/hub/checkpoints/); keys
  `features.{i}.weight|bias` (the classifier keys are ignored).
- Linear heads: LPIPS `vgg.pth` (taming-transformers' `vgg_lpips` / the `lpips` package's
  `weights/v0.1/vgg.pth`); keys `lin{k}.model.1.weight`, shape (1, C, 1, 1).
A full official `LPIPS().state_dict()` (`net.slice{s}.{j}.*`, `lin*`, `scaling_layer.*`) also loads.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from rae_jax.interop.common import StateDictError, check_keys, check_shape, to_numpy
from rae_jax.losses.lpips import CHANNELS, SCALE, SHIFT, VGG16_LAYERS

_CONVS = [layer for layer in VGG16_LAYERS if layer != "M"]
_SLICE_STARTS = (0, 4, 9, 16, 23)  # official VGG16FeatureExtractor slices of `features`


def _conv_in_channels():
  chans, prev = {}, 3
  for idx, ch in _CONVS:
    chans[idx] = prev
    prev = ch
  return chans


def lpips_params_from_torch(vgg_sd: Mapping, lin_sd: Mapping, source: str = "LPIPS weights") -> dict:
  """Flax params for `rae_jax.losses.lpips.LPIPS` from a torchvision vgg16 and an LPIPS lin state_dict."""
  vgg = {k: v for k, v in vgg_sd.items() if k.startswith("features.")}
  in_ch = _conv_in_channels()
  expected = [f"features.{i}.{p}" for i, _ in _CONVS for p in ("weight", "bias")]
  check_keys(expected, vgg, f"{source} (vgg16 features)")
  trunk = {}
  for idx, ch in _CONVS:
    w = to_numpy(vgg[f"features.{idx}.weight"]).astype(np.float32)
    b = to_numpy(vgg[f"features.{idx}.bias"]).astype(np.float32)
    check_shape(f"features.{idx}.weight", w.shape, (ch, in_ch[idx], 3, 3), source)
    check_shape(f"features.{idx}.bias", b.shape, (ch,), source)
    trunk[f"features_{idx}"] = {"kernel": np.transpose(w, (2, 3, 1, 0)), "bias": b}
  lin = {k: v for k, v in lin_sd.items() if k.startswith("lin")}
  check_keys([f"lin{k}.model.1.weight" for k in range(5)], lin, f"{source} (lin layers)")
  params = {"vgg": trunk}
  for k, ch in enumerate(CHANNELS):
    key = f"lin{k}.model.1.weight"
    w = to_numpy(lin[key]).astype(np.float32)
    check_shape(key, w.shape, (1, ch, 1, 1), source)
    params[f"lin_{k}"] = w.reshape(ch)
  return params


def lpips_params_from_state_dict(sd: Mapping, source: str = "LPIPS state_dict") -> dict:
  """From a whole official `LPIPS` module state_dict (net.slice*/lin*, optional scaling_layer.*)."""
  for name, want in (("shift", SHIFT), ("scale", SCALE)):
    key = f"scaling_layer.{name}"
    if key in sd and not np.allclose(to_numpy(sd[key]).reshape(-1), want):
      raise StateDictError(f"{source}: '{key}' = {to_numpy(sd[key]).reshape(-1)} differs from the fixed {want}")
  vgg, lin, unknown = {}, {}, []
  for key, value in sd.items():
    parts = key.split(".")
    if parts[0] == "net" and len(parts) == 4 and parts[1].startswith("slice"):
      s = int(parts[1][len("slice"):]) - 1
      if not 0 <= s < 5:
        unknown.append(key)
        continue
      vgg[f"features.{_SLICE_STARTS[s] + int(parts[2])}.{parts[3]}"] = value
    elif parts[0].startswith("lin"):
      lin[key] = value
    elif parts[0] != "scaling_layer":
      unknown.append(key)
  if unknown:
    raise StateDictError(f"{source}: unexpected keys ({len(unknown)}): {sorted(unknown)[:20]}")
  return lpips_params_from_torch(vgg, lin, source)


def _torch_load(path: str) -> dict:
  import torch  # only needed at the file boundary
  sd = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(sd, Mapping):
    raise StateDictError(f"{path}: expected a state_dict, got {type(sd).__name__}")
  return {k: to_numpy(v) for k, v in sd.items()}


def load_lpips_params(vgg_path: str, lin_path: str) -> dict:
  """Read torchvision `vgg16-*.pth` and LPIPS `vgg.pth` from local paths."""
  return lpips_params_from_torch(_torch_load(vgg_path), _torch_load(lin_path),
                                 source=f"{vgg_path} + {lin_path}")
