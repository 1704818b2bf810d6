"""--mode=eval, --mode=fid_stats, --mode=eval_recon, and the online eval hook of stage-2 training.

Outputs under <workdir>/eval/:
  shards/shard_XXXXX.npz, shards/manifest.json   resumable generation (rae_jax.eval.sample_shards)
  samples.npz                                    ADM format: arr_0 uint8 NHWC, arr_1 labels
  pngs/XXXXXX.png                                with eval.write_pngs
  metrics.json                                   IS, FID, precision/recall (+ what produced them)
  fid_stats.npz                                  --mode=fid_stats: mu, sigma, pool3 of config.data
  recon_metrics.json                             --mode=eval_recon: PSNR, SSIM, rFID
  online_metrics.jsonl                           one line per online evaluation during training
FID compares against eval.reference_npz (ADM's VIRTUAL_imagenet256_labeled.npz or a fid_stats
file) or, when unset, against <workdir>/eval/fid_stats.npz if --mode=fid_stats wrote one.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import ml_collections as mlc
import numpy as np
from absl import logging

from rae_jax import storage
from rae_jax.data import make_source, resolve_num_threads
from rae_jax.eval import recon, sample_shards, scoring
from rae_jax.pipeline import builders, common, image_generator, images, loaders, snapshots
from rae_jax.train import multihost

EVAL_DIR = "eval"
FID_STATS = "fid_stats.npz"


def eval_dir(workdir: str) -> str:
  return os.path.join(workdir, EVAL_DIR)


def eval_labels(config: mlc.ConfigDict, num_samples: int) -> np.ndarray:
  """eval.label_sampling: 'equal' (num_samples/num_classes per class, class order, the official
  default) or 'random' (uniform, from the run seed)."""
  mode, k = config.eval.label_sampling, config.model.num_classes
  if mode == "equal" and num_samples % k:
    logging.warning("eval: %d samples are not a multiple of %d classes: the last classes get "
                    "fewer samples", num_samples, k)
  return image_generator.class_labels(num_samples, k, mode, sample_shards.label_key(config.seed))


def resolve_reference(config: mlc.ConfigDict, workdir: str,
                      scorer: scoring.Scorer) -> Optional[scoring.Reference]:
  path = config.eval.reference_npz
  if not path:
    ours = os.path.join(eval_dir(workdir), FID_STATS)
    if not storage.exists(ours):
      logging.warning("eval: no eval.reference_npz and no %s: FID and precision/recall are "
                      "skipped (run --mode=fid_stats or set eval.reference_npz)", ours)
      return None
    path = ours
  if not storage.exists(path):
    raise FileNotFoundError(f"eval.reference_npz={path!r} does not exist")
  return scoring.load_reference(path, scorer)


def _fingerprint(config: mlc.ConfigDict, workdir: str) -> dict:
  """What the samples depend on: a mismatch means the existing shards are someone else's."""
  def weights_of(stage):
    step = snapshots.latest_checkpoint_step(workdir, stage)
    if step is not None:
      return f"checkpoint step {step}"
    return "snapshot" if snapshots.has_weights(workdir, stage) else "none"
  g = config.guidance
  return dict(
      seed=config.seed, label_sampling=config.eval.label_sampling,
      compute_dtype=config.compute_dtype, model=config.model.to_dict(),
      sampler=config.sampler.to_dict(), transport=config.transport.to_dict(),
      guidance=g.to_dict() if g.method == "autoguidance" else
      {k: g[k] for k in ("method", "scale", "t_min", "t_max")},
      decoder=weights_of(builders.STAGE1_DIR), stage2=weights_of(builders.STAGE2_DIR),
      guide=weights_of(builders.GUIDE_DIR) if g.method == "autoguidance" else "unused",
      stats=builders.stats_path(config, workdir))


def load_generation(config: mlc.ConfigDict, workdir: str, mesh, which: str = "ema") -> dict:
  """{'generate', 'params', 'guide_params', 'rae_vars', 'rae'}: EMA stage-2 (and autoguidance
  guide) weights, stage-1 EMA decoder, placed on `mesh`; `generate` is make_generate's."""
  model, params, guide_model, guide_params, rae, rae_vars = loaders.load_models(config, workdir,
                                                                                mesh, which)
  transport = image_generator.transport_for(config, rae.latent_shape)
  gen = image_generator.make_generate(config, model, rae, transport, guide_model=guide_model)
  return dict(generate=gen, params=params, guide_params=guide_params, rae_vars=rae_vars, rae=rae)


def bind_sampler(config: mlc.ConfigDict, models: dict, mesh) -> Callable:
  """sample_fn(labels, indices) -> uint8 images, batch-sharded over `mesh`, noise keyed by the
  eval seed and the sample index."""
  sampler = sample_shards.ShardedSampler(models["generate"], mesh, config.eval.per_device_batch)
  return sample_shards.bind(sampler, models["params"], models["guide_params"], models["rae_vars"],
                         sample_shards.eval_seed_key(config.seed))


def load_sampler(config: mlc.ConfigDict, workdir: str, mesh, which: str = "ema") -> Callable:
  return bind_sampler(config, load_generation(config, workdir, mesh, which), mesh)


def _write_pngs(paths, directory: str) -> None:
  reader = sample_shards.ShardReader(paths)
  storage.makedirs(directory)
  done = set(storage.listdir(directory)) if storage.isdir(directory) else set()
  for i in range(len(reader)):
    path = os.path.join(directory, f"{i:06d}.png")
    if os.path.basename(path) not in done:
      images.write_png(reader.read(np.array([i]))[0], path)


def run_eval(config: mlc.ConfigDict, workdir: str, *, mesh=None,
             on_shard: Optional[Callable[[int, str], None]] = None) -> dict[str, Any]:
  """Generate eval.num_samples images (resumable shards), samples.npz, then score them."""
  mesh = mesh if mesh is not None else common.make_mesh(config)
  e = config.eval
  out = eval_dir(workdir)
  sample_fn = load_sampler(config, workdir, mesh)
  labels = eval_labels(config, e.num_samples)
  paths = sample_shards.generate_shards(sample_fn, labels, os.path.join(out, "shards"),
                                     e.shard_size, manifest=_fingerprint(config, workdir),
                                     on_shard=on_shard)
  samples = os.path.join(out, "samples.npz")
  if multihost.is_main():
    sample_shards.assemble_samples_npz(paths, samples)
    logging.info("eval: wrote %d samples to %s", len(labels), samples)
    if e.write_pngs:
      _write_pngs(paths, os.path.join(out, "pngs"))

  scorer = loaders.scorer_from_config(config, mesh)
  feats = scoring.extract(scorer, sample_shards.ShardReader(paths), len(labels),
                          max_kept=len(labels), desc="eval: scoring")
  reference = resolve_reference(config, workdir, scorer)
  m = scoring.score(feats, reference, is_random=scorer.is_random)
  sm = config.sampler
  m.update(samples=samples, label_sampling=e.label_sampling, seed=config.seed,
           sampler=f"{sm.mode} {sm.method} {sm.num_steps} steps",
           guidance=f"{config.guidance.method} scale {config.guidance.scale}")
  scoring.write_json(os.path.join(out, "metrics.json"), m)
  logging.info("eval: %s", scoring.format_metrics(m))
  return m


def run_fid_stats(config: mlc.ConfigDict, workdir: str, *, mesh=None) -> str:
  """Reference statistics of config.data (every image): mu, sigma and the pool3 activations of
  the first eval.num_samples images (precision/recall) -> <workdir>/eval/fid_stats.npz."""
  mesh = mesh if mesh is not None else common.make_mesh(config)
  source = make_source(config.data)
  scorer = loaders.scorer_from_config(config, mesh)
  n = len(source)
  logging.info("fid_stats: Inception features of %d images of %s", n, config.data.source)
  reader = scoring.source_reader(source, resolve_num_threads(config.data.num_threads))
  feats = scoring.extract(scorer, reader, n, max_kept=config.eval.num_samples, desc="fid_stats")
  skipped = scoring.total_skipped(reader)
  path = os.path.join(eval_dir(workdir), FID_STATS)
  if multihost.is_main():
    desc = f"{config.data.source}:{config.data.tfds_name if config.data.source == 'tfds' else ''}"
    scoring.save_stats(path, feats, is_random=scorer.is_random,
                       source=f"{desc}{config.data.path}:{config.data.split}",
                       num_skipped=skipped)
    scoring.write_json(os.path.join(eval_dir(workdir), "fid_stats_metrics.json"),
                       {"num_images": n, "num_skipped": skipped, "path": path})
    logging.info("fid_stats: %s%d images (%d unreadable, replaced) -> %s",
                 f"[{scoring.RANDOM_LABEL}] " if scorer.is_random else "", n, skipped, path)
  return path


def run_eval_recon(config: mlc.ConfigDict, workdir: str, *, mesh=None) -> dict[str, Any]:
  """PSNR, SSIM and rFID of the RAE (stage-1 EMA decoder) on config.data's eval_split."""
  mesh = mesh if mesh is not None else common.make_mesh(config)
  data_cfg = mlc.ConfigDict(config.data.to_dict())
  data_cfg.split = config.data.eval_split or config.data.split
  source = make_source(data_cfg)
  rae, rae_vars = loaders.load_inference_rae(config, workdir, mesh)
  if rae.image_size != config.data.image_size:
    raise ValueError(f"eval_recon: decoder makes {rae.image_size}px images but "
                     f"data.image_size={config.data.image_size}")
  n = recon.default_num_images(config.eval.num_samples, len(source))
  scorer = loaders.scorer_from_config(config, mesh)
  reader = scoring.source_reader(source, resolve_num_threads(config.data.num_threads))
  m = recon.evaluate_reconstruction(rae, rae_vars, reader, n, scorer)
  m.update(split=data_cfg.split, source=config.data.source,
           num_skipped=scoring.total_skipped(reader))
  scoring.write_json(os.path.join(eval_dir(workdir), "recon_metrics.json"), m)
  logging.info("eval_recon: %s", recon.recon_metrics_line(m))
  return m


def make_online_eval_hook(config: mlc.ConfigDict, workdir: str, *, mesh, model, rae,
                          rae_vars, guide_model=None, guide_params=None, writer=None,
                          params_of: Callable[[Any], Any] = lambda state: state.ema_params,
                          scorer: Optional[scoring.Scorer] = None) -> Callable:
  """hook(step, state, metrics) for `train_loop`: every eval.online_every_steps, samples
  eval.online_num_samples images from params_of(state) (EMA) in memory, scores them, logs them
  (TensorBoard via `writer`, online_metrics.jsonl) and returns the metrics; else None.

  Compiled once (first call); the same indices/labels every time, so curves compare like with
  like. Inception runs on the sampler's batch-sharded images (eval.per_device_batch, as the
  scorer from the config does), so no image is gathered to any host."""
  every, n = int(config.eval.online_every_steps), int(config.eval.online_num_samples)
  if every > 0 and n < 2:
    raise ValueError(f"eval.online_num_samples must be >= 2 for FID, got {n}")
  transport = image_generator.transport_for(config, rae.latent_shape)
  gen = image_generator.make_generate(config, model, rae, transport, guide_model=guide_model)
  sampler = sample_shards.ShardedSampler(gen, mesh, config.eval.per_device_batch)
  labels = eval_labels(config, n) if every > 0 else None
  seed_key = sample_shards.eval_seed_key(config.seed)
  lazy: dict[str, Any] = {"scorer": scorer}

  def hook(step: int, state, metrics=None) -> Optional[dict]:
    del metrics
    if every <= 0 or step % every:
      return None
    if lazy["scorer"] is None:
      lazy["scorer"] = loaders.scorer_from_config(config, mesh)
    if "reference" not in lazy:
      lazy["reference"] = resolve_reference(config, workdir, lazy["scorer"])
    s = lazy["scorer"]
    # Features straight from the batch-sharded images: no image reaches any host.
    def feature_batches():
      for x, k in sampler.batches(params_of(state), guide_params, rae_vars, labels,
                                  np.arange(n), seed_key):
        pool3, logits = s.features(x)
        yield pool3[:k], logits[:k]
    feats = scoring.accumulate(feature_batches(), max_kept=n)
    m = scoring.score(feats, lazy["reference"], is_random=s.is_random)
    scalars = {f"online_eval/{k}": v for k, v in m.items() if isinstance(v, float)}
    if writer is not None:
      writer.scalars(step, scalars)
    if multihost.is_main():
      # Rewritten whole (object stores have no append); one short line per online eval.
      path = os.path.join(eval_dir(workdir), "online_metrics.jsonl")
      old = storage.read_text(path) if storage.exists(path) else ""
      storage.write_text(path, old + json.dumps(dict(m, step=int(step)), default=str) + "\n")
    logging.info("online eval at step %d: %s", step, scoring.format_metrics(m))
    return m

  return hook
