"""diffusers `AutoencoderRAE` folders <-> our RAE (`--mode=export_diffusers`, import_torch).

Export (driven by rae_jax.pipeline.diffusers_export): the workdir's stage-1 RAE -- the frozen
encoder of config.encoder.path, the trained decoder (`ema` or `params`), the latent stats --
becomes <workdir>/export/diffusers/ (config.json + diffusion_pytorch_model.safetensors) that `AutoencoderRAE.from_pretrained` loads
with no missing or unexpected keys and whose encode/decode equal our `RAE.encode/decode`.

Import (import_release, when config.interop.decoder names a diffusers folder or hf://<owner>/<repo>
id): its decoder and stats go where the official files' go, and its encoder becomes an HF folder
<workdir>/encoder that config.encoder.path can name.

How diffusers' model differs from the official RAE, and what we do about it:
  * latents: diffusers normalises with (z - latents_mean) / (latents_std + 1e-5); ours (the
    official) with (z - mean) / sqrt(var + eps). So latents_std = sqrt(var + eps) - 1e-5 and,
    back, var = (latents_std + 1e-5)^2 - eps. Without stats ours is the identity, and we write
    mean 0 / std 1 - 1e-5 (diffusers' own default would divide by 1 + 1e-5).
  * its encoder is built from a few config fields with transformers defaults for the rest
    (head dim 64, image_size 518/256/224, intermediate_size, eps, ...): an encoder that differs
    is refused, naming the field, instead of exporting a model that computes something else.
  * its decoder_pos_embed is a fixed sin-cos buffer (the file's is ignored) whose positions are
    scaled by 16/grid: a decoder trained with config.stage1.train_pos_embed=True whose table
    moved, or a latent grid other than 16x16, is refused.
  * encoder tensors are keyed by the installed transformers' module names (transformers 5
    renamed them); transformers itself translates from/to the hub layout our encoders read.
PyTorch, transformers and diffusers are needed only here (the test extra installs them).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping, Optional

import ml_collections as mlc
import numpy as np
from absl import logging

from rae_jax import storage
from rae_jax.atomic import recover_dir, replace_dir, set_default_mode
from rae_jax.interop import decoder_names, hf_encoders, torch_io
from rae_jax.interop.common import StateDictError, to_numpy
from rae_jax.models.decoder import ViTDecoder
from rae_jax.models.vit_encoders import ENCODERS, canonical_encoder_name

EXPORT_SUBDIR = os.path.join("export", "diffusers")
ENCODER_DIR = "encoder"  # <workdir>/encoder: HF folder of an imported encoder
CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
STD_EPS = 1e-5  # diffusers' (latents_std + 1e-5)
HEAD_DIM = 64  # diffusers' _build_encoder: num_attention_heads = hidden_size // 64
DIFFUSERS_POS_GRID = 16  # get_2d_sincos_pos_embed(base_size=16) == official table only here
# our encoder name <-> diffusers encoder_type
ENCODER_TYPES = {name: spec.diffusers_type for name, spec in ENCODERS.items()
                 if spec.diffusers_type}
# Official GeneralDecoder (HF ViTMAE) attention names -> diffusers' Attention names; the rest of
# the decoder state_dict is named alike.
_DECODER_RENAMES = (("attention.attention.query.", "attention.to_q."),
                    ("attention.attention.key.", "attention.to_k."),
                    ("attention.attention.value.", "attention.to_v."),
                    ("attention.output.dense.", "attention.to_out.0."))


def decoder_key_to_diffusers(key: str) -> str:
  for official, ours in _DECODER_RENAMES:
    key = key.replace(official, ours)
  return key


def decoder_key_from_diffusers(key: str) -> str:
  for official, ours in _DECODER_RENAMES:
    key = key.replace(ours, official)
  return key


# Encoder module fields that only affect initialisation or execution, not what it computes.
_IGNORED_FIELDS = {"dtype", "attention_impl", "layerscale_value", "parent", "name"}


def _require():
  torch = torch_io.require_torch("diffusers interop")
  try:
    import diffusers  # noqa: F401
    from diffusers import AutoencoderRAE
  except ImportError as e:
    raise ImportError("diffusers interop needs `pip install 'diffusers>=0.42'` (AutoencoderRAE)"
                      ) from e
  return torch, AutoencoderRAE


# ----------------------------------------------------------------------------------------------
# The diffusers model skeleton (on the meta device: nothing allocated).


def _siglip_needs_wrapper() -> bool:
  """diffusers 0.42 builds SigLIP as `SiglipVisionModel(...).vision_model...`, the transformers 4
  layout; transformers 5 flattened SiglipVisionModel, so AutoencoderRAE(encoder_type='siglip2')
  fails in its constructor there."""
  import torch
  import transformers
  cfg = transformers.SiglipVisionConfig(hidden_size=8, num_attention_heads=1, num_hidden_layers=1,
                                        intermediate_size=8, image_size=8, patch_size=4)
  with torch.device("meta"):
    return not hasattr(transformers.SiglipVisionModel(cfg), "vision_model")


@contextlib.contextmanager
def siglip_compat():
  """Let diffusers 0.42's AutoencoderRAE(encoder_type='siglip2') build under transformers 5.

  Inside the context its SiglipVisionModel has the transformers 4 layout (a `.vision_model`
  child), so state_dict keys are `encoder.vision_model.*` as in diffusers+transformers 4.
  A no-op where transformers still has that layout.
  """
  _require()
  if not _siglip_needs_wrapper():
    yield
    return
  import torch
  import transformers
  from diffusers.models.autoencoders import autoencoder_rae

  class SiglipVisionModelT4(torch.nn.Module):
    def __init__(self, config):
      super().__init__()
      self.config = config
      self.vision_model = transformers.SiglipVisionModel(config)

    def forward(self, *args, **kwargs):
      return self.vision_model(*args, **kwargs)

  original = autoencoder_rae.SiglipVisionModel
  autoencoder_rae.SiglipVisionModel = SiglipVisionModelT4
  try:
    yield
  finally:
    autoencoder_rae.SiglipVisionModel = original


def skeleton(dconfig: Mapping[str, Any]):
  """AutoencoderRAE(**dconfig) on the meta device: its state_dict names and shapes, encoder
  config, nothing allocated."""
  torch, AutoencoderRAE = _require()
  kw = {k: v for k, v in dconfig.items() if not k.startswith("_")}
  with siglip_compat(), torch.device("meta"):
    return AutoencoderRAE(**kw)


def _encoder_module(model):
  """The transformers model inside diffusers' encoder (unwrapping siglip_compat)."""
  return getattr(model.encoder, "vision_model", model.encoder)


# ----------------------------------------------------------------------------------------------
# Export.


def _refuse(field: str, got, want, why: str) -> StateDictError:
  return StateDictError(f"export_diffusers: {field}={got!r} cannot be represented by diffusers "
                        f"AutoencoderRAE, which fixes it to {want!r} ({why})")


def check_head_dim(enc: hf_encoders.HFEncoder, where: str) -> None:
  m = enc.module
  heads_want = m.hidden_size // HEAD_DIM
  if m.hidden_size % HEAD_DIM or m.num_attention_heads != heads_want:
    raise _refuse(f"{where} num_attention_heads", m.num_attention_heads, heads_want,
                  f"it fixes the encoder head dimension at {HEAD_DIM}: num_attention_heads = "
                  f"encoder_hidden_size // {HEAD_DIM}, hidden_size={m.hidden_size}")


def check_encoder(enc: hf_encoders.HFEncoder, enc_config, where: str) -> None:
  """Every field of our encoder that diffusers' fixed construction would build differently."""
  m = enc.module
  check_head_dim(enc, where)
  if getattr(m, "normalize", True) is not True:
    raise _refuse(f"{where} normalize", m.normalize, True,
                  "its encoder's final LayerNorm has no affine")
  for f in m.__dataclass_fields__:
    if f in _IGNORED_FIELDS or not hasattr(enc_config, f):
      continue
    got, want = getattr(m, f), getattr(enc_config, f)
    if isinstance(want, (list, tuple)):
      want = want[0] if len(set(want)) == 1 else want
    if got != want and not (isinstance(got, float) and np.isclose(got, want, rtol=1e-12, atol=0)):
      raise _refuse(f"{where} {f}", got, want, "it builds the encoder from encoder_type, "
                    "encoder_hidden_size, encoder_patch_size and encoder_num_hidden_layers with "
                    "transformers' defaults for every other field")


def check_decoder(module: ViTDecoder, dec_config) -> None:
  fields = dict(layer_norm_eps=(1e-12, "config.decoder.layer_norm_eps"),
                hidden_act=("gelu", "decoder hidden_act"), qkv_bias=(True, "decoder qkv_bias"),
                num_channels=(3, "decoder num_channels"))
  for f, (want, where) in fields.items():
    got = getattr(module, f)
    if got != want:
      raise _refuse(where, got, want, "RAEDecoder is built with its defaults")


def _latents(stats: Optional[Mapping[str, np.ndarray]], shape: tuple, eps: float):
  """Our (h,w,C) mean/var -> diffusers' (C,h,w) latents_mean / latents_std (float32)."""
  h, w, c = shape
  if not stats:  # ours: identity; diffusers divides by (std + 1e-5)
    mean = np.zeros((c, h, w), np.float32)
    std = np.full((c, h, w), np.float32(1.0) - np.float32(STD_EPS), np.float32)
    return mean, std
  mean = np.broadcast_to(np.asarray(stats.get("mean", 0.0), np.float32), shape)
  var = np.broadcast_to(np.asarray(stats.get("var", 1.0), np.float32), shape)
  std = np.sqrt(var + np.float32(eps)) - np.float32(STD_EPS)
  return (np.ascontiguousarray(mean.transpose(2, 0, 1)),
          np.ascontiguousarray(std.astype(np.float32).transpose(2, 0, 1)))


def diffusers_config(config: mlc.ConfigDict, enc: hf_encoders.HFEncoder, decoder: ViTDecoder,
                     latents_mean: np.ndarray, latents_std: np.ndarray) -> dict:
  name = canonical_encoder_name(config.encoder.name)
  if name not in ENCODER_TYPES:
    raise _refuse("config.encoder.name", config.encoder.name, sorted(ENCODER_TYPES),
                  "AutoencoderRAE supports the dinov2 (with registers), siglip2 and mae encoders")
  grid = config.encoder.input_size // enc.module.patch_size
  return dict(
      _class_name="AutoencoderRAE",
      encoder_type=ENCODER_TYPES[name], encoder_hidden_size=enc.module.hidden_size,
      encoder_patch_size=enc.module.patch_size,
      encoder_num_hidden_layers=enc.module.num_hidden_layers,
      decoder_hidden_size=decoder.decoder_hidden_size,
      decoder_num_hidden_layers=decoder.decoder_num_hidden_layers,
      decoder_num_attention_heads=decoder.decoder_num_attention_heads,
      decoder_intermediate_size=decoder.decoder_intermediate_size,
      patch_size=decoder.patch_size, encoder_input_size=config.encoder.input_size,
      image_size=decoder.patch_size * grid, num_channels=3,
      encoder_norm_mean=[float(v) for v in enc.image_mean],
      encoder_norm_std=[float(v) for v in enc.image_std],
      latents_mean=latents_mean.tolist(), latents_std=latents_std.tolist(),
      noise_tau=float(config.stage1.noise_tau), reshape_to_2d=True, use_encoder_loss=False,
      scaling_factor=1.0)


def _encoder_tensors(folder: pathlib.Path, model, target: Mapping[str, tuple]) -> dict:
  """The source checkpoint's tensors under diffusers' `encoder.*` names, translated by the
  installed transformers (hub layout -> module layout)."""
  inner = _encoder_module(model)
  prefix = "encoder.vision_model." if inner is not model.encoder else "encoder."
  loaded, info = type(inner).from_pretrained(str(folder), config=inner.config,
                                             output_loading_info=True)
  sd = {prefix + k: v.detach().cpu().numpy() for k, v in loaded.state_dict().items()}
  missing = sorted(k for k in info.get("missing_keys", ()) if prefix + k in target)
  if missing:
    raise StateDictError(f"{folder}: the encoder checkpoint lacks {missing[:10]} that diffusers' "
                         "encoder has")
  return {k: v for k, v in sd.items() if k in target}


def pos_embed_matches(decoder: ViTDecoder, params, model) -> float:
  """Max abs difference between our decoder_pos_embed and diffusers' fixed table."""
  from diffusers.models.embeddings import get_2d_sincos_pos_embed
  table = get_2d_sincos_pos_embed(decoder.decoder_hidden_size, decoder.grid_size, cls_token=True,
                                  extra_tokens=1, output_type="pt").float().numpy()[None]
  ours = np.asarray(params[decoder_names.POS_KEY], np.float32)
  return float(np.max(np.abs(ours - table)))


def to_diffusers(config: mlc.ConfigDict, enc: hf_encoders.HFEncoder, encoder_folder,
                 decoder: ViTDecoder, params, stats: Optional[Mapping[str, np.ndarray]]
                 ) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, state_dict) of the AutoencoderRAE equal to our RAE; refuses (naming the
  field) what diffusers cannot represent. `params`: decoder params (numpy); `stats`: (h,w,C)."""
  _require()
  name = canonical_encoder_name(config.encoder.name)
  if name not in ENCODER_TYPES:
    raise _refuse("config.encoder.name", config.encoder.name, sorted(ENCODER_TYPES),
                  "AutoencoderRAE supports the dinov2 (with registers), siglip2 and mae encoders")
  where = f"{config.encoder.path}/config.json"
  check_decoder(decoder, config.decoder)
  grid = config.encoder.input_size // enc.module.patch_size
  mean, std = _latents(stats, (grid, grid, enc.module.hidden_size), config.stats.eps)
  dconfig = diffusers_config(config, enc, decoder, mean, std)
  check_head_dim(enc, where)  # before diffusers divides by the head dimension
  model = skeleton(dconfig)
  check_encoder(enc, _encoder_module(model).config, where)
  diff = pos_embed_matches(decoder, params, model)
  if diff > 1e-6 and decoder.grid_size != DIFFUSERS_POS_GRID:
    raise _refuse("latent grid (config.encoder.input_size // patch_size)", decoder.grid_size,
                  DIFFUSERS_POS_GRID, "RAEDecoder's fixed sin-cos decoder_pos_embed scales "
                  f"positions by {DIFFUSERS_POS_GRID}/grid (get_2d_sincos_pos_embed's "
                  "base_size), so it equals the official table only on a 16x16 grid")
  if diff > 1e-6:
    raise _refuse("decoder_pos_embed", f"a table {diff:.3g} away from the sin-cos one",
                  "its fixed sin-cos table",
                  "diffusers ignores a checkpoint's decoder_pos_embed; train with "
                  "config.stage1.train_pos_embed=False to export to diffusers")
  target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  sd = {f"decoder.{decoder_key_to_diffusers(k)}": v
        for k, v in decoder_names.to_state_dict(decoder, params).items()
        if k != decoder_names.POS_KEY}
  sd.update(_encoder_tensors(pathlib.Path(encoder_folder), model, target))
  sd["encoder_mean"] = np.asarray(enc.image_mean, np.float32).reshape(1, 3, 1, 1)
  sd["encoder_std"] = np.asarray(enc.image_std, np.float32).reshape(1, 3, 1, 1)
  sd["_latents_mean"], sd["_latents_std"] = mean, std
  missing, extra = sorted(set(target) - set(sd)), sorted(set(sd) - set(target))
  bad = [(k, np.shape(sd[k]), target[k]) for k in sorted(set(sd) & set(target))
         if tuple(np.shape(sd[k])) != target[k]]
  if missing or extra or bad:
    raise StateDictError(f"export_diffusers: state_dict disagrees with AutoencoderRAE: missing "
                         f"{missing[:10]}, unexpected {extra[:10]}, shapes {bad[:10]}")
  return dconfig, sd


def write_folder(dconfig: Mapping[str, Any], sd: Mapping[str, np.ndarray], final: str) -> str:
  """config.json + diffusion_pytorch_model.safetensors, published by rename (never half-written).
  gs://: staged locally, then uploaded with config.json last (storage.publish_dir)."""
  import diffusers
  remote = storage.is_remote(final)
  if remote:
    tmp = tempfile.mkdtemp(prefix="rae-diffusers-")
  else:
    recover_dir(final)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  try:
    torch_io.save_safetensors(sd, os.path.join(tmp, WEIGHTS))
    with open(os.path.join(tmp, CONFIG), "w") as f:
      json.dump(dict(dconfig, _diffusers_version=diffusers.__version__), f, indent=2)
    if remote:
      storage.publish_dir(tmp, final, CONFIG)
      shutil.rmtree(tmp, ignore_errors=True)
    else:
      replace_dir(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


# ----------------------------------------------------------------------------------------------
# Import.


def is_diffusers_source(spec: str) -> bool:
  """A local AutoencoderRAE folder, or an hf://<owner>/<repo>[@rev][/subfolder] id (no file)."""
  if not spec:
    return False
  if spec.startswith("hf://"):
    last = spec.rstrip("/").rsplit("/", 1)[-1]
    return len(spec[len("hf://"):].split("/")) >= 2 and "." not in last.split("@")[-1]
  path = pathlib.Path(spec).expanduser()
  return path.is_dir() and (path / CONFIG).is_file()


def resolve_folder(spec: str, field: str) -> pathlib.Path:
  if spec.startswith("hf://"):
    parts = spec[len("hf://"):].strip("/").split("/")
    repo, revision = parts[1].split("@", 1) if "@" in parts[1] else (parts[1], None)
    sub = "/".join(parts[2:])
    from huggingface_hub import snapshot_download
    logging.info("config.interop.%s: downloading %s", field, spec)
    pre = f"{sub}/" if sub else ""
    root = snapshot_download(f"{parts[0]}/{repo}", revision=revision,
                             allow_patterns=[pre + CONFIG, pre + "diffusion_pytorch_model*"])
    return pathlib.Path(root) / sub
  path = pathlib.Path(spec).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(f"config.interop.{field}={spec!r}: no such folder")
  return path


class _Shards(Mapping):
  """Several safetensors files as one lazy mapping (a sharded diffusers checkpoint)."""

  def __init__(self, files):
    self._files = {f: torch_io._Safetensors(f) for f in files}
    self._where = {k: st for st in self._files.values() for k in st}

  def __getitem__(self, key):
    return self._where[key][key]

  def __iter__(self):
    return iter(self._where)

  def __len__(self):
    return len(self._where)

  def shape(self, key):
    return self._where[key].shape(key)


@dataclasses.dataclass
class Source:
  """An opened diffusers AutoencoderRAE folder."""
  folder: pathlib.Path
  config: dict
  tensors: torch_io.TensorFile

  def decoder(self) -> torch_io.TensorFile:
    """The `decoder.*` tensors under the official GeneralDecoder names."""
    return self.tensors.with_keys({decoder_key_from_diffusers(k[len("decoder."):]): k
                                   for k in self.tensors if k.startswith("decoder.")})

  def stats(self, shape: tuple, eps: float) -> dict[str, np.ndarray]:
    """Our (h,w,C) {'mean','var'} for diffusers' latents_mean / latents_std."""
    h, w, c = shape
    out = {}
    for key, ours in (("_latents_mean", "mean"), ("_latents_std", "var")):
      x = np.asarray(self.tensors[key], np.float32) if key in self.tensors else None
      if x is None:
        x = np.asarray(self.config.get(key[1:], None) or (0.0 if ours == "mean" else 1.0),
                       np.float32)
      try:
        x = np.broadcast_to(x.reshape(x.shape if x.ndim == 3 else (-1, 1, 1)), (c, h, w))
      except ValueError:
        raise StateDictError(f"{self.folder}: '{key}' has shape {x.shape}, which does not "
                             f"broadcast to the latent (C, h, w) = {(c, h, w)}") from None
      x = np.ascontiguousarray(x.transpose(1, 2, 0))
      if ours == "var":
        x = np.square(x + np.float32(STD_EPS)) - np.float32(eps)
        if np.any(x <= 0):
          raise StateDictError(f"{self.folder}: latents_std + 1e-5 <= sqrt(config.stats.eps="
                               f"{eps}) somewhere; no variance reproduces it")
      out[ours] = x.astype(np.float32)
    return out


def open_source(spec: str, field: str = "decoder") -> Source:
  folder = resolve_folder(spec, field)
  cfg_file = folder / CONFIG
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{folder}: no {CONFIG} (not a diffusers AutoencoderRAE folder)")
  cfg = json.loads(cfg_file.read_text())
  if cfg.get("_class_name") != "AutoencoderRAE":
    raise StateDictError(f"{cfg_file}: _class_name={cfg.get('_class_name')!r}, expected "
                         "'AutoencoderRAE'")
  if (folder / WEIGHTS).is_file():
    st = torch_io._Safetensors(folder / WEIGHTS)
  elif (folder / WEIGHTS_INDEX).is_file():
    index = json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"]
    st = _Shards([folder / f for f in sorted(set(index.values()))])
  else:
    raise FileNotFoundError(f"{folder}: no {WEIGHTS} (or its sharded index)")
  return Source(folder, cfg, torch_io.TensorFile(str(folder / WEIGHTS), st, "plain",
                                                 shapes=st.shape))


def check_against_config(src: Source, config: mlc.ConfigDict) -> None:
  """The folder's config.json against the run's config: every disagreement named."""
  c, enc, dec = src.config, config.encoder, config.decoder
  name = canonical_encoder_name(enc.name)
  want = [("encoder_type", ENCODER_TYPES.get(name, name), "config.encoder.name"),
          ("encoder_hidden_size", enc.hidden_size, "config.encoder.hidden_size"),
          ("encoder_patch_size", enc.patch_size, "config.encoder.patch_size"),
          ("encoder_input_size", enc.input_size, "config.encoder.input_size"),
          ("patch_size", dec.patch_size, "config.decoder.patch_size"),
          ("decoder_hidden_size", dec.decoder_hidden_size, "config.decoder.decoder_hidden_size"),
          ("decoder_num_hidden_layers", dec.decoder_num_hidden_layers,
           "config.decoder.decoder_num_hidden_layers"),
          ("decoder_num_attention_heads", dec.decoder_num_attention_heads,
           "config.decoder.decoder_num_attention_heads"),
          ("decoder_intermediate_size", dec.decoder_intermediate_size,
           "config.decoder.decoder_intermediate_size"),
          ("scaling_factor", 1.0, "(rae-jax latents are unscaled)"),
          ("reshape_to_2d", True, "(rae-jax latents are 2-D)"),
          ("num_channels", 3, "(RGB)")]
  bad = [f"{k}={c.get(k)!r} but {field}={v!r}" for k, v, field in want
         if k in c and c[k] != v]
  if float(dec.layer_norm_eps) != 1e-12:
    bad.append(f"its decoder uses layer_norm_eps=1e-12 but config.decoder.layer_norm_eps="
               f"{dec.layer_norm_eps}")
  if bad:
    raise StateDictError(f"{src.folder / CONFIG}: the AutoencoderRAE disagrees with the config: "
                         + "; ".join(bad) + " (give the geometry as --config.* overrides)")


def write_encoder_folder(src: Source, dst: str) -> None:
  """diffusers' encoder.* tensors -> an HF folder (hub layout, config.json, preprocessor) that
  hf_encoders.load_hf_encoder reads; transformers translates the module names."""
  torch, _ = _require()
  model = skeleton(src.config)
  inner = _encoder_module(model)
  prefix = "encoder.vision_model." if inner is not model.encoder else "encoder."
  tensors = {k[len(prefix):]: np.ascontiguousarray(to_numpy(src.tensors[k]))
             for k in src.tensors if k.startswith(prefix)}
  if not tensors:
    raise StateDictError(f"{src.folder}: no '{prefix}*' tensors (the frozen encoder)")
  # A fresh module (not from_pretrained: transformers 5 saves a loaded model in the layout it
  # was read in) saves in the hub layout our encoders read.
  loaded = type(inner)(inner.config)
  result = loaded.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()},
                                  strict=False)
  missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
  if unexpected:  # a file written under another transformers layout: let transformers map it
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(dst))) as tmp:
      inner.config.save_pretrained(tmp)
      from safetensors.numpy import save_file
      save_file(tensors, os.path.join(tmp, "model.safetensors"))
      converted, info = type(inner).from_pretrained(tmp, output_loading_info=True)
    missing, unexpected = list(info.get("missing_keys", ())), list(info.get("unexpected_keys", ()))
    loaded = type(inner)(inner.config)
    loaded.load_state_dict(converted.state_dict())
  # diffusers drops the final LayerNorm affine (the RAE wrappers never use it): those are the
  # only keys a valid folder may lack.
  missing = [k for k in missing if not k.endswith(
      ("layernorm.weight", "layernorm.bias", "post_layernorm.weight", "post_layernorm.bias"))]
  if missing or unexpected:
    raise StateDictError(f"{src.folder}: encoder tensors do not fit a {type(inner).__name__}: "
                         f"missing {sorted(missing)[:10]}, unexpected {sorted(unexpected)[:10]}")
  os.makedirs(dst, exist_ok=True)
  loaded.save_pretrained(dst)
  size = int(src.config.get("encoder_input_size", 224))
  mean = np.asarray(src.tensors["encoder_mean"]).reshape(-1).tolist()
  std = np.asarray(src.tensors["encoder_std"]).reshape(-1).tolist()
  with open(os.path.join(dst, "preprocessor_config.json"), "w") as f:
    json.dump({"image_mean": mean, "image_std": std, "do_center_crop": False,
               "size": {"height": size, "width": size}}, f, indent=2)
  for name in os.listdir(dst):
    set_default_mode(os.path.join(dst, name))
