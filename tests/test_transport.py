"""Transport: reference shift/grid, time-distribution CDFs (KS), path identities, training loss."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import stats

from rae_jax.diffusion import samplers
from rae_jax.diffusion import transport as T

XL_SHIFT = math.sqrt(196608 / 4096)


def test_shift_and_ode_grid_match_reference(ref_dir):
  ref = np.load(ref_dir / "transport.npz")
  s = T.shift_for_dim(16 * 16 * 768, 4096)
  assert abs(s - float(ref["shift"])) <= 1e-6
  np.testing.assert_allclose(T.time_shift(ref["u"], s), ref["shifted"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(T.time_shift(jnp.asarray(ref["u"], jnp.float32), s), ref["shifted"],
                             rtol=0, atol=1e-6)
  grid = samplers.ode_time_grid(T.create_transport(time_dist_shift=s), 50)
  assert grid.shape == (50,) and grid[0] == 1.0
  np.testing.assert_allclose(grid, ref["ode_grid_50"], rtol=0, atol=1e-6)


def test_create_transport_rules_and_errors():
  t = T.create_transport("Linear", "velocity", train_eps=0.5, sample_eps=0.5)
  assert (t.train_eps, t.sample_eps) == (0.0, 0.0)  # velocity on Linear ignores eps, as reference
  assert t.check_interval() == (0.0, 0.999)
  t = T.create_transport("VP", "velocity")
  assert (t.train_eps, t.sample_eps) == (1e-5, 1e-3)
  assert t.check_interval(eval=True) == (0.0, 1 - 1e-3)
  t = T.create_transport("Linear", "noise")
  assert t.check_interval() == (1e-3, 1 - 1e-3)
  assert T.create_transport("Linear", "velocity").check_interval(sde=True, eval=True,
                                                                 last_step_size=0.04) == (0.0, 0.96)
  assert T.transport_from_config({"time_dist_type": "logit-normal_0_1"},
                                 latent_shape=(16, 16, 768)).time_dist_shift == XL_SHIFT
  with pytest.raises(ValueError, match="path_type"):
    T.create_transport("Cosine")
  with pytest.raises(ValueError, match="prediction"):
    T.create_transport(prediction="x0")
  with pytest.raises(ValueError, match="time_dist_type"):
    T.create_transport(time_dist_type="logit-normal_0")
  with pytest.raises(ValueError, match="std must be positive"):
    T.create_transport(time_dist_type="logit-normal_0_0")
  with pytest.raises(ValueError, match="time_dist_shift"):
    T.create_transport(time_dist_shift=0.5)
  with pytest.raises(ValueError, match="diffusion_form"):
    T.LinearPath().diffusion(jnp.ones((1, 1)), jnp.ones((1, 1)), "cosine")


# -- time distributions ---------------------------------------------------------------------------


def _base_cdf(kind, u, t0, t1):
  """Independent (scipy) CDF of the unshifted train-time distribution on [t0, t1]."""
  u = np.clip(u, t0, t1)
  if kind == "uniform":
    return (u - t0) / (t1 - t0)
  _, mu, sigma = kind.split("_")
  norm = stats.norm(float(mu), float(sigma))
  lo = norm.cdf(-np.inf if t0 == 0 else np.log(t0 / (1 - t0)))
  hi = norm.cdf(np.log(t1 / (1 - t1)))
  with np.errstate(divide="ignore"):
    z = np.log(u) - np.log1p(-u)
  return (norm.cdf(z) - lo) / (hi - lo)


def _shifted_cdf(kind, shift, t0, t1):
  # t' = s t / (1 + (s - 1) t)  <=>  t = t' / (s - (s - 1) t')
  return lambda tp: _base_cdf(kind, tp / (shift - (shift - 1) * tp), t0, t1)


@pytest.mark.parametrize("kind,shift", [("uniform", 1.0), ("uniform", XL_SHIFT),
                                        ("logit-normal_0_1", 1.0),
                                        ("logit-normal_0_1", XL_SHIFT),
                                        ("logit-normal_0.5_0.7", 2.0)])
def test_time_distribution_ks(kind, shift):
  tr = T.create_transport(time_dist_type=kind, time_dist_shift=shift)
  t0, t1 = tr.check_interval()
  draws = np.asarray(jax.jit(tr.sample_time, static_argnums=1)(jax.random.key(7), 100_000))
  assert draws.dtype == np.float32 and draws.min() >= 0 and draws.max() <= 1
  assert stats.kstest(draws, _shifted_cdf(kind, shift, t0, t1)).pvalue > 1e-3
  if shift > 1:  # the test has power: the same draws reject the unshifted law
    assert stats.kstest(draws, _shifted_cdf(kind, 1.0, t0, t1)).pvalue < 1e-6


# -- paths ------------------------------------------------------------------------------------


PATHS = [T.LinearPath(), T.GVPPath(), T.VPPath()]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
def test_path_derivatives_and_conversions(path):
  t = jnp.linspace(0.05, 0.95, 19)
  h = 1e-3
  for fn in (path.alpha, path.sigma):  # d_alpha, d_sigma agree with central differences
    num = (fn(t + h)[0] - fn(t - h)[0]) / (2 * h)
    np.testing.assert_allclose(fn(t)[1], num, rtol=2e-3, atol=2e-3)
  np.testing.assert_allclose(path.d_alpha_alpha_ratio(t), path.alpha(t)[1] / path.alpha(t)[0],
                             rtol=1e-4)
  if isinstance(path, (T.GVPPath, T.VPPath)):  # variance preserving
    np.testing.assert_allclose(path.alpha(t)[0] ** 2 + path.sigma(t)[0] ** 2, 1.0, atol=1e-5)
  kd, kn = jax.random.split(jax.random.key(0))
  d = jax.random.normal(kd, (19, 3))
  n = jax.random.normal(kn, (19, 3))
  te = T.expand_t(t, d)
  x_t, u_t = path.plan(te, n, d)
  np.testing.assert_allclose(x_t, path.alpha(te)[0] * d + path.sigma(te)[0] * n, atol=1e-6)
  # The per-sample velocity determines noise and score (x_t given): the reference's conversions.
  np.testing.assert_allclose(path.noise_from_velocity(u_t, x_t, te), n, rtol=1e-3, atol=1e-3)
  score = path.score_from_velocity(u_t, x_t, te)
  np.testing.assert_allclose(score, -n / path.sigma(te)[0], rtol=1e-3, atol=1e-3)
  if not isinstance(path, T.VPPath):  # VP keeps SiT's unflipped drift (reference quirk)
    np.testing.assert_allclose(path.velocity_from_score(score, x_t, te), u_t, rtol=1e-3,
                               atol=1e-3)


def test_linear_path_convention():
  """RAE's ICPlan: x_t = (1 - t) x_data + t x_noise, target u_t = x_noise - x_data."""
  d, n = jnp.full((2, 1), 3.0), jnp.full((2, 1), -1.0)
  x_t, u_t = T.LinearPath().plan(jnp.array([[0.25], [1.0]]), n, d)
  np.testing.assert_allclose(x_t[:, 0], [0.75 * 3 - 0.25, -1.0])
  np.testing.assert_allclose(u_t[:, 0], [-4.0, -4.0])


# -- training loss ------------------------------------------------------------------------------


def _coeffs(path_type, t):
  if path_type == "Linear":
    return 1 - t, -np.ones_like(t), t, np.ones_like(t)
  a, s = np.cos(t * np.pi / 2), np.sin(t * np.pi / 2)
  return a, -np.pi / 2 * s, s, np.pi / 2 * a


@pytest.mark.parametrize("path_type,prediction", [("Linear", "velocity"), ("GVP", "velocity"),
                                                  ("Linear", "noise"), ("Linear", "score")])
def test_training_loss_gaussian_oracle(path_type, prediction):
  """Data ~ N(0, s2 I): the Bayes-optimal prediction is linear in x_t, so the expected per-example
  loss of the oracle equals the known conditional variance at that t (written here independently
  of the library), and a wrong-sign oracle is far worse."""
  s2, b, dim = 0.5, 2048, 64
  tr = T.create_transport(path_type, prediction, time_dist_type="logit-normal_0_1",
                          time_dist_shift=2.0)
  seen_t = []

  def oracle(params, x, t):
    seen_t.append(np.asarray(t))
    a, da, s, ds = (c[:, None] for c in _coeffs(path_type, np.asarray(t, np.float64)))
    var = a ** 2 * s2 + s ** 2
    if prediction == "velocity":
      return params * jnp.asarray((da * a * s2 + ds * s) / var, jnp.float32) * x
    e_noise = jnp.asarray(s / var, jnp.float32) * x
    if prediction == "noise":
      return params * e_noise
    return params * -e_noise / jnp.asarray(s, jnp.float32)

  x = jnp.sqrt(s2) * jax.random.normal(jax.random.key(1), (b, dim))
  loss = np.asarray(tr.training_loss(1.0, oracle, x, jax.random.key(2)))
  assert loss.shape == (b,)
  a, da, s, ds = _coeffs(path_type, seen_t[0].astype(np.float64))
  var = a ** 2 * s2 + s ** 2
  if prediction == "velocity":
    expected = da ** 2 * s2 + ds ** 2 - (da * a * s2 + ds * s) ** 2 / var
  else:  # noise, and score with unit weight: E (out * sigma + noise)^2 = Var(noise | x_t)
    expected = 1 - s ** 2 / var
  # each loss is a mean of 64 squared Gaussians: per-example relative sd sqrt(2/64); the batch
  # mean of the difference therefore has sd ~ 0.18 * mean(expected) / sqrt(2048) ~ 0.004 rel.
  assert abs(loss.mean() - expected.mean()) < 0.03 * expected.mean()
  worse = np.asarray(tr.training_loss(-1.0, oracle, x, jax.random.key(2)))
  assert worse.mean() > 1.2 * loss.mean()


def test_training_loss_jit_grad_sharded_and_errors():
  tr = T.create_transport(time_dist_type="logit-normal_0_1", time_dist_shift=XL_SHIFT)
  apply_fn = lambda w, x, t, scale=1.0: scale * (x @ w) * (1 + t[:, None, None, None])
  w = jnp.eye(4) * 0.5
  x = jax.random.normal(jax.random.key(0), (16, 2, 2, 4))
  key = jax.random.key(3)
  f = jax.jit(lambda w, x, key: tr.training_loss(w, apply_fn, x, key, scale=2.0).mean())
  g = jax.grad(f)(w, x, key)
  assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0
  loss = jax.jit(lambda w, x, k: tr.training_loss(w, apply_fn, x, k))
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  np.testing.assert_allclose(loss(w, xs, key), loss(w, x, key), rtol=1e-6, atol=1e-6)
  assert not np.allclose(loss(w, x, key), loss(w, x, jax.random.key(4)))
  with pytest.raises(ValueError, match="model output shape"):
    tr.training_loss(w, lambda w, x, t: x[..., :2], x, key)


def test_likelihood_weight_is_positive():
  """The reference's likelihood weight is negative on Linear (sign of its D); ours is |D|/sigma^2."""
  tr = T.create_transport("Linear", "noise", loss_weight="likelihood")
  x = jax.random.normal(jax.random.key(0), (64, 8))
  loss = tr.training_loss(None, lambda p, x, t: jnp.zeros_like(x), x, jax.random.key(1))
  assert (np.asarray(loss) > 0).all()
