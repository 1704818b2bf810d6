"""`--mode=export_diffusers`: the workdir's RAE -> <workdir>/export/diffusers (AutoencoderRAE).

The workdir side (which decoder weights, which stats, which encoder) lives here; the conversion
and diffusers' constraints in rae_jax.interop.diffusers_rae.
"""
from __future__ import annotations

import contextlib
import os

import jax
import ml_collections as mlc
import numpy as np
from absl import logging

from rae_jax import storage
from rae_jax.interop import diffusers_rae, hf_encoders, stats as stats_lib
from rae_jax.interop.common import StateDictError
from rae_jax.models.vit_encoders import canonical_encoder_name
from rae_jax.pipeline import builders, release, snapshots
from rae_jax.train import mesh as mesh_lib
from rae_jax.train import multihost


def export_diffusers(config: mlc.ConfigDict, workdir: str, which: str = "ema") -> str:
  """Encoder of config.encoder.path + stage-1 decoder (`which`: 'ema' | 'params', newest
  checkpoint else the imported snapshot) + latent stats -> <workdir>/export/diffusers/.
  Every process must call it; process 0 writes. Returns the folder."""
  if which not in ("ema", "params"):
    raise ValueError(f"config.export.which={which!r}: use 'ema' or 'params'")
  name = canonical_encoder_name(config.encoder.name)
  if name not in diffusers_rae.ENCODER_TYPES:
    raise StateDictError(
        f"export_diffusers: config.encoder.name={config.encoder.name!r} cannot be represented by "
        f"diffusers AutoencoderRAE, which supports {sorted(diffusers_rae.ENCODER_TYPES)}")
  if not config.encoder.path:
    raise ValueError("export_diffusers: config.encoder.path is empty (the frozen encoder's HF "
                     "folder or hub id is exported with the decoder)")
  with contextlib.ExitStack() as stack:  # gs://: the encoder folder through a local temporary copy
    if storage.is_remote(config.encoder.path):
      folder = stack.enter_context(storage.local_dir(config.encoder.path))
    else:
      folder = hf_encoders.resolve_folder(config.encoder.path)
    return _export(config, workdir, which, name, folder)


def _export(config: mlc.ConfigDict, workdir: str, which: str, name: str, folder) -> str:
  enc = hf_encoders.load_hf_encoder(str(folder), name)
  decoder = release.decoder_module(config)
  mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
  params, source = snapshots.load_params(workdir, builders.STAGE1_DIR, mesh, which)
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), builders.host_tree(params))
  stats_file = builders.stats_path(config, workdir)
  stats = None
  if stats_file:
    stats = stats_lib.load_stats(stats_file, shape=builders.stage2_latent_shape(config))
  else:
    logging.warning("export_diffusers: no latent stats (config.stats.path or --mode=stats); "
                    "latents are exported un-normalised")
  dconfig, sd = diffusers_rae.to_diffusers(config, enc, folder, decoder, params, stats)
  final = os.path.join(workdir, diffusers_rae.EXPORT_SUBDIR)
  if jax.process_index() == 0:
    diffusers_rae.write_folder(dconfig, sd, final)
  multihost.barrier("rae_jax_export_diffusers")
  logging.info("export_diffusers: %s <- decoder %s (%s), encoder %s, stats %s", final, source,
               which, config.encoder.path, stats_file)
  return final
