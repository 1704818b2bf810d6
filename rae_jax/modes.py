"""--mode dispatch for main.py. Every mode is re-runnable and resumes from the workdir."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import time
import warnings
from typing import Callable

import jax
import ml_collections as mlc
from absl import logging

from rae_jax import config_checks
from rae_jax import storage
from rae_jax import workdir_lock
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
    "sample": _lazy("rae_jax.pipeline.sample_grid", "run_sample"),
    "eval": _lazy("rae_jax.pipeline.evaluate", "run_eval"),
    "eval_recon": _lazy("rae_jax.pipeline.evaluate", "run_eval_recon"),
    "fid_stats": _lazy("rae_jax.pipeline.evaluate", "run_fid_stats"),
    "import_torch": _lazy("rae_jax.pipeline.release", "import_release"),
    "export_torch": _lazy("rae_jax.pipeline.release", "export_release", lambda c: c.export.which),
    "export_diffusers": _lazy("rae_jax.pipeline.diffusers_export", "export_diffusers",
                              lambda c: c.export.which),
    "all": _all,
}


# Modes that write a run's state (checkpoints, stats, latent caches, imports): one writer per
# workdir (workdir_lock). The others only read it and may run beside a training run.
WRITER_MODES = ("train_stage1", "train_stage2", "stats", "cache_latents", "all", "import_torch")
# The checkpoint directories each training mode resumes from (<workdir>/<stage>/checkpoints).
TRAINED_STAGES = {"train_stage1": ("stage1",), "train_stage2": ("stage2",),
                  "all": ("stage1", "stage2")}
CONFIG_HISTORY = "config_history"


def check_resume_config(config: mlc.ConfigDict, workdir: str, mode: str) -> None:
  """Config drift against the config recorded with the newest checkpoint, before anything is
  written or restored: a changed model is named as such (config.model.hidden_size: 768 -> 960),
  not reported as a checkpoint structure mismatch."""
  from rae_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  for stage in TRAINED_STAGES.get(mode, ()):
    directory = os.path.join(workdir, stage, "checkpoints")
    found = checkpoint.saved_config(directory)
    if found:
      step, saved = found
      config_checks.check_resume(saved, config.to_dict(), stage=stage,
                                 where=f"{directory} step {step}")


def record_config(config: mlc.ConfigDict, workdir: str, mode: str) -> None:
  """config.<mode>.json (the latest start) and config_history/<UTC time>.<mode>.json (one per
  start that passed every check: the record of what each part of a run actually used)."""
  text = json.dumps(config.to_dict(), indent=2, default=str)
  stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
  storage.makedirs(os.path.join(workdir, CONFIG_HISTORY))
  storage.write_text(os.path.join(workdir, CONFIG_HISTORY, f"{stamp}.{mode}.{os.getpid()}.json"),
                     text)
  storage.write_text(os.path.join(workdir, f"config.{mode}.json"), text)


COMPILATION_CACHE = "compilation_cache"


def compilation_cache_dir(config: mlc.ConfigDict, workdir: str) -> str | None:
  """config.compilation_cache.dir: "" -> <workdir>/compilation_cache, "off" -> None. An empty
  field defers to $JAX_COMPILATION_CACHE_DIR when that is set."""
  cc = config.get("compilation_cache") or mlc.ConfigDict(dict(dir="", min_compile_time_s=1.0))
  if cc.dir == "off":
    return None
  if cc.dir:
    return cc.dir
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(workdir, COMPILATION_CACHE)


def enable_compilation_cache(config: mlc.ConfigDict, workdir: str) -> str | None:
  """JAX's persistent compilation cache: a restart (preemption, a second mode) loads the
  compiled programs instead of compiling again. On a pod every host reads and writes the same
  folder (a gs:// workdir's cache is on gs://; entries are written whole by one upload)."""
  path = compilation_cache_dir(config, workdir)
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  from rae_jax import storage  # pylint: disable=g-import-not-at-top
  storage.makedirs(path)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  min_s = (config.get("compilation_cache") or {}).get("min_compile_time_s", 1.0)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_s))
  logging.info("JAX compilation cache: %s", path)
  return path


def run(mode: str, config: mlc.ConfigDict, workdir: str):
  """Initialise multi-host, validate the config (and a resume's drift), take the workdir lock
  (writing modes), record the config, run the mode. A run refused by any check writes nothing."""
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
  check_resume_config(config, workdir, mode)
  storage.makedirs(workdir)
  lock = (workdir_lock.hold(workdir, mode) if mode in WRITER_MODES
          else contextlib.nullcontext())
  with lock:
    if jax.process_index() == 0:
      record_config(config, workdir, mode)
    enable_compilation_cache(config, workdir)
    logging.info("rae-jax --mode=%s, workdir %s, %d devices on %d processes", mode, workdir,
                 jax.device_count(), jax.process_count())
    return MODES[mode](config, workdir)
