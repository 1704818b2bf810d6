"""--mode dispatch for main.py. Every mode is re-runnable and resumes from the workdir."""
from __future__ import annotations

import json
import os
import warnings
from typing import Callable

import jax
import ml_collections as mlc
from absl import logging

from rae_jax import config_checks
from rae_jax.train import mesh as mesh_lib


def _train_stage1(config, workdir):
  from rae_jax.pipeline.stage1 import train_stage1
  return train_stage1(config, workdir)


def _stats(config, workdir):
  from rae_jax.pipeline.latents import compute_stats
  return compute_stats(config, workdir)


def _cache_latents(config, workdir):
  from rae_jax.pipeline.latents import cache_latents
  return cache_latents(config, workdir)


def _train_stage2(config, workdir):
  from rae_jax.pipeline.stage2 import train_stage2
  return train_stage2(config, workdir)


def _sample(config, workdir):
  from rae_jax.pipeline.sample import run_sample
  return run_sample(config, workdir)


def _eval(config, workdir):
  from rae_jax.pipeline.evaluate import run_eval
  return run_eval(config, workdir)


def _eval_recon(config, workdir):
  from rae_jax.pipeline.evaluate import run_eval_recon
  return run_eval_recon(config, workdir)


def _fid_stats(config, workdir):
  from rae_jax.pipeline.evaluate import run_fid_stats
  return run_fid_stats(config, workdir)


def _import_torch(config, workdir):
  from rae_jax.interop.release import import_release
  return import_release(config, workdir)


def _export_torch(config, workdir):
  from rae_jax.interop.release import export_release
  return export_release(config, workdir, config.export.which)


def _all(config, workdir):
  """The demo pipeline: stage 1 -> stats -> stage 2 -> sample."""
  for mode in ("train_stage1", "stats", "train_stage2", "sample"):
    logging.info("===== all: %s =====", mode)
    MODES[mode](config, workdir)


MODES: dict[str, Callable[[mlc.ConfigDict, str], object]] = {
    "train_stage1": _train_stage1,
    "stats": _stats,
    "cache_latents": _cache_latents,
    "train_stage2": _train_stage2,
    "sample": _sample,
    "eval": _eval,
    "eval_recon": _eval_recon,
    "fid_stats": _fid_stats,
    "import_torch": _import_torch,
    "export_torch": _export_torch,
    "all": _all,
}


def run(mode: str, config: mlc.ConfigDict, workdir: str):
  """Initialise multi-host, validate the config, record it, run the mode."""
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r}; valid: {sorted(MODES)}")
  d = config.distributed
  mesh_lib.maybe_initialize_distributed(
      coordinator_address=d.coordinator_address or None,
      num_processes=d.num_processes or None,
      process_id=d.process_id if d.process_id >= 0 else None)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    config_checks.check(config, mode, jax.device_count())
  for w in caught:  # absl routes these to stderr on every process: loud, never lost
    logging.warning("%s: %s", w.category.__name__, w.message)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f"config.{mode}.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, default=str)
  logging.info("rae-jax --mode=%s, workdir %s, %d devices on %d processes", mode, workdir,
               jax.device_count(), jax.process_count())
  return MODES[mode](config, workdir)
