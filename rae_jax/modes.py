"""--mode dispatch for main.py. Every mode is re-runnable and resumes from the workdir."""
from __future__ import annotations

import importlib
import json
import os
import warnings
from typing import Callable

import jax
import ml_collections as mlc
from absl import logging

from rae_jax import config_checks
from rae_jax.train import mesh as mesh_lib


def _lazy(module: str, function: str, *extra: Callable[[mlc.ConfigDict], object]) -> Callable:
  """A mode that imports its module only when run (main.py --help stays fast)."""
  def run_mode(config, workdir):
    fn = getattr(importlib.import_module(module), function)
    return fn(config, workdir, *(get(config) for get in extra))
  run_mode.target = (module, function)
  return run_mode


def _all(config, workdir):
  """The demo pipeline: stage 1 -> stats -> stage 2 -> sample."""
  for mode in ("train_stage1", "stats", "train_stage2", "sample"):
    logging.info("===== all: %s =====", mode)
    MODES[mode](config, workdir)


MODES: dict[str, Callable[[mlc.ConfigDict, str], object]] = {
    "train_stage1": _lazy("rae_jax.pipeline.stage1", "train_stage1"),
    "stats": _lazy("rae_jax.pipeline.latents", "compute_stats"),
    "cache_latents": _lazy("rae_jax.pipeline.latents", "cache_latents"),
    "train_stage2": _lazy("rae_jax.pipeline.stage2", "train_stage2"),
    "sample": _lazy("rae_jax.pipeline.sample", "run_sample"),
    "eval": _lazy("rae_jax.pipeline.evaluate", "run_eval"),
    "eval_recon": _lazy("rae_jax.pipeline.evaluate", "run_eval_recon"),
    "fid_stats": _lazy("rae_jax.pipeline.evaluate", "run_fid_stats"),
    "import_torch": _lazy("rae_jax.interop.release", "import_release"),
    "export_torch": _lazy("rae_jax.interop.release", "export_release", lambda c: c.export.which),
    "export_diffusers": _lazy("rae_jax.pipeline.diffusers_export", "export_diffusers",
                              lambda c: c.export.which),
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
