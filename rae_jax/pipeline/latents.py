"""Passes of the frozen encoder over a whole dataset: latent stats and the latent cache.

Both visit every example exactly once (no dropped remainder: the last batch is padded and the
padding masked out), batch-sharded over the mesh, each process reading only its rows.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import logging

from rae_jax import data as data_lib
from rae_jax import progress, storage
from rae_jax.interop import stats as stats_io
from rae_jax.pipeline import builders, common
from rae_jax.train import mesh as mesh_lib
from rae_jax.train import multihost

LATENT_CACHE = "latents"
FINGERPRINT = "fingerprint.json"
COMPLETE = "COMPLETE.json"


def fingerprint(config: mlc.ConfigDict) -> dict:
  """What a latent pass depends on: encoder, data (source, path, split, image size, size), the
  seed (flips, toy encoder init) and the compute dtype. A match means the result is reusable."""
  data = {k: v for k, v in config.data.to_dict().items()
          if k not in ("num_threads", "prefetch", "eval_split")}
  fp = {"encoder": config.encoder.to_dict(), "data": data, "seed": config.seed,
        "compute_dtype": config.compute_dtype}
  return json.loads(json.dumps(fp, default=str, sort_keys=True))


def _read_json(path: str) -> Optional[dict]:
  try:
    return json.loads(storage.read_text(path))
  except (OSError, ValueError):
    return None


def _write_json(path: str, value: dict) -> None:
  storage.write_text(path, json.dumps(value, indent=2, sort_keys=True))


def _diff(old: Optional[dict], new: dict) -> str:
  if old is None:
    return "no fingerprint"
  from rae_jax.config_checks import resume_drift  # pylint: disable=g-import-not-at-top
  return ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in resume_drift(old, new)[:5])


def _read(source, index: int, flip: bool) -> tuple[np.ndarray, int, bool]:
  try:
    img, label = source[int(index)]
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("skipping unreadable example %d (%s): %s", index,
                    getattr(source, "describe", str)(index), e)
    return None, -1, False
  img = data_lib.transforms.to_unit_float(np.asarray(img))
  if flip:
    img = img[:, ::-1]
  return img, int(label), True


def full_pass(source, mesh, global_batch: int, flips: np.ndarray, num_threads: int = 4,
              start_batch: int = 0, skip: Optional[Callable[[int], bool]] = None
              ) -> Iterator[tuple[int, jax.Array, np.ndarray, np.ndarray]]:
  """Yields (batch number, global images (B,H,W,3), this process's indices, valid mask rows).

  Unreadable examples are masked out and counted in the log (never silently dropped).
  skip(b): batch b is not read at all (must agree on every process).
  """
  n = len(source)
  rows = mesh_lib.process_batch_slice(mesh, global_batch)
  num_batches = -(-n // global_batch)
  skipped = 0
  with concurrent.futures.ThreadPoolExecutor(data_lib.resolve_num_threads(num_threads)) as pool:
    for b in range(start_batch, num_batches):
      if skip is not None and skip(b):
        continue
      idx = np.arange(b * global_batch, (b + 1) * global_batch)[rows]
      valid = idx < n
      safe = np.where(valid, idx, n - 1)
      out = list(pool.map(lambda i: _read(source, i, bool(flips[i])), safe))
      shape = next((o[0].shape for o in out if o[0] is not None), None)
      if shape is None:
        raise RuntimeError(f"batch {b}: no readable example among indices {safe.tolist()[:8]}...")
      imgs = np.stack([o[0] if o[0] is not None else np.zeros(shape, np.float32) for o in out])
      readable = np.array([o[2] for o in out])
      skipped += int(np.sum(valid & ~readable))
      valid &= readable
      labels = np.array([o[1] for o in out], np.int32)
      g = mesh_lib.global_batch(mesh, {"image": imgs}, global_batch)["image"]
      yield b, g, safe, valid, labels
  if skipped:
    logging.warning("%d unreadable examples were skipped in this pass (process %d)", skipped,
                    jax.process_index())


def compute_stats(config: mlc.ConfigDict, workdir: str) -> str:
  """Per-position latent mean and (population) variance over the training set -> stat.npz.

  Official stat.pt semantics ((C,h,w) mean/var of encoder latents on centre-cropped, randomly
  flipped training images); we compute them exactly (Chan's parallel update in float64) where
  the official script keeps BatchNorm-style running averages.
  """
  path = os.path.join(workdir, builders.STATS_FILE)
  fp = fingerprint(config)
  saved = _read_json(path + ".json")
  if storage.exists(path) and saved == fp:
    logging.info("stats: %s is complete and matches this config (encoder, data, seed); reused",
                 path)
    return path
  if storage.exists(path):
    logging.warning("stats: recomputing %s (%s)", path, _diff(saved, fp))
  mesh = common.make_mesh(config)
  rae, variables = builders.build_rae(config, workdir, with_stats=False)
  source = data_lib.make_source(config.data)
  gb = config.eval.per_device_batch * jax.device_count()
  flips = data_lib.epoch_flips(config.seed, 0, len(source))
  rep = common.replicated(mesh, variables["encoder"])

  def batch_moments(enc_params, images, valid):
    z = rae.encode({"encoder": enc_params}, images)  # no stats, no noise
    w = valid.astype(jnp.float32)[:, None, None, None]
    cnt = jnp.sum(w)
    mean = jnp.sum(z * w, 0) / jnp.maximum(cnt, 1)
    m2 = jnp.sum(w * (z - mean) ** 2, 0)
    return cnt, mean, m2
  batch_moments = jax.jit(mesh_lib.traced_under(mesh, batch_moments))

  count, mean, m2 = 0.0, None, None
  bar = progress.bar(len(source), "stats")
  for b, images, _, valid, _ in full_pass(source, mesh, gb, flips, config.data.num_threads):
    bar.update(min(gb, len(source) - b * gb))
    gvalid = mesh_lib.global_batch(mesh, {"v": valid}, gb)["v"]
    c, mu, q = jax.device_get(batch_moments(rep, images, gvalid))
    c, mu, q = float(c), mu.astype(np.float64), q.astype(np.float64)
    if c == 0:
      continue
    if mean is None:
      count, mean, m2 = c, mu, q
    else:
      delta = mu - mean
      tot = count + c
      mean = mean + delta * (c / tot)
      m2 = m2 + q + delta ** 2 * (count * c / tot)
      count = tot
  bar.close()
  if mean is None:
    raise RuntimeError("stats: no readable example in the training set")
  var = m2 / count
  if multihost.is_main():
    stats_io.save_stats({"mean": mean.astype(np.float32), "var": var.astype(np.float32)}, path)
    _write_json(path + ".json", fp)  # after the stats: a kill in between means "redo"
    logging.info("stats: %d examples, latent %s, mean |mu| %.4f, mean var %.4f -> %s",
                 int(count), mean.shape, np.abs(mean).mean(), var.mean(), path)
  return path


def encode_with_mirrors(rae, mesh) -> Callable:
  """Jitted (encoder params, images (B,H,W,3)) -> raw latents (B, 2, h, w, C): each image and
  its mirror. Each image sits next to its mirror in the encoder's batch, so every device encodes
  its own rows ([images; mirrors] moved half of every device's batch to another device)."""
  def encode_both(enc_params, images):
    n = images.shape[0]
    both = jnp.stack([images, images[:, :, ::-1]], 1).reshape((2 * n,) + images.shape[1:])
    z = rae.encode({"encoder": enc_params}, both)
    return z.reshape((n, 2) + z.shape[1:])
  return jax.jit(mesh_lib.traced_under(mesh, encode_both))


def cache_latents(config: mlc.ConfigDict, workdir: str) -> str:
  """Raw (un-normalised) encoder latents of every image and its mirror -> <workdir>/latents.

  Stage 2 then reads latents and normalises them with the current stats, so recomputing stats
  never invalidates the cache. Resumable: a complete cache whose fingerprint matches is reused
  as is; an incomplete one keeps its complete shards and only the batches not yet fully cached
  are read and encoded; a mismatched one is moved aside (latents.stale[.N]) and redone.
  """
  directory = os.path.join(workdir, LATENT_CACHE)
  fp = fingerprint(config)
  saved = _read_json(os.path.join(directory, FINGERPRINT))
  if storage.isdir(directory) and storage.listdir(directory) and saved != fp:
    stale, k = directory + ".stale", 0
    while storage.exists(stale):
      k += 1
      stale = f"{directory}.stale.{k}"
    if multihost.is_main():
      storage.move_tree(directory, stale)  # gs://: copy, check, then delete (never loses data)
    multihost.barrier(f"cache_latents stale {directory}")
    logging.warning("cache_latents: %s does not match this config (%s); moved aside to %s",
                    directory, _diff(saved, fp), stale)
  elif storage.exists(os.path.join(directory, COMPLETE)):
    logging.info("cache_latents: %s is complete and matches this config; reused", directory)
    return directory
  storage.makedirs(directory)
  if multihost.is_main():
    _write_json(os.path.join(directory, FINGERPRINT), fp)
  mesh = common.make_mesh(config)
  rae, variables = builders.build_rae(config, workdir, with_stats=False)
  source = data_lib.make_source(config.data)
  gb = config.eval.per_device_batch * jax.device_count()
  done = set(data_lib.cached_indices(directory).tolist())
  multihost.barrier(f"cache_latents read {directory}")  # everyone saw `done` before anyone writes
  done_mask = np.zeros(len(source), bool)
  done_mask[[i for i in done if i < len(source)]] = True

  def batch_done(b):
    return bool(done_mask[b * gb:(b + 1) * gb].all())
  writer = data_lib.LatentCacheWriter(directory, process_index=jax.process_index(),
                                      dtype=config.stage2.get("latent_cache_dtype", "float16"))
  rep = common.replicated(mesh, variables["encoder"])

  encode_both = encode_with_mirrors(rae, mesh)

  no_flip = np.zeros(len(source), bool)
  num_batches = -(-len(source) // gb)
  bar = progress.bar(len(source), "cache_latents", initial=int(done_mask.sum()))
  for b, images, idx, valid, labels in full_pass(source, mesh, gb, no_flip,
                                                 config.data.num_threads, skip=batch_done):
    bar.update(min(gb, len(source) - b * gb))
    keep = valid & ~np.isin(idx, list(done))
    z = encode_both(rep, images)
    local = np.concatenate([np.asarray(s.data) for s in sorted(
        z.addressable_shards, key=lambda s: s.index[0].start or 0)], 0)
    if keep.any():
      writer.append(local[keep], labels[keep], idx[keep])
    if b % 50 == 0:
      logging.info("cache_latents: batch %d/%d", b + 1, num_batches)
  bar.close()
  multihost.barrier(f"cache_latents written {directory}")
  count = len(data_lib.cached_indices(directory))
  if multihost.is_main():
    _write_json(os.path.join(directory, COMPLETE), {"num_examples": count})
  logging.info("cache_latents: %s holds %d examples", directory, count)
  return directory
