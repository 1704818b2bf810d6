"""FID, Inception Score and precision/recall as the ADM evaluation suite computes them.

Inputs are Inception features (`rae_jax.eval.inception`): pool3 (N, 2048) and unbiased logits
(N, 1008). Statistics are float64 on the host; the k-NN distance blocks of precision/recall run
jitted on the default device (50k x 10k x 2048 is far too much work for numpy).

Deliberate differences from ADM's TensorFlow code, all below its own noise:
- pairwise distances in float32 (ADM: float16, float32 only if float16 overflows);
- IS uses a log-softmax in float64 (ADM: float32 softmax then log, NaN if a probability underflows).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
import zipfile
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from rae_jax import storage

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- FID
def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """||mu1-mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), in float64, as ADM's `FIDStatistics`.

  scipy's Schur-based sqrtm; if the product is singular (non-finite root) both covariances get
  `eps` on the diagonal; a complex root is accepted only when its diagonal's imaginary part is
  below 1e-3, and then its real part is used.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f"FID: mean vectors differ or are not 1-D: {mu1.shape} vs {mu2.shape}")
  d = mu1.shape[0]
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"FID: covariances {sigma1.shape}, {sigma2.shape} do not match means ({d},)")

  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    warnings.warn(f"FID: singular product; adding {eps} to the diagonal of both covariances")
    offset = np.eye(d) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureStats:
  """Streaming mean/covariance in float64 (Chan et al.'s pairwise merge: no E[xx^T] - mu mu^T
  cancellation). Feed per-batch features with `update`; combine hosts/shards with `merge`."""
  n: int
  mean: np.ndarray  # (D,)
  m2: np.ndarray    # (D, D) sum of centred outer products

  @classmethod
  def empty(cls, dim: int) -> "FeatureStats":
    return cls(0, np.zeros(dim), np.zeros((dim, dim)))

  @classmethod
  def from_features(cls, features) -> "FeatureStats":
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
      raise ValueError(f"features must be (N, D), got shape {x.shape}")
    mean = x.mean(axis=0)
    xc = x - mean
    return cls(x.shape[0], mean, xc.T @ xc)

  def update(self, features) -> "FeatureStats":
    return self.merge(FeatureStats.from_features(features))

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    if self.mean.shape != other.mean.shape:
      raise ValueError(f"cannot merge stats of dims {self.mean.shape} and {other.mean.shape}")
    if other.n == 0:
      return self
    if self.n == 0:
      return other
    n = self.n + other.n
    delta = other.mean - self.mean
    mean = self.mean + delta * (other.n / n)
    m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n)
    return FeatureStats(n, mean, m2)

  @property
  def mu(self) -> np.ndarray:
    return self.mean

  @property
  def sigma(self) -> np.ndarray:
    """Unbiased covariance, as np.cov(features, rowvar=False)."""
    if self.n < 2:
      raise ValueError(f"covariance needs at least 2 samples, have {self.n}")
    return self.m2 / (self.n - 1)


def fid_from_features(features_a, features_b) -> float:
  a, b = FeatureStats.from_features(features_a), FeatureStats.from_features(features_b)
  return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


# --------------------------------------------------------------------------- Inception Score
def inception_score(logits, split_size: int = 5000) -> float:
  """exp(E_x KL(p(y|x) || p(y))) averaged over consecutive chunks of `split_size` samples (ADM
  splits by size, so 50k samples give 10 splits). `logits`: the unbiased logits (N, 1008)."""
  z = np.asarray(logits, np.float64)
  if z.ndim != 2 or z.shape[0] == 0:
    raise ValueError(f"inception_score: logits must be (N, classes) with N > 0, got {z.shape}")
  z = z - z.max(axis=1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  scores = []
  for i in range(0, z.shape[0], split_size):
    lp = logp[i:i + split_size]
    p = np.exp(lp)
    log_marginal = np.log(p.mean(axis=0, keepdims=True))
    scores.append(np.exp(np.mean(np.sum(p * (lp - log_marginal), axis=1))))
  return float(np.mean(scores))


# --------------------------------------------------------------------------- precision / recall
def _sq_dists(u, v):
  nu = jnp.sum(u * u, axis=1)[:, None]
  nv = jnp.sum(v * v, axis=1)[None, :]
  return jnp.maximum(nu - 2 * jnp.dot(u, v.T, precision=_HIGHEST) + nv, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _knn_candidates(rows, cols, col_valid, k: int):
  """Per row, the k+1 smallest squared distances to the valid columns of this block."""
  d = jnp.where(col_valid[None, :], _sq_dists(rows, cols), jnp.inf)
  return -jax.lax.top_k(-d, k + 1)[0]


@jax.jit
def _in_manifold(ref, ref_radii, smp, smp_radii):
  """(ref rows inside some sample ball, sample rows inside some ref ball); invalid rows carry
  radius -inf so they neither contain nor (after masking on the host) count."""
  d = _sq_dists(ref, smp)
  return (jnp.any(d <= smp_radii[None, :], axis=1), jnp.any(d <= ref_radii[:, None], axis=0))


def _pad(x: np.ndarray, block: int, value=0.0) -> np.ndarray:
  n = -len(x) % block
  return np.concatenate([x, np.full((n,) + x.shape[1:], value, x.dtype)]) if n else x


def manifold_radii(features, k: int = 3, batch_size: int = 10000) -> np.ndarray:
  """Squared distance from each feature to its k-th nearest neighbour (itself counted as the 0th,
  as ADM's `ManifoldEstimator.manifold_radii` with nhood_sizes=(k,))."""
  x = np.asarray(features, np.float32)
  n = len(x)
  if n <= k:
    raise ValueError(f"precision/recall with k={k} needs more than {k} features, got {n}")
  block = min(batch_size, n)
  xp = _pad(x, block)
  valid = np.arange(len(xp)) < n
  radii = np.empty(n, np.float32)
  for r in range(0, n, block):
    cand = [np.asarray(_knn_candidates(xp[r:r + block], xp[c:c + block], valid[c:c + block], k=k))
            for c in range(0, len(xp), block)]
    kth = np.sort(np.concatenate(cand, axis=1), axis=1)[:, k]
    radii[r:r + block] = kth[:min(block, n - r)]
  return radii


def precision_recall(ref_features, sample_features, k: int = 3,
                     batch_size: int = 10000) -> tuple[float, float]:
  """Improved precision/recall (Kynkaanniemi et al. 2019) as ADM: precision = fraction of samples
  inside the union of the reference k-NN balls; recall = fraction of references inside the union
  of the sample k-NN balls."""
  ref = np.asarray(ref_features, np.float32)
  smp = np.asarray(sample_features, np.float32)
  if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
    raise ValueError(f"precision_recall: features must be (N, D) with equal D, got {ref.shape} "
                     f"and {smp.shape}")
  ref_radii = manifold_radii(ref, k, batch_size)
  smp_radii = manifold_radii(smp, k, batch_size)
  rb, sb = min(batch_size, len(ref)), min(batch_size, len(smp))
  ref_p, smp_p = _pad(ref, rb), _pad(smp, sb)
  ref_rp, smp_rp = _pad(ref_radii, rb, -np.inf), _pad(smp_radii, sb, -np.inf)
  ref_in = np.zeros(len(ref_p), bool)
  smp_in = np.zeros(len(smp_p), bool)
  for r in range(0, len(ref_p), rb):
    for c in range(0, len(smp_p), sb):
      a, b = _in_manifold(ref_p[r:r + rb], ref_rp[r:r + rb], smp_p[c:c + sb], smp_rp[c:c + sb])
      ref_in[r:r + rb] |= np.asarray(a)
      smp_in[c:c + sb] |= np.asarray(b)
  return float(smp_in[:len(smp)].mean()), float(ref_in[:len(ref)].mean())


# --------------------------------------------------------------------------- ADM npz files
@contextlib.contextmanager
def _npy_member(path: str, key: str):
  """Open `key`.npy inside the zip, positioned after its header; yields (file, shape, dtype)."""
  with storage.open(path, "rb") as raw, zipfile.ZipFile(raw) as zf:
    if f"{key}.npy" not in zf.namelist():
      names = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
      raise KeyError(f"{path}: no array '{key}' (has {names})")
    with zf.open(f"{key}.npy") as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        raise ValueError(f"{path}:{key}: unsupported .npy format version {version}")
      if fortran or dtype.hasobject:
        raise ValueError(f"{path}:{key}: cannot stream a fortran-ordered or object array")
      yield f, tuple(shape), dtype


def iter_npz_batches(path: str, key: str = "arr_0", batch_size: int = 256,
                     start: int = 0) -> Iterator[np.ndarray]:
  """Stream `key` of an .npz in batches along axis 0 without loading it (a 50k x 256^2 sample
  file is ~10 GB). `start` skips leading rows (resuming)."""
  with _npy_member(path, key) as (f, shape, dtype):
    if not shape:
      raise ValueError(f"{path}:{key}: cannot batch a 0-d array")
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    if start:
      f.seek(start * row, os.SEEK_CUR)
    for i in range(start, shape[0], batch_size):
      m = min(batch_size, shape[0] - i)
      buf = f.read(m * row)
      if len(buf) != m * row:
        raise ValueError(f"{path}:{key}: truncated at row {i} (expected {shape[0]} rows)")
      yield np.frombuffer(buf, dtype).reshape((m,) + tuple(shape[1:]))


def npz_array_shape(path: str, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
  with _npy_member(path, key) as (_, shape, dtype):
    return shape, dtype


@dataclasses.dataclass(frozen=True, eq=False)
class ReferenceBatch:
  """An ADM reference batch (e.g. `VIRTUAL_imagenet256_labeled.npz`): `mu`/`sigma` pool3
  statistics (float64), optional `mu_s`/`sigma_s` spatial (sFID) statistics, and `arr_0`, the
  reference IMAGES (N,H,W,3) uint8 whose pool3 activations precision/recall needs; stream them
  with `iter_images`. Files written by `save_reference` may carry `pool3` activations instead."""
  path: str
  mu: np.ndarray | None
  sigma: np.ndarray | None
  mu_s: np.ndarray | None = None
  sigma_s: np.ndarray | None = None
  pool3: np.ndarray | None = None
  num_images: int = 0

  def iter_images(self, batch_size: int = 256) -> Iterator[np.ndarray]:
    if not self.num_images:
      raise KeyError(f"{self.path}: no reference images ('arr_0')")
    return iter_npz_batches(self.path, "arr_0", batch_size)


def _check_stats(path, mu_key, mu, sigma_key, sigma):
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise ValueError(f"{path}: '{mu_key}' {mu.shape} and '{sigma_key}' {sigma.shape} are not "
                     "(D,) and (D, D)")


def load_reference_batch(path: str) -> ReferenceBatch:
  if not storage.exists(path):
    raise FileNotFoundError(f"reference batch not found: {path}")
  with storage.load_npz(path) as z:
    files = set(z.files)
    got = {k: np.asarray(z[k], np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s")
           if k in files}
    pool3 = np.asarray(z["pool3"], np.float32) if "pool3" in files else None
  for a, b in (("mu", "sigma"), ("mu_s", "sigma_s")):
    if (a in got) != (b in got):
      raise KeyError(f"{path}: has '{a if a in got else b}' without '{b if a in got else a}'")
    if a in got:
      _check_stats(path, a, got[a], b, got[b])
  num_images = 0
  if "arr_0" in files:
    shape, dtype = npz_array_shape(path, "arr_0")
    if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
      raise ValueError(f"{path}: 'arr_0' must be uint8 images (N,H,W,3), got {shape} {dtype}")
    num_images = shape[0]
  if "mu" not in got and pool3 is None and not num_images:
    raise KeyError(f"{path}: no 'mu'/'sigma', 'pool3' or 'arr_0' (has {sorted(files)})")
  return ReferenceBatch(path, got.get("mu"), got.get("sigma"), got.get("mu_s"),
                        got.get("sigma_s"), pool3, num_images)


def save_reference(path: str, stats: FeatureStats, pool3=None) -> None:
  """Write ADM-style `mu`/`sigma` (and optionally the `pool3` activations for precision/recall)."""
  arrays = {"mu": stats.mu, "sigma": stats.sigma}
  if pool3 is not None:
    arrays["pool3"] = np.asarray(pool3, np.float32)
  storage.write_file(path, lambda f: np.savez(f, **arrays))
