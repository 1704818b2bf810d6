"""FID / IS / precision-recall against small independent numpy references; stats; npz I/O."""
import numpy as np
import pytest
import scipy.linalg
from conftest import rel_err

from rae_jax.eval import metrics


def _random_stats(rng, d, n=400):
  x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=d)
  return x.mean(0), np.cov(x, rowvar=False)


def _scipy_fid(mu1, s1, mu2, s2):
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean)


def test_frechet_distance_matches_scipy_and_eigen_form():
  rng = np.random.default_rng(0)
  mu1, s1 = _random_stats(rng, 48)
  mu2, s2 = _random_stats(rng, 48)
  fid = metrics.frechet_distance(mu1, s1, mu2, s2)
  assert rel_err(fid, _scipy_fid(mu1, s1, mu2, s2)) <= 1e-6
  # Independent form: tr sqrtm(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), all real and >= 0.
  w, v = np.linalg.eigh(s1)
  r1 = (v * np.sqrt(w)) @ v.T
  tr = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
  want = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr
  assert rel_err(fid, want) <= 1e-6
  assert fid > 0


def test_frechet_distance_zero_for_identical_stats():
  mu, s = _random_stats(np.random.default_rng(1), 32)
  fid = metrics.frechet_distance(mu, s, mu, s)
  assert abs(fid) <= 1e-8 * np.trace(s)
  # and it grows with a mean shift exactly by ||shift||^2
  assert metrics.frechet_distance(mu + 0.5, s, mu, s) == pytest.approx(32 * 0.25, rel=1e-6)


def test_frechet_distance_rejects_mismatched_shapes():
  mu, s = _random_stats(np.random.default_rng(2), 8)
  with pytest.raises(ValueError, match="mean vectors"):
    metrics.frechet_distance(mu, s, mu[:7], s[:7, :7])
  with pytest.raises(ValueError, match="covariances"):
    metrics.frechet_distance(mu, s, mu, s[:7, :7])


def test_streaming_stats_equal_numpy():
  rng = np.random.default_rng(3)
  # A large common offset: a naive sum-of-squares accumulator would lose digits here.
  feats = (rng.normal(size=(301, 16)) + 1e3).astype(np.float32)
  stats = metrics.FeatureStats.empty(16)
  for lo, hi in [(0, 1), (1, 64), (64, 200), (200, 201), (201, 301)]:
    stats = stats.update(feats[lo:hi])
  want_mu = np.mean(feats.astype(np.float64), axis=0)
  want_sigma = np.cov(feats.astype(np.float64), rowvar=False)
  assert stats.n == 301
  assert rel_err(stats.mu, want_mu) <= 1e-12
  assert rel_err(stats.sigma, want_sigma) <= 1e-10
  # Per-shard accumulators merged in any grouping give the same result.
  a = metrics.FeatureStats.from_features(feats[:150])
  b = metrics.FeatureStats.from_features(feats[150:])
  assert rel_err(b.merge(a).sigma, want_sigma) <= 1e-10
  assert abs(metrics.fid_from_features(feats, feats[::-1])) <= 1e-8 * np.trace(want_sigma)
  with pytest.raises(ValueError, match="at least 2"):
    _ = metrics.FeatureStats.from_features(feats[:1]).sigma


def _numpy_inception_score(logits, split_size):
  """ADM's formula, written plainly: softmax, then per chunk exp(mean KL(p(y|x) || p(y)))."""
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  scores = []
  for i in range(0, len(p), split_size):
    part = p[i:i + split_size]
    kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
    scores.append(np.exp(kl.sum(1).mean()))
  return np.mean(scores)


def test_inception_score_matches_numpy_reference():
  logits = np.random.default_rng(4).normal(size=(25, 30)) * 3
  got = metrics.inception_score(logits, split_size=10)  # splits of 10, 10, 5
  assert rel_err(got, _numpy_inception_score(logits, 10)) <= 1e-10
  assert metrics.inception_score(np.zeros((8, 5))) == pytest.approx(1.0)
  # Confident, evenly spread predictions over C classes: IS -> C.
  confident = np.eye(6)[np.arange(60) % 6] * 50.0
  assert metrics.inception_score(confident) == pytest.approx(6.0, rel=1e-6)


def _numpy_prec_recall(ref, smp, k):
  def sqd(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
  r_ref = np.sort(sqd(ref, ref), axis=1)[:, k]
  r_smp = np.sort(sqd(smp, smp), axis=1)[:, k]
  d = sqd(ref, smp)
  precision = np.mean(np.any(d <= r_ref[:, None], axis=0))
  recall = np.mean(np.any(d <= r_smp[None, :], axis=1))
  return precision, recall, r_ref


def test_precision_recall_matches_numpy_reference():
  rng = np.random.default_rng(5)
  ref = rng.normal(size=(61, 8))
  smp = rng.normal(size=(45, 8)) * 0.8 + 0.8  # partly overlapping distribution
  want_p, want_r, want_radii = _numpy_prec_recall(ref, smp, 3)
  radii = metrics.manifold_radii(ref, k=3, batch_size=16)  # several padded blocks
  assert rel_err(radii, want_radii) <= 1e-5
  p, r = metrics.precision_recall(ref, smp, k=3, batch_size=16)
  assert (p, r) == (pytest.approx(want_p), pytest.approx(want_r))
  assert 0 < p < 1 and 0 < r < 1
  assert metrics.precision_recall(ref, smp, k=3) == (p, r)  # one block, same answer
  assert metrics.precision_recall(ref, ref, k=3, batch_size=16) == (1.0, 1.0)
  with pytest.raises(ValueError, match="more than 3"):
    metrics.manifold_radii(ref[:3], k=3)


def test_reference_batch_io(tmp_path):
  rng = np.random.default_rng(6)
  images = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
  mu, sigma = _random_stats(rng, 4)
  path = str(tmp_path / "VIRTUAL_tiny.npz")
  np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:3], sigma_s=sigma[:3, :3])
  ref = metrics.load_reference_batch(path)
  assert ref.num_images == 5 and ref.pool3 is None
  np.testing.assert_array_equal(ref.mu, mu)
  np.testing.assert_array_equal(ref.sigma_s, sigma[:3, :3])
  np.testing.assert_array_equal(np.concatenate(list(ref.iter_images(2))), images)
  resumed = list(metrics.iter_npz_batches(path, "arr_0", batch_size=3, start=1))
  assert [len(b) for b in resumed] == [3, 1]
  np.testing.assert_array_equal(np.concatenate(resumed), images[1:])
  with pytest.raises(KeyError, match="no array 'arr_1'"):
    next(metrics.iter_npz_batches(path, "arr_1"))

  np.savez(path, mu=mu, arr_0=images)
  with pytest.raises(KeyError, match="'mu' without 'sigma'"):
    metrics.load_reference_batch(path)
  np.savez(path, mu=mu, sigma=sigma[:3])
  with pytest.raises(ValueError, match="'sigma'"):
    metrics.load_reference_batch(path)

  feats = rng.normal(size=(20, 4))
  out = str(tmp_path / "stats.npz")
  metrics.save_reference(out, metrics.FeatureStats.from_features(feats), pool3=feats)
  ref = metrics.load_reference_batch(out)
  assert rel_err(ref.sigma, np.cov(feats, rowvar=False)) <= 1e-12
  assert ref.pool3.shape == (20, 4) and ref.num_images == 0
