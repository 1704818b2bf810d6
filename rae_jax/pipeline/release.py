"""Official PyTorch releases <-> a workdir (`--mode=import_torch` / `--mode=export_torch`).

import_release: the files named in config.interop (decoder model.pt, DiTDH/LightningDiT
stage2_model.pt, an optional autoguidance guide model, stat.pt; local paths or
hf://<owner>/<repo>/<path>) are checked against the models the config describes -- file kind,
every key and shape -- before anything is written. They are then converted one at a time into a
staging dir inside the workdir and published by renames, so a failure leaves the workdir as it
was and host memory stays at about one checkpoint beyond the memory-mapped file.

export_release: whatever the workdir holds (stage-2 / guide / decoder weights, latent stats) ->
<workdir>/export/ with official state_dicts (.pt and .safetensors twins) and a README.txt saying
which official class and constructor arguments load each with strict=True. It is written to a
temp dir and renamed, so an existing export is never half-overwritten.

    from rae_jax.pipeline import release
    config.interop.stage2_model = "hf://nyu-visionx/RAE-collections/models/DiTs/.../stage2_model.pt"
    release.import_release(config, workdir)           # -> workdir/stage2/weights
    release.export_release(config, workdir, "ema")    # -> workdir/export/stage2_model.pt, ...
"""
from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import tempfile
from typing import Any, Mapping, Optional

import jax
import ml_collections as mlc
import numpy as np
from absl import logging

from rae_jax import storage
from rae_jax.atomic import recover_dir, replace_dir
from rae_jax.interop import decoder_names, diffusers_rae, ditdh_names, stats as stats_lib, torch_io
from rae_jax.interop.common import StateDictError, check_keys
from rae_jax.models.decoder import ViTDecoder, decoder_from_hf_config
from rae_jax.models.ditdh import DiTDH
from rae_jax.pipeline import builders, snapshots
from rae_jax.train import multihost

EXPORT_DIR = "export"
STAGING_DIR = ".import_staging"
STATS = "stats"
ENCODER = "encoder"  # only from a diffusers AutoencoderRAE folder -> <workdir>/encoder (HF folder)
# (stage, config.interop field, export file stem), in import/export order.
PARTS = (
    (builders.STAGE2_DIR, "stage2_model", "stage2_model"),
    (builders.GUIDE_DIR, "guide_model", "guide_model"),
    (builders.STAGE1_DIR, "decoder", "decoder"),
    (STATS, "stats", "stat"),
)
_TORCH_CLASS = {
    "DiTDH": ("stage2.models.DDT", "DiTwDDTHead"),
    "LightningDiT": ("stage2.models.lightningDiT", "LightningDiT"),
}
# Official constructor argument order (README lines read like the official signatures).
_TORCH_ARGS = {
    "DiTDH": ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
              "mlp_ratio", "class_dropout_prob", "num_classes", "use_qknorm", "use_swiglu",
              "use_rope", "use_rmsnorm", "wo_shift", "use_pos_embed"),
    "LightningDiT": ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                     "num_heads", "mlp_ratio", "class_dropout_prob", "num_classes", "learn_sigma",
                     "use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift",
                     "use_gembed"),
}
_KIND_DESC = {
    "DiTDH": "DiTwDDTHead (DiTDH) state_dict",
    "LightningDiT": "LightningDiT state_dict",
    "decoder": "GeneralDecoder (decoder model.pt) state_dict",
    "rae": "full stage-1 RAE state_dict",
    "encoder": "HF encoder checkpoint",
    "stats": "latent stats file ({'mean', 'var'})",
}
_KIND_FIELD = {"DiTDH": "stage2_model or guide_model", "LightningDiT": "stage2_model or guide_model",
               "decoder": "decoder", "rae": "decoder", "stats": "stats"}
# Keys only one kind of file has; checked in this order (DiTDH also has x_embedder etc.).
_KIND_PREFIXES = (
    ("rae", ("decoder.decoder_embed.", "decoder.decoder_layers.", "decoder.decoder_pred.")),
    ("decoder", ("decoder_embed.", "decoder_layers.", "decoder_pred.", "trainable_cls_token")),
    ("DiTDH", ("s_embedder.", "s_projector.", "enc_feat_rope.", "dec_feat_rope.")),
    ("LightningDiT", ("x_embedder.", "t_embedder.", "y_embedder.", "feat_rope.")),
    ("encoder", ("embeddings.patch_embeddings.", "encoder.layer.", "vision_model.", "dinov2.")),
)


# ----------------------------------------------------------------------------------------------
# Models the config describes.


def model_kind(model_cfg: mlc.ConfigDict) -> str:
  return "DiTDH" if model_cfg.name in ("DiTDH", "DiTwDDTHead") else model_cfg.name


def torch_kwargs(model_cfg: mlc.ConfigDict) -> dict:
  """Constructor arguments of the official class (ours minus JAX-only knobs)."""
  kw = builders.model_kwargs(model_cfg)
  for k in ("remat", "remat_policy", "scan_layers", "attention_impl"):
    kw.pop(k, None)
  if model_kind(model_cfg) == "LightningDiT":
    kw.pop("use_pos_embed", None)
  order = _TORCH_ARGS.get(model_kind(model_cfg), ())
  names = [k for k in order if k in kw] + sorted(set(kw) - set(order))
  return {k: list(kw[k]) if isinstance(kw[k], tuple) else kw[k] for k in names}


def decoder_module(config: mlc.ConfigDict) -> ViTDecoder:
  """The GeneralDecoder the config implies (latent width and grid come from the encoder)."""
  grid = config.encoder.input_size // config.encoder.patch_size
  return decoder_from_hf_config(builders.decoder_config_dict(config),
                                hidden_size=config.encoder.hidden_size,
                                patch_size=config.decoder.patch_size, num_patches=grid * grid,
                                scan_layers=bool(config.decoder.get("scan_layers", False)))


def decoder_torch_config(config: mlc.ConfigDict) -> dict:
  """ViTMAEConfig fields + num_patches that build the matching official GeneralDecoder."""
  m = decoder_module(config)
  cfg = dict(hidden_size=m.hidden_size, decoder_hidden_size=m.decoder_hidden_size,
             decoder_num_hidden_layers=m.decoder_num_hidden_layers,
             decoder_num_attention_heads=m.decoder_num_attention_heads,
             decoder_intermediate_size=m.decoder_intermediate_size, patch_size=m.patch_size,
             image_size=m.image_size, num_channels=m.num_channels,
             layer_norm_eps=m.layer_norm_eps, hidden_act=m.hidden_act, qkv_bias=m.qkv_bias)
  return dict(config=cfg, num_patches=m.num_patches)


def _model_cfg(config: mlc.ConfigDict, stage: str) -> mlc.ConfigDict:
  return config.model if stage == builders.STAGE2_DIR else config.guidance.guide_model


def _config_field(stage: str) -> str:
  return {builders.STAGE2_DIR: "config.model", builders.GUIDE_DIR: "config.guidance.guide_model",
          builders.STAGE1_DIR: "config.decoder / config.encoder", STATS: "config.encoder"}[stage]


def _describe(config: mlc.ConfigDict, stage: str) -> str:
  """Short summary of the sizes the config implies, for error messages."""
  if stage in (builders.STAGE2_DIR, builders.GUIDE_DIR):
    m = _model_cfg(config, stage)
    return (f"{_config_field(stage)}: {m.name} input_size={m.input_size} "
            f"in_channels={m.in_channels} hidden_size={m.hidden_size} depth={m.depth} "
            f"num_heads={m.num_heads} num_classes={m.num_classes}")
  if stage == builders.STAGE1_DIR:
    d = decoder_torch_config(config)
    return f"{_config_field(stage)}: {d['config']}, num_patches={d['num_patches']}"
  return f"config.encoder: latent (h, w, C) = {builders.stage2_latent_shape(config)}"


def _stats_torch_shape(config: mlc.ConfigDict) -> tuple[int, int, int]:
  h, w, c = builders.stage2_latent_shape(config)
  return (c, h, w)


def export_manifest(config: mlc.ConfigDict) -> dict[str, dict[str, tuple]]:
  """{export file: {torch key: shape}} of every file export can write, from the config alone
  (jax.eval_shape: nothing is allocated, so full-size models are cheap)."""
  out = {}
  for stage, _, stem in PARTS:
    if stage in (builders.STAGE2_DIR, builders.GUIDE_DIR):
      shapes = ditdh_names.torch_shapes(builders.build_stage2_model(_model_cfg(config, stage)))
    elif stage == builders.STAGE1_DIR:
      shapes = decoder_names.state_dict_shapes(decoder_module(config))
    else:
      shapes = {k: _stats_torch_shape(config) for k in stats_lib.KEYS}
    out[f"{stem}.pt"] = {k: tuple(v) for k, v in shapes.items()}
  return out


# ----------------------------------------------------------------------------------------------
# Import.


def resolve_path(spec: str, field: str = "path") -> str:
  """Local path, or hf://<owner>/<repo>[@revision]/<path in repo> fetched via huggingface_hub."""
  if spec.startswith("hf://"):
    parts = spec[len("hf://"):].split("/")
    if len(parts) < 3 or not all(parts):
      raise ValueError(f"config.interop.{field}={spec!r}: expected hf://<owner>/<repo>/<file path>")
    repo, revision = parts[1].split("@", 1) if "@" in parts[1] else (parts[1], None)
    from huggingface_hub import hf_hub_download
    logging.info("config.interop.%s: downloading %s", field, spec)
    return hf_hub_download(repo_id=f"{parts[0]}/{repo}", filename="/".join(parts[2:]),
                           revision=revision)
  if storage.is_remote(spec):  # gs://: a local copy (torch.load / safetensors want files)
    if not storage.isfile(spec):
      raise FileNotFoundError(f"config.interop.{field}={spec!r}: no such file")
    local = os.path.join(_download_dir(), field, os.path.basename(spec))
    os.makedirs(os.path.dirname(local), exist_ok=True)
    logging.info("config.interop.%s: copying %s to %s", field, spec, local)
    storage.copy_file(spec, local)
    return local
  path = os.path.expanduser(spec)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.interop.{field}={spec!r}: no such file")
  return path


def _download_dir() -> str:
  """A local folder for this process's copies of gs:// inputs, removed at exit."""
  global _DOWNLOADS
  if _DOWNLOADS is None:
    import atexit  # pylint: disable=g-import-not-at-top
    _DOWNLOADS = tempfile.mkdtemp(prefix="rae-interop-")
    atexit.register(shutil.rmtree, _DOWNLOADS, True)
  return _DOWNLOADS


_DOWNLOADS: Optional[str] = None


def detect_kind(keys) -> Optional[str]:
  """What a file holds, from keys only its kind has (None: unrecognised)."""
  keys = set(keys)
  if keys and keys <= set(stats_lib.KEYS):
    return "stats"
  for kind, prefixes in _KIND_PREFIXES:
    if any(k.startswith(prefixes) for k in keys):
      return kind
  return None


@dataclasses.dataclass
class _Item:
  stage: str
  field: str
  spec: str
  tensors: torch_io.TensorFile  # -> ema_params (and params when the file has no 'model')
  expected: dict  # torch key -> shape
  params_tensors: Optional[torch_io.TensorFile] = None  # a training checkpoint's 'model' entry
  diffusers: Optional[diffusers_rae.Source] = None  # stats / encoder of a diffusers folder

  @property
  def source(self) -> str:
    entry = self.tensors.entry
    return self.tensors.path + ("" if entry == "plain" else f" ['{entry}']")


def _expected_kind(config: mlc.ConfigDict, stage: str) -> str:
  if stage in (builders.STAGE2_DIR, builders.GUIDE_DIR):
    return model_kind(_model_cfg(config, stage))
  return {builders.STAGE1_DIR: "decoder", STATS: "stats", ENCODER: "encoder"}[stage]


def _check_kind(item: _Item, config: mlc.ConfigDict,
                tf: Optional[torch_io.TensorFile] = None) -> torch_io.TensorFile:
  """Raise if the file is of another kind than the field wants; unwrap RAE state_dicts."""
  tf = item.tensors if tf is None else tf
  want, got = _expected_kind(config, item.stage), detect_kind(tf)
  if got == "rae" and want == "decoder":
    logging.info("%s: full RAE state_dict; importing its 'decoder.*' tensors", item.source)
    return tf.with_keys({k[len("decoder."):]: k for k in tf if k.startswith("decoder.")})
  if got is None or got == want:
    return tf
  examples = [k for k in tf if k.startswith(dict(_KIND_PREFIXES).get(got, ("mean", "var")))][:3]
  if got in ("DiTDH", "LightningDiT") and want in ("DiTDH", "LightningDiT"):
    hint = (f"set {_config_field(item.stage)}.name={got!r} (and its sizes) to import it")
  elif got in _KIND_FIELD:
    hint = f"did you mean config.interop.{_KIND_FIELD[got]}?"
  else:
    hint = "encoders are read from config.encoder.path (HF folder or hub id), not imported"
  raise StateDictError(
      f"{item.source}: config.interop.{item.field} must be a {_KIND_DESC[want]}, but this file "
      f"holds a {_KIND_DESC[got]} (keys such as {examples}); {hint}")


def _validate(item: _Item, config: mlc.ConfigDict, optional=(),
              tf: Optional[torch_io.TensorFile] = None) -> None:
  """Every key and shape against the config's model; errors name file, keys and both shapes."""
  tf = item.tensors if tf is None else tf
  expected = item.expected
  source = tf.path + ("" if tf.entry == "plain" else f" ['{tf.entry}']")
  required = set(expected) - (set(optional) - set(tf))
  try:
    check_keys(required, tf, source)
  except StateDictError as e:
    raise StateDictError(f"{e} -- the file does not match {_describe(config, item.stage)}") from None
  bad = [(k, tf.shape(k), tuple(expected[k])) for k in sorted(expected)
         if k in tf and tf.shape(k) != tuple(expected[k])]
  if bad:
    lines = "; ".join(f"key '{k}' has shape {g} in the file, expected {e}" for k, g, e in bad[:10])
    raise StateDictError(f"{source}: {len(bad)} tensor(s) disagree with the config: {lines}"
                         f"{' ...' if len(bad) > 10 else ''} -- {_describe(config, item.stage)}")


def _expected_shapes(config: mlc.ConfigDict, stage: str) -> tuple[dict, tuple]:
  """({torch key: shape} the config implies, keys the file may omit)."""
  if stage in (builders.STAGE2_DIR, builders.GUIDE_DIR):
    return ditdh_names.torch_shapes(builders.build_stage2_model(_model_cfg(config, stage))), ()
  if stage == builders.STAGE1_DIR:  # decoder_pos_embed is a fixed table we recompute
    return (decoder_names.state_dict_shapes(decoder_module(config)), (decoder_names.POS_KEY,))
  # The reference uses mean 0 / var 1 for an absent stats entry.
  return {k: _stats_torch_shape(config) for k in stats_lib.KEYS}, stats_lib.KEYS


def _diffusers_items(config: mlc.ConfigDict, spec: str) -> list[_Item]:
  """A diffusers AutoencoderRAE folder as the decoder, stats and encoder sources."""
  if config.interop.stats:
    raise ValueError(f"config.interop.decoder={spec!r} is a diffusers AutoencoderRAE folder, "
                     f"which carries the latent stats; leave config.interop.stats "
                     f"({config.interop.stats!r}) empty")
  src = diffusers_rae.open_source(spec, "decoder")
  diffusers_rae.check_against_config(src, config)
  item = _Item(builders.STAGE1_DIR, "decoder", spec, src.decoder(), {})
  item.tensors = _check_kind(item, config)
  item.expected, optional = _expected_shapes(config, builders.STAGE1_DIR)
  _validate(item, config, optional)
  missing = [k for k in ("encoder_mean", "encoder_std") if k not in src.tensors]
  if missing:
    raise StateDictError(f"{item.source}: missing keys {missing}")
  logging.info("%s: diffusers AutoencoderRAE; importing its decoder, latent stats and encoder",
               src.folder)
  return [item, _Item(STATS, "decoder", spec, src.tensors, {}, diffusers=src),
          _Item(ENCODER, "decoder", spec, src.tensors, {}, diffusers=src)]


def _open_and_validate(config: mlc.ConfigDict, stage: str, field: str, spec: str) -> _Item:
  path = resolve_path(spec, field)
  item = _Item(stage, field, spec, torch_io.open_tensors(path), {})
  item.tensors = _check_kind(item, config)  # before the config's sizes are even looked at
  item.expected, optional = _expected_shapes(config, stage)
  _validate(item, config, optional)
  entries = item.tensors.entries
  if item.tensors.entry == "ema" and "model" in entries:
    # A training checkpoint: raw weights -> params, EMA -> ema_params (export's `which` picks).
    item.params_tensors = _check_kind(item, config, torch_io.open_tensors(path, "model"))
    _validate(item, config, optional, item.params_tensors)
    logging.info("%s: importing 'model' as params and 'ema' as ema_params", path)
  elif item.tensors.entry in ("ema", "model", "state_dict"):
    logging.warning("%s: only a '%s' entry; params and ema_params are both these weights", path,
                    item.tensors.entry)
  return item


def _entries(item: _Item) -> dict:
  """Which entry of the file each part of the snapshot holds."""
  params = item.params_tensors if item.params_tensors is not None else item.tensors
  return {"params": params.entry, "ema_params": item.tensors.entry}


def _convert(item: _Item, config: mlc.ConfigDict,
             tensors: Optional[torch_io.TensorFile] = None) -> Any:
  """numpy params (or (h,w,C) stats) of one validated file (`tensors`: another entry of it)."""
  item = item if tensors is None else dataclasses.replace(item, tensors=tensors)
  if item.stage == STATS and item.diffusers is not None:
    return item.diffusers.stats(builders.stage2_latent_shape(config), config.stats.eps)
  if item.stage == STATS:
    # Tiny file: re-read through the stats module, which owns the (C,h,w) <-> (h,w,C) layout.
    return stats_lib.load_stats(item.tensors.path, shape=builders.stage2_latent_shape(config))
  if item.stage == builders.STAGE1_DIR:
    return decoder_names.from_state_dict(decoder_module(config), item.tensors, item.source)
  model_cfg = _model_cfg(config, item.stage)
  model = builders.build_stage2_model(model_cfg)
  if isinstance(model, DiTDH):
    return ditdh_names.ditdh_from_torch(item.tensors, model, item.source)
  return ditdh_names.lightning_dit_from_torch(item.tensors, model, item.source)


def _stage_config(config: mlc.ConfigDict, stage: str) -> dict:
  if stage in (builders.STAGE2_DIR, builders.GUIDE_DIR):
    return _model_cfg(config, stage).to_dict()
  return decoder_torch_config(config)


def import_release(config: mlc.ConfigDict, workdir: str) -> dict:
  """Import the official files named in config.interop into `workdir` (replacing earlier imports
  of the same stages). Returns {stage: {'source', 'spec', 'entry', 'kind', 'num_params' | 'keys',
  'written', 'entries'}} for 'stage2', 'guide', 'stage1', 'stats'. A training checkpoint with
  both 'model' and 'ema' keeps them apart (params = model, ema_params = ema); 'entries' says
  which entry each holds."""
  specs = [(stage, field, config.interop[field]) for stage, field, _ in PARTS
           if config.interop[field]]
  if not specs:
    raise ValueError("config.interop names no file: set one of config.interop.decoder, "
                     ".stage2_model, .guide_model, .stats")
  # 1) Everything checked before anything is written.
  items = []
  for stage, field, spec in specs:
    if stage == builders.STAGE1_DIR and diffusers_rae.is_diffusers_source(spec):
      items += _diffusers_items(config, spec)
    else:
      items.append(_open_and_validate(config, stage, field, spec))

  # 2) Convert one file at a time into a staging dir, 3) publish by renames. An object store
  # has no directory rename: each item is written to its place, complete only once its own
  # commit marker is (snapshot meta.json, encoder config.json, stat.npz as one object).
  primary = jax.process_index() == 0
  remote = storage.is_remote(workdir)
  created = not remote and not os.path.exists(workdir)
  staging = workdir if remote else os.path.join(workdir, STAGING_DIR)
  summary = {}
  try:
    if primary and not remote and os.path.exists(staging):
      shutil.rmtree(staging)
    multihost.barrier("rae_jax_import_staging")
    for item in items:
      info = dict(source=item.tensors.path, spec=item.spec, entry=item.tensors.entry,
                  kind=_expected_kind(config, item.stage))
      if item.stage == ENCODER:
        if primary and remote:
          with tempfile.TemporaryDirectory(prefix="rae-encoder-") as local:
            diffusers_rae.write_encoder_folder(item.diffusers, os.path.join(local, ENCODER))
            storage.publish_dir(os.path.join(local, ENCODER), os.path.join(workdir, ENCODER),
                                marker="config.json")
        elif primary:
          diffusers_rae.write_encoder_folder(item.diffusers, os.path.join(staging, ENCODER))
        info.update(written=os.path.join(workdir, ENCODER))
        summary[item.stage] = info
        logging.info("import_torch: encoder <- %s; run with --config.encoder.path=%s",
                     item.spec, info["written"])
        continue
      converted = _convert(item, config)
      if item.stage == STATS:
        dst = os.path.join(staging, builders.STATS_FILE)
        if primary:
          storage.makedirs(os.path.dirname(dst))
          stats_lib.save_stats(converted, dst)
        info.update(keys=sorted(converted), shape=builders.stage2_latent_shape(config),
                    written=os.path.join(workdir, builders.STATS_FILE))
      else:
        params = (converted if item.params_tensors is None
                  else _convert(item, config, item.params_tensors))
        info.update(num_params=int(sum(np.size(x) for x in jax.tree.leaves(converted))),
                    written=snapshots.weights_dir(workdir, item.stage), entries=_entries(item))
        meta = dict(info, model_config=_stage_config(config, item.stage),
                    imported_by="rae_jax.pipeline.release.import_release")
        snapshots.save_weights(staging, item.stage, params, converted, meta)
        del params
        if snapshots.latest_checkpoint_step(workdir, item.stage) is not None:
          logging.warning("%s already holds a training checkpoint, which inference prefers over "
                          "the imported snapshot", snapshots.checkpoint_dir(workdir, item.stage))
      del converted
      summary[item.stage] = info
      logging.info("import_torch: %s <- %s (%s; entries %s)", item.stage, item.tensors.path,
                   info["kind"], info.get("entries", item.tensors.entry))
    multihost.barrier("rae_jax_import_converted")
    if primary and not remote:
      for item in items:
        if item.stage == ENCODER:
          replace_dir(os.path.join(staging, ENCODER), os.path.join(workdir, ENCODER))
        elif item.stage == STATS:
          dst = os.path.join(workdir, builders.STATS_FILE)
          os.makedirs(os.path.dirname(dst), exist_ok=True)
          os.replace(os.path.join(staging, builders.STATS_FILE), dst)
        else:
          dst = snapshots.weights_dir(workdir, item.stage)
          os.makedirs(os.path.dirname(dst), exist_ok=True)
          replace_dir(snapshots.weights_dir(staging, item.stage), dst)
      shutil.rmtree(staging)
    multihost.barrier("rae_jax_import_published")
  except BaseException:
    if primary and not remote:
      shutil.rmtree(workdir if created else staging, ignore_errors=True)
    raise
  return summary


# ----------------------------------------------------------------------------------------------
# Export.


def _has_stage(workdir: str, stage: str) -> bool:
  return (snapshots.has_weights(workdir, stage)
          or snapshots.latest_checkpoint_step(workdir, stage) is not None)


def _export_state_dict(config: mlc.ConfigDict, stage: str, params) -> dict[str, np.ndarray]:
  # Official checkpoints are float32 (torch has no view of numpy's ml_dtypes bfloat16).
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), builders.host_tree(params))
  if stage == builders.STAGE1_DIR:
    return decoder_names.to_state_dict(decoder_module(config), params)
  model = builders.build_stage2_model(_model_cfg(config, stage))
  if isinstance(model, DiTDH):
    return ditdh_names.ditdh_to_torch(params, model)
  return ditdh_names.lightning_dit_to_torch(params, model)


def _check_export(name: str, sd: Mapping[str, np.ndarray], manifest: Mapping[str, tuple]) -> None:
  """Guard: what we write is exactly what the official module's state_dict() holds."""
  check_keys(manifest, sd, f"export {name}")
  for k, shape in manifest.items():
    if tuple(np.shape(sd[k])) != tuple(shape):
      raise StateDictError(f"export {name}: key '{k}' has shape {np.shape(sd[k])}, the official "
                           f"module has {tuple(shape)}")


def _readme(config: mlc.ConfigDict, which: str, written: Mapping[str, str]) -> str:
  lines = [
      "rae-jax export: official PyTorch RAE (github.com/bytetriper/RAE, run from its src/) state_dicts.",
      f"Weights: {which!r} ({'EMA' if which == 'ema' else 'raw training'} parameters).",
      "Every .pt has a .safetensors twin with the same keys (safetensors.torch.load_file).",
      "",
  ]
  for stage, _, stem in PARTS:
    if stage not in written:
      continue
    lines.append(f"== {stem}.pt  (from {written[stage]})")
    if stage in (builders.STAGE2_DIR, builders.GUIDE_DIR):
      model_cfg = _model_cfg(config, stage)
      module, cls = _TORCH_CLASS[model_kind(model_cfg)]
      args = ", ".join(f"{k}={v!r}" for k, v in torch_kwargs(model_cfg).items())
      lines += [f"from {module} import {cls}",
                f"model = {cls}({args})",
                f"model.load_state_dict(torch.load('{stem}.pt'), strict=True)"]
      if stage == builders.GUIDE_DIR:
        lines.append("# the autoguidance guide model (guidance.method='autoguidance')")
    elif stage == builders.STAGE1_DIR:
      d = decoder_torch_config(config)
      args = ", ".join(f"{k}={v!r}" for k, v in d["config"].items())
      lines += ["from transformers import ViTMAEConfig",
                "from stage1.decoders import GeneralDecoder",
                f"decoder = GeneralDecoder(ViTMAEConfig({args}), num_patches={d['num_patches']})",
                f"decoder.load_state_dict(torch.load('{stem}.pt'), strict=True)",
                f"# or stage1.RAE(..., decoder_patch_size={d['config']['patch_size']}, "
                f"pretrained_decoder_path='{stem}.pt')"]
    else:
      c, h, w = _stats_torch_shape(config)
      lines += [f"stats = torch.load('{stem}.pt')  # {{'mean', 'var'}}, each ({c}, {h}, {w}) = (C, h, w)",
                f"# stage1.RAE(..., normalization_stat_path='{stem}.pt', eps={config.stats.eps})"]
    lines.append("")
  return "\n".join(lines)


_DIFFUSERS_SUBDIR = os.path.basename(diffusers_rae.EXPORT_SUBDIR)


def _carry_subdir(src: str, dst: str, name: str) -> None:
  """Move src/name to dst/name (a rename) when only src has it."""
  if os.path.isdir(os.path.join(src, name)) and os.path.isdir(dst) and not os.path.exists(
      os.path.join(dst, name)):
    os.replace(os.path.join(src, name), os.path.join(dst, name))


def check_replaceable(final: str) -> None:
  """Export is all or nothing: publishing renames the previous export aside, renames the new
  one in and deletes the old one (carrying export_diffusers' folder over). Every directory
  that touches must be writable -- else stop before anything is published, naming it, and the
  previous export stays exactly as it was (never a half-published export, an `export.old`
  left behind or an error naming no path)."""
  dirs = [os.path.dirname(os.path.abspath(final))]
  if os.path.isdir(final):
    dirs += [d for d, _, _ in os.walk(final)]
  for d in dirs:
    if not os.access(d, os.W_OK | os.X_OK):
      probe = errno.EROFS if _read_only_fs(d) else errno.EACCES
      raise PermissionError(probe, f"cannot replace the export in {final}: {d} is not writable "
                            f"({os.strerror(probe)}); the previous export is left as it was", d)


def _read_only_fs(path: str) -> bool:
  try:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
  except OSError:
    return False


def export_release(config: mlc.ConfigDict, workdir: str, which: str = "ema") -> str:
  """Write <workdir>/export/ from whatever the workdir has; returns that directory.

  Weights come from snapshots.load_params (newest training checkpoint, else the imported
  snapshot; `which` = 'ema' | 'params'), stats from builders.stats_path (config.stats.path, else
  <workdir>/stats/stat.npz). Every process must call it; process 0 writes.
  """
  from rae_jax.train import mesh as mesh_lib
  torch_io.require_torch("export_torch")
  if which not in ("ema", "params"):
    raise ValueError(f"config.export.which={which!r}: use 'ema' or 'params'")
  stages = [s for s, _, _ in PARTS if s != STATS and _has_stage(workdir, s)]
  stats_file = builders.stats_path(config, workdir)
  if not stages and stats_file is None:
    raise FileNotFoundError(
        f"{workdir}: nothing to export (no stage2/guide/stage1 checkpoint or weights snapshot, no "
        f"{builders.STATS_FILE} and no config.stats.path)")
  manifest = export_manifest(config)
  primary = jax.process_index() == 0
  final = os.path.join(workdir, EXPORT_DIR)
  # gs:// (no directory rename): staged in a local temporary folder, then published file by
  # file with README.txt as the commit marker (storage.publish_dir).
  remote = storage.is_remote(final)
  tmp = tempfile.mkdtemp(prefix="rae-export-") if remote and primary else final + ".tmp"
  mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp) if stages else None
  written: dict[str, str] = {}
  try:
    if primary and not remote:
      recover_dir(final)
      check_replaceable(final)  # before a byte is written
      if os.path.exists(tmp):  # left by a killed export
        shutil.rmtree(tmp)
      os.makedirs(tmp)
    for stage, _, stem in PARTS:
      if stage == STATS:
        if stats_file is None:
          continue
        sd = {k: np.ascontiguousarray(v.transpose(2, 0, 1)) for k, v in
              stats_lib.load_stats(stats_file, shape=builders.stage2_latent_shape(config)).items()}
        manifest_sd = {k: v for k, v in manifest[f"{stem}.pt"].items() if k in sd}
        source = stats_file
      elif stage in stages:
        params, source = snapshots.load_params(workdir, stage, mesh, which)
        sd = _export_state_dict(config, stage, params)
        del params
        manifest_sd = manifest[f"{stem}.pt"]
      else:
        continue
      _check_export(f"{stem}.pt", sd, manifest_sd)
      if primary:
        torch_io.save_torch(sd, os.path.join(tmp, f"{stem}.pt"))
        torch_io.save_safetensors(sd, os.path.join(tmp, f"{stem}.safetensors"))
      del sd
      written[stage] = source
      logging.info("export_torch: %s.pt <- %s", stem, source)
    if primary:
      with open(os.path.join(tmp, "README.txt"), "w") as f:
        f.write(_readme(config, which, written))
      if remote:
        storage.publish_dir(tmp, final, "README.txt", keep=(_DIFFUSERS_SUBDIR,))
        shutil.rmtree(tmp, ignore_errors=True)
      else:
        check_replaceable(final)  # again: it may have changed during the conversion
        _carry_subdir(final, tmp, _DIFFUSERS_SUBDIR)  # export_diffusers' folder survives
        replace_dir(tmp, final)
    multihost.barrier("rae_jax_export_published")
  except BaseException:
    if primary and remote:
      shutil.rmtree(tmp, ignore_errors=True)
    elif primary:
      _carry_subdir(tmp, final, _DIFFUSERS_SUBDIR)
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final
