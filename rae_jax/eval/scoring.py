"""Inception features of an image set, sharded over the mesh, and the scores built on them.

Images come from a `reader(indices) -> uint8 (n,H,W,3)` (shards, an image source, an array):
global batches of per_device_batch x (batch shards) indices, each process reading only its own
rows; the short last batch repeats the final index and the extra rows are dropped. Features are
all-gathered on device (replicated output), so every process ends with the same float64 stats.
The next batch is read on a thread while the devices run the current one.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import threading
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np
from absl import logging

from rae_jax import progress, storage
from rae_jax.eval import inception
from rae_jax.eval import metrics as metrics_lib
from rae_jax.train import mesh as mesh_lib

RANDOM_LABEL = "RANDOM INCEPTION WEIGHTS - numbers are not FID"
RANDOM_INCEPTION_SEED = 0  # fixed: references and samples must see the same random network
Reader = Callable[[np.ndarray], np.ndarray]


@functools.lru_cache(maxsize=8)
def _features_fn(mesh):
  def fn(params, images):
    out = inception.inception_features(params, images)
    return out["pool3"], out["logits"]
  return jax.jit(fn, out_shardings=mesh_lib.replicated(mesh))


@dataclasses.dataclass
class Scorer:
  """FID Inception params replicated on `mesh` + the batch geometry used to feed it."""
  mesh: Any
  params: Any
  is_random: bool
  per_device_batch: int

  @classmethod
  def create(cls, mesh, params: Any, is_random: bool, per_device_batch: int) -> "Scorer":
    """Replicates `params` on `mesh`. Reading a weights file is the caller's (interop's) job:
    rae_jax.pipeline.loaders.load_scorer does both."""
    if is_random:
      logging.warning("%s: %s", RANDOM_LABEL, inception.RANDOM_WEIGHTS_WARNING)
    params = jax.device_put(params, mesh_lib.replicated(mesh))
    return cls(mesh, params, bool(is_random), int(per_device_batch))

  @property
  def global_batch(self) -> int:
    return self.per_device_batch * mesh_lib.num_batch_shards(self.mesh)

  @property
  def label(self) -> str:
    return RANDOM_LABEL if self.is_random else "pt_inception-2015-12-05"

  def global_batches(self, reader: Reader, num_images: int) -> Iterator[tuple[jax.Array, int]]:
    """(batch-sharded global batch of images 0..num_images-1, number of real rows), in order.

    Each process reads only its rows; the read of batch k+1 overlaps the device work of k."""
    if num_images <= 0:
      raise ValueError(f"no images to score (num_images={num_images})")
    gb = self.global_batch
    rows = mesh_lib.process_batch_slice(self.mesh, gb)

    def read(start):
      return reader(np.minimum(np.arange(start, start + gb), num_images - 1)[rows])

    starts = list(range(0, num_images, gb))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      pending = pool.submit(read, starts[0])
      for k, start in enumerate(starts):
        local = pending.result()
        if k + 1 < len(starts):
          pending = pool.submit(read, starts[k + 1])
        yield mesh_lib.global_batch(self.mesh, local, gb), min(gb, num_images - start)

  def features(self, images: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Global image batch (uint8 or [0,1] float) -> host (pool3, logits) float32, all rows."""
    pool3, logits = _features_fn(self.mesh)(self.params, images)
    return np.asarray(pool3), np.asarray(logits)

  def batches(self, reader: Reader, num_images: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (pool3 (n,2048), logits (n,1008)) float32 per global batch, in index order."""
    for x, n in self.global_batches(reader, num_images):
      pool3, logits = self.features(x)
      yield pool3[:n], logits[:n]


@dataclasses.dataclass
class Features:
  """Float64 pool3 statistics of all images, plus the first `max_kept` activations/logits."""
  stats: metrics_lib.FeatureStats
  pool3: np.ndarray
  logits: np.ndarray

  @property
  def n(self) -> int:
    return self.stats.n


def accumulate(batches: Iterator[tuple[np.ndarray, np.ndarray]],
               max_kept: Optional[int] = None) -> Features:
  stats = metrics_lib.FeatureStats.empty(inception.POOL3_DIM)
  pools, logits, kept = [], [], 0
  for p, z in batches:
    stats = stats.update(p)
    take = len(p) if max_kept is None else max(min(len(p), max_kept - kept), 0)
    pools.append(p[:take])
    logits.append(z[:take])
    kept += take
  return Features(stats, np.concatenate(pools), np.concatenate(logits))


def extract(scorer: Scorer, reader: Reader, num_images: int,
            max_kept: Optional[int] = None, desc: str = "inception features") -> Features:
  def counted():
    with progress.bar(num_images, desc) as bar:
      for p, z in scorer.batches(reader, num_images):
        bar.update(len(p))
        yield p, z
  return accumulate(counted(), max_kept)


# --------------------------------------------------------------------------- readers
def array_reader(images: np.ndarray) -> Reader:
  images = np.asarray(images)
  return lambda idx: images[idx]


class SourceReader:
  """Reads `source[i] -> (uint8 image, label)` on a few threads (PIL decode drops the GIL).

  Index-exact over the whole source, unlike DataIterator, which drops the last partial batch
  (fine for training, wrong for statistics of a fixed image set). Unreadable examples follow
  the training policy: replaced by the next readable index, the file named in the log once,
  and counted (`num_skipped`: distinct bad examples met by this process)."""

  def __init__(self, source, num_threads: int = 4, max_consecutive_failures: int = 100):
    if getattr(source, "kind", "image") != "image":
      raise ValueError("image statistics need an image source, got a latent cache "
                       "(set data.source to 'tfds', 'image_folder' or 'synthetic')")
    self.source = source
    self.max_consecutive_failures = max_consecutive_failures
    self.pool = concurrent.futures.ThreadPoolExecutor(max(int(num_threads), 1))
    self.bad: dict[int, str] = {}
    self._lock = threading.Lock()

  @property
  def num_skipped(self) -> int:
    with self._lock:
      return len(self.bad)

  def _one(self, index: int) -> np.ndarray:
    n = len(self.source)
    for attempt in range(min(self.max_consecutive_failures, n)):
      i = (index + attempt) % n
      if i in self.bad:
        continue
      try:
        return np.asarray(self.source[i][0])
      except Exception as e:  # pylint: disable=broad-except
        with self._lock:
          first = i not in self.bad
          self.bad[i] = f"{type(e).__name__}: {e}"
        if first:
          describe = getattr(self.source, "describe", None)
          logging.warning("eval data: skipping unreadable example %d (%s): %s: %s", i,
                          describe(i) if describe else f"example {i}", type(e).__name__, e)
    raise RuntimeError(f"eval data: {min(self.max_consecutive_failures, n)} consecutive unreadable "
                       f"examples from index {index}; last error: {self.bad.get(i)}")

  def __call__(self, idx) -> np.ndarray:
    return np.stack(list(self.pool.map(self._one, [int(i) for i in idx])))


def source_reader(source, num_threads: int = 4) -> SourceReader:
  return SourceReader(source, num_threads)


def total_skipped(reader) -> int:
  """Bad examples met by all processes (each counts its own rows)."""
  n = int(getattr(reader, "num_skipped", 0))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    n = int(np.sum(multihost_utils.process_allgather(np.int64(n))))
  return n


# --------------------------------------------------------------------------- references
@dataclasses.dataclass
class Reference:
  """What scores compare against: mu/sigma (float64) and, for precision/recall, pool3."""
  path: str
  mu: np.ndarray
  sigma: np.ndarray
  pool3: Optional[np.ndarray]
  is_random: Optional[bool]  # None: an ADM file (real weights by construction)
  pool3_complete: bool = False  # mu/sigma are exactly the statistics of `pool3`


def save_stats(path: str, features: Features, *, is_random: bool, source: str,
               num_skipped: int = 0) -> str:
  """ADM-style reference file: mu, sigma (float64) and pool3 activations, plus provenance."""
  storage.write_file(path, lambda f: np.savez(
      f, mu=features.stats.mu, sigma=features.stats.sigma,
      pool3=features.pool3.astype(np.float32), num_images=np.int64(features.n),
      random_inception=np.bool_(is_random), source=np.str_(source),
      num_skipped=np.int64(num_skipped)))
  return path


def load_reference(path: str, scorer: Scorer) -> Reference:
  """ADM reference batch (mu/sigma + arr_0 images) or our fid_stats.npz (mu/sigma + pool3).

  ADM files carry images, not activations: their pool3 (for precision/recall) is computed here
  with `scorer`, as the ADM evaluator does."""
  ref = metrics_lib.load_reference_batch(path)
  with storage.load_npz(path) as z:
    flag = bool(z["random_inception"]) if "random_inception" in z.files else None
    count = int(z["num_images"]) if "num_images" in z.files else None
  if flag is not None and flag != scorer.is_random:
    raise ValueError(
        f"{path} was computed with {'RANDOM' if flag else 'real'} Inception weights but this "
        f"run uses {'RANDOM' if scorer.is_random else 'real'} ones (eval.inception_weights="
        f"{scorer.label!r}); recompute it with --mode=fid_stats")
  pool3 = ref.pool3
  if pool3 is None and ref.num_images:
    logging.info("eval: computing pool3 of the %d reference images in %s", ref.num_images, path)
    with storage.load_npz(path) as z:
      images = z["arr_0"]
    pool3 = extract(scorer, array_reader(images), len(images)).pool3
  mu, sigma = ref.mu, ref.sigma
  complete = pool3 is not None and count == len(pool3)
  if mu is None:
    stats = metrics_lib.FeatureStats.from_features(pool3)
    mu, sigma, complete = stats.mu, stats.sigma, True
  return Reference(path, mu, sigma, pool3, flag, complete)


def frechet_distance_low_rank(x1, x2) -> float:
  """FID of two feature sets, exact, without the d x d matrix square root.

  With S1 = A^T A and S2 = B^T B (A, B the centred features over sqrt(n-1)), S1 S2 has the
  nonzero eigenvalues of (A B^T)(A B^T)^T, so tr sqrtm(S1 S2) is the nuclear norm of the
  n1 x n2 matrix A B^T: O(n^2 d) instead of scipy's O(d^3) Schur root (~45 s CPU at d=2048).
  Used when both sets are smaller than the dimension (online eval, small runs): S1 S2 is then
  singular, where `frechet_distance` can only fall back to its eps-regularised root.
  """
  x1, x2 = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
  if x1.ndim != 2 or x2.ndim != 2 or x1.shape[1] != x2.shape[1] or min(len(x1), len(x2)) < 2:
    raise ValueError(f"FID needs (N>=2, D) features of equal D, got {x1.shape} and {x2.shape}")
  mu1, mu2 = x1.mean(0), x2.mean(0)
  a = (x1 - mu1) / np.sqrt(len(x1) - 1)
  b = (x2 - mu2) / np.sqrt(len(x2) - 1)
  nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.sum(a * a) + np.sum(b * b) - 2 * nuclear)


def fid(features: "Features", mu, sigma, pool3: Optional[np.ndarray] = None) -> tuple[float, str]:
  """(FID, method): the low-rank exact form when every feature behind both statistics is at
  hand and both sets are smaller than the dimension, else ADM's sqrtm route."""
  d = features.stats.mu.shape[0]
  if (pool3 is not None and len(features.pool3) == features.n and max(features.n, len(pool3)) < d):
    return frechet_distance_low_rank(pool3, features.pool3), "low_rank_svd"
  return metrics_lib.frechet_distance(features.stats.mu, features.stats.sigma, mu, sigma), "sqrtm"


def score(features: Features, reference: Optional[Reference], *, is_random: bool,
          k: int = 3) -> dict[str, Any]:
  """{'inception_score', 'fid', 'precision', 'recall', ...} as the ADM suite reports them."""
  out: dict[str, Any] = {"num_samples": int(features.n),
                         "inception": RANDOM_LABEL if is_random else "pt_inception-2015-12-05",
                         "random_inception": bool(is_random)}
  out["inception_score"] = metrics_lib.inception_score(features.logits)
  if reference is None:
    return out
  out["reference"] = reference.path
  out["fid"], out["fid_method"] = fid(features, reference.mu, reference.sigma,
                                      reference.pool3 if reference.pool3_complete else None)
  if reference.pool3 is not None and len(reference.pool3) > k and len(features.pool3) > k:
    p, r = metrics_lib.precision_recall(reference.pool3, features.pool3, k=k)
    out["precision"], out["recall"] = p, r
  return out


def format_metrics(m: dict[str, Any]) -> str:
  parts = [f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float)]
  text = f"{m.get('num_samples')} images: " + ", ".join(parts)
  if m.get("random_inception"):
    text = f"[{RANDOM_LABEL}] " + text
  return text


def write_json(path: str, m: dict[str, Any]) -> None:
  if jax.process_index() != 0:
    return
  storage.write_text(path, json.dumps(m, indent=2, sort_keys=True, default=str))
