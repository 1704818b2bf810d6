"""DINO discriminator weights: the frozen ViT from the official `dino_vit_small_patch8_224.pth`
(facebookresearch/dino release, timm-style keys) and, optionally, trained heads from an official
`DinoDisc.state_dict()` (`heads.{i}....`, spectral norm as weight_orig/weight_u/weight_v).

As the reference, the key third of every qkv bias is zeroed on load (it only adds a per-query
constant to the logits, which softmax ignores). `norm.*` must be present but is unused: the
discriminator taps block outputs before the final norm.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rae_jax.interop.common import StateDictError, check_keys, check_shape, flatten, to_numpy
from rae_jax.losses.discriminator import DinoDiscriminator, DiscHead
from rae_jax.losses.spectral_norm import SPECTRAL

_BLOCK_KEYS = {
    "norm1.weight": ("norm1", "scale", None), "norm1.bias": ("norm1", "bias", None),
    "attn.qkv.weight": ("attn/qkv", "kernel", "T"), "attn.qkv.bias": ("attn/qkv", "bias", None),
    "attn.proj.weight": ("attn/proj", "kernel", "T"), "attn.proj.bias": ("attn/proj", "bias", None),
    "norm2.weight": ("norm2", "scale", None), "norm2.bias": ("norm2", "bias", None),
    "mlp.fc1.weight": ("fc1", "kernel", "T"), "mlp.fc1.bias": ("fc1", "bias", None),
    "mlp.fc2.weight": ("fc2", "kernel", "T"), "mlp.fc2.bias": ("fc2", "bias", None),
}
# DinoDisc head layers: torch prefix inside heads.{i} -> (flax module, kind)
_HEAD_LAYERS = (("0.0", "conv_in", "conv"), ("0.1", "norm_in", "norm"),
                ("1.fn.0", "conv_res", "conv"), ("1.fn.1", "norm_res", "norm"), ("2", "conv_out", "conv"))


def _set(tree: dict, path: str, leaf: str, value):
  node = tree
  for p in path.split("/"):
    node = node.setdefault(p, {})
  node[leaf] = value


def dino_vit_params_from_torch(sd: Mapping, depth: int, source: str = "DINO checkpoint") -> dict:
  """Flax params of `DinoViT` (depth blocks) from a DINO ViT state_dict."""
  sd = {k: to_numpy(v).astype(np.float32) for k, v in sd.items()}
  expected = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
              "norm.weight", "norm.bias"]
  expected += [f"blocks.{i}.{k}" for i in range(depth) for k in _BLOCK_KEYS]
  check_keys(expected, sd, source)
  c = sd["cls_token"].shape[-1]
  check_shape("cls_token", sd["cls_token"].shape, (1, 1, c), source)
  w = sd["patch_embed.proj.weight"]
  if w.ndim != 4 or w.shape[:2] != (c, 3) or w.shape[2] != w.shape[3]:
    raise StateDictError(f"{source}: key 'patch_embed.proj.weight' has shape {w.shape}, expected ({c}, 3, p, p)")
  params = {"cls_token": sd["cls_token"], "pos_embed": sd["pos_embed"],
            "patch_embed": {"kernel": np.transpose(w, (2, 3, 1, 0)), "bias": sd["patch_embed.proj.bias"]}}
  for i in range(depth):
    for key, (path, leaf, op) in _BLOCK_KEYS.items():
      full = f"blocks.{i}.{key}"
      v = sd[full]
      if key == "attn.qkv.bias":
        check_shape(full, v.shape, (3 * c,), source)
        v = v.copy()
        v[c:2 * c] = 0.0  # zero the key bias, as the reference does on load
      if op == "T":
        v = v.T
      _set(params, f"blocks_{i}/{path}", leaf, np.ascontiguousarray(v))
  return params


def disc_heads_from_torch(sd: Mapping, num_heads: int, use_spectral_norm: bool = True,
                          source: str = "DinoDisc state_dict"):
  """(params, spectral) of the heads `head_{i}` from `heads.{i}....` keys of a DinoDisc state_dict."""
  sd = {k: to_numpy(v).astype(np.float32) for k, v in sd.items() if k.startswith("heads.")}
  expected = []
  for i in range(num_heads):
    for tp, _, kind in _HEAD_LAYERS:
      if kind == "norm":
        names = ("weight", "bias")
      elif use_spectral_norm:
        names = ("bias", "weight_orig", "weight_u", "weight_v")
      else:
        names = ("bias", "weight")
      expected += [f"heads.{i}.{tp}.{n}" for n in names]
  check_keys(expected, sd, source)
  params, spectral = {}, {}
  for i in range(num_heads):
    for tp, name, kind in _HEAD_LAYERS:
      pre = f"heads.{i}.{tp}"
      path = f"head_{i}/{name}"
      if kind == "norm":
        _set(params, path, "scale", sd[f"{pre}.weight"])
        _set(params, path, "bias", sd[f"{pre}.bias"])
        continue
      w = sd[f"{pre}.weight_orig" if use_spectral_norm else f"{pre}.weight"]
      if w.ndim != 3:
        raise StateDictError(f"{source}: key '{pre}' weight has shape {w.shape}, expected (O, I, K)")
      _set(params, path, "kernel", np.transpose(w, (2, 1, 0)))
      _set(params, path, "bias", sd[f"{pre}.bias"])
      if use_spectral_norm:
        check_shape(f"{pre}.weight_u", sd[f"{pre}.weight_u"].shape, (w.shape[0],), source)
        check_shape(f"{pre}.weight_v", sd[f"{pre}.weight_v"].shape, (w.shape[1] * w.shape[2],), source)
        _set(spectral, path, "u", sd[f"{pre}.weight_u"])
        _set(spectral, path, "v", sd[f"{pre}.weight_v"])
  return params, spectral


def disc_heads_to_torch(variables: Mapping, use_spectral_norm: bool = True) -> dict:
  """Inverse of `disc_heads_from_torch`: `heads.{i}....` numpy arrays (official DinoDisc names)."""
  params, spectral = variables["params"], variables.get(SPECTRAL, {})
  out = {}
  heads = sorted((k for k in params if k.startswith("head_")), key=lambda k: int(k.split("_")[1]))
  for hk in heads:
    i = int(hk.split("_")[1])
    for tp, name, kind in _HEAD_LAYERS:
      p, pre = params[hk][name], f"heads.{i}.{tp}"
      if kind == "norm":
        out[f"{pre}.weight"], out[f"{pre}.bias"] = np.asarray(p["scale"]), np.asarray(p["bias"])
        continue
      w = np.transpose(np.asarray(p["kernel"]), (2, 1, 0))
      out[f"{pre}.bias"] = np.asarray(p["bias"])
      if use_spectral_norm:
        out[f"{pre}.weight_orig"] = w
        out[f"{pre}.weight_u"] = np.asarray(spectral[hk][name]["u"])
        out[f"{pre}.weight_v"] = np.asarray(spectral[hk][name]["v"])
      else:
        out[f"{pre}.weight"] = w
  return out


def _check_tree(got, want, source: str):
  """Every leaf of `got` matches `want` (abstract shapes) key for key."""
  g, w = flatten(got), flatten(want)
  check_keys(w, g, source)
  for k in w:
    check_shape(k, np.shape(g[k]), w[k].shape, source)


def disc_variables_from_torch(disc: DinoDiscriminator, dino_sd: Mapping, heads_sd: Mapping | None = None,
                              rng: jax.Array | None = None, source: str = "DINO checkpoint") -> dict:
  """Variables {'params', 'spectral'} of `disc`: the ViT from `dino_sd`; heads from `heads_sd` (an
  official DinoDisc state_dict) or, for a fresh run, initialised from `rng`."""
  cfg = disc.vit_config()
  n_heads = len(cfg["key_depths"]) + 1
  depth = max(cfg["depth"], 1 + max(cfg["key_depths"], default=0))
  dino = dino_vit_params_from_torch(dino_sd, depth, source)
  if heads_sd is not None:
    heads, spectral = disc_heads_from_torch(heads_sd, n_heads, disc.use_spectral_norm, source)
  else:
    if rng is None:
      raise ValueError("disc_variables_from_torch: pass heads_sd or an rng to initialise the heads")
    c = cfg["embed_dim"]
    head = DiscHead(disc.ks, disc.norm_type, disc.norm_eps, disc.use_spectral_norm)
    init = jax.jit(lambda key: head.init(key, jnp.zeros((1, 8, c), jnp.float32)))
    heads, spectral = {}, {}
    for i, key in enumerate(jax.random.split(rng, n_heads)):
      v = init(key)
      heads[f"head_{i}"] = v["params"]
      if SPECTRAL in v:
        spectral[f"head_{i}"] = v[SPECTRAL]
  variables = {"params": {"dino": dino, **heads}}
  if disc.use_spectral_norm:
    variables[SPECTRAL] = spectral
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  want = jax.eval_shape(lambda x: disc.init(jax.random.key(0), x), x)
  _check_tree(variables, want, source)
  return jax.tree.map(jnp.asarray, variables)


def load_dino_checkpoint(path: str) -> dict:
  """Read `dino_vit_small_patch8_224.pth` (the official release is a plain state_dict; one nested
  under 'model' or 'state_dict' is unwrapped)."""
  import torch  # only at the file boundary
  sd = torch.load(path, map_location="cpu", weights_only=True)
  for wrapper in ("model", "state_dict"):
    if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
      sd = sd[wrapper]
  if not isinstance(sd, Mapping):
    raise StateDictError(f"{path}: expected a state_dict, got {type(sd).__name__}")
  return {k: to_numpy(v) for k, v in sd.items()}
