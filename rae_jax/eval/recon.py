"""Reconstruction metrics of an RAE: PSNR, SSIM and rFID over a validation set, sharded.

As the official `eval/ref_iqa.py`: both image sets are uint8 (reconstructions quantised like
saved samples) mapped to [0,1]; PSNR is per image (MSE clamped at 1e-10) then averaged; SSIM is
torchmetrics' default (11x11 Gaussian, sigma 1.5, k1 0.01, k2 0.03, data range 1), whose
reflect-pad-then-crop equals a 'valid' window, averaged over pixels and channels per image.
rFID is the FID between the Inception statistics of the originals and of the reconstructions.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rae_jax import progress
from rae_jax.eval import sample_shards
from rae_jax.eval import inception
from rae_jax.eval import metrics as metrics_lib
from rae_jax.eval import scoring
from rae_jax.train import mesh as mesh_lib

SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
_HIGHEST = jax.lax.Precision.HIGHEST


def psnr(a: jax.Array, b: jax.Array, data_range: float = 1.0) -> jax.Array:
  """Per-image PSNR (B,) of NHWC images in [0, data_range]."""
  mse = jnp.mean((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2, axis=(1, 2, 3))
  return 20.0 * jnp.log10(data_range / jnp.sqrt(jnp.maximum(mse, 1e-10)))


def gaussian_kernel1d(sigma: float = SSIM_SIGMA) -> np.ndarray:
  size = int(3.5 * sigma + 0.5) * 2 + 1  # torchmetrics: 11 for sigma 1.5
  d = np.arange((1 - size) / 2, (1 + size) / 2, 1.0)
  g = np.exp(-(d / sigma) ** 2 / 2)
  return (g / g.sum()).astype(np.float32)


def _blur_valid(x: jax.Array, k: np.ndarray) -> jax.Array:
  """Separable 'valid' Gaussian filter over H and W of (B,H,W,C) (channels independent)."""
  n = len(k)
  h, w = x.shape[1] - n + 1, x.shape[2] - n + 1
  if h <= 0 or w <= 0:
    raise ValueError(f"SSIM needs images of at least {n}x{n} pixels, got {x.shape[1:3]}")
  y = sum(float(k[i]) * x[:, i:i + h] for i in range(n))
  return sum(float(k[i]) * y[:, :, i:i + w] for i in range(n))


def ssim(a: jax.Array, b: jax.Array, data_range: float = 1.0,
         sigma: float = SSIM_SIGMA) -> jax.Array:
  """Per-image SSIM (B,) of NHWC images (torchmetrics `structural_similarity_index_measure`,
  reduction='none'; `a` is the prediction, `b` the target: SSIM is symmetric anyway)."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  k = gaussian_kernel1d(sigma)
  c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
  mu_a, mu_b = _blur_valid(a, k), _blur_valid(b, k)
  s_aa = _blur_valid(a * a, k) - mu_a ** 2
  s_bb = _blur_valid(b * b, k) - mu_b ** 2
  s_ab = _blur_valid(a * b, k) - mu_a * mu_b
  num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
  den = (mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2)
  return jnp.mean(num / den, axis=(1, 2, 3))


def make_reconstruct(rae, mesh):
  """Jitted uint8 originals -> (uint8 reconstructions (batch-sharded), PSNR, SSIM (replicated))."""
  def fn(rae_vars, images_u8):
    x = images_u8.astype(jnp.float32) / 255.0
    rec = sample_shards.images_to_uint8(jnp.clip(rae(rae_vars, x), 0.0, 1.0))
    r = rec.astype(jnp.float32) / 255.0
    return rec, psnr(r, x), ssim(r, x)
  rep = mesh_lib.replicated(mesh)
  return jax.jit(mesh_lib.traced_under(mesh, fn),
                 out_shardings=(mesh_lib.batch_sharding(mesh), rep, rep))


@functools.lru_cache(maxsize=4)
def _cached_reconstruct(rae, mesh):
  return make_reconstruct(rae, mesh)


def evaluate_reconstruction(rae, rae_vars: Any, reader: scoring.Reader, num_images: int,
                            scorer: scoring.Scorer) -> dict[str, Any]:
  """PSNR, SSIM, rFID of `rae` on images reader(0..num_images-1), batched like the scorer.

  One pass: each global batch is reconstructed and both it and the originals go through the
  Inception net on device, so no image set is ever held whole on the host."""
  recon = _cached_reconstruct(rae, scorer.mesh)
  keep = num_images < inception.POOL3_DIM  # small sets: exact low-rank FID (scoring.fid)
  psnrs, ssims = [], []
  stats = {k: metrics_lib.FeatureStats.empty(inception.POOL3_DIM) for k in ("ref", "rec")}
  kept = {"ref": [], "rec": []}
  bar = progress.bar(num_images, "eval_recon")
  for x, n in scorer.global_batches(reader, num_images):
    bar.update(n)
    images, p, s = recon(rae_vars, x)
    psnrs.append(np.asarray(p)[:n])
    ssims.append(np.asarray(s)[:n])
    for k, batch in (("ref", x), ("rec", images)):
      f = scorer.features(batch)[0][:n]
      stats[k] = stats[k].update(f)
      kept[k].append(f if keep else f[:0])
  bar.close()
  f_ref, f_rec = (scoring.Features(stats[k], np.concatenate(kept[k]), np.zeros((0, 0)))
                  for k in ("ref", "rec"))
  out = {"num_images": int(num_images),
         "psnr": float(np.mean(np.concatenate(psnrs), dtype=np.float64)),
         "ssim": float(np.mean(np.concatenate(ssims), dtype=np.float64)),
         "inception": scorer.label, "random_inception": bool(scorer.is_random)}
  if num_images >= 2:
    out["rfid"], out["rfid_method"] = scoring.fid(
        f_rec, f_ref.stats.mu, f_ref.stats.sigma, f_ref.pool3 if keep else None)
  return out

def default_num_images(requested: int, available: int) -> int:
  n = min(int(requested), int(available)) if requested > 0 else int(available)
  if n <= 0:
    raise ValueError(f"reconstruction eval: no images (eval.num_samples={requested}, "
                     f"validation source has {available})")
  return n


def recon_metrics_line(m: dict[str, Any], extra: Optional[str] = None) -> str:
  text = (f"{m['num_images']} images: PSNR {m['psnr']:.3f} dB, SSIM {m['ssim']:.4f}"
          + (f", rFID {m['rfid']:.4f}" if "rfid" in m else ""))
  if m.get("random_inception"):
    text = f"[{scoring.RANDOM_LABEL}] " + text
  return text + (f" ({extra})" if extra else "")
