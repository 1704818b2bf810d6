"""Samplers: reference DiTDH ODE runs, a Gaussian-mixture toy with exact velocity, guidance binding,
trajectories, sharded batches and per-example SDE keys."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file

from conftest import FIXTURES, rel_err
from rae_jax.diffusion import samplers as S
from rae_jax.diffusion import transport as T

# -- 2-D Gaussian mixture with its exact flow-matching velocity ----------------------------------

PI = np.array([0.5, 0.3, 0.2])
MU = np.array([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]])
CHOL = np.array([[[0.6, 0.0], [0.3, 0.4]], [[0.3, 0.0], [-0.2, 0.5]], [[0.5, 0.0], [0.0, 0.25]]])
COV = CHOL @ CHOL.transpose(0, 2, 1)
N_SAMPLES = 8000


def gmm_posterior(x, t):
  """Per component k: x_t | k ~ N((1-t) mu_k, (1-t)^2 C_k + t^2 I) on the Linear path, so
  E[noise - data | x_t, k] is linear in x_t; the velocity is its responsibility-weighted mean.
  Returns (velocity, responsibilities (K, B)). 2x2 inverses by hand (fast on CPU)."""
  a, s = (1 - t)[:, None], t[:, None]

  def component(mu, cov):
    sm = a[:, :, None] ** 2 * cov + (s ** 2)[:, :, None] * jnp.eye(2)
    det = sm[:, 0, 0] * sm[:, 1, 1] - sm[:, 0, 1] * sm[:, 1, 0]
    inv = jnp.stack([jnp.stack([sm[:, 1, 1], -sm[:, 0, 1]], -1),
                     jnp.stack([-sm[:, 1, 0], sm[:, 0, 0]], -1)], -2) / det[:, None, None]
    r = x - a * mu
    ir = jnp.einsum("bij,bj->bi", inv, r)
    e_data = mu + a * jnp.einsum("ij,bj->bi", cov, ir)
    e_noise = s * ir
    return e_noise - e_data, -0.5 * jnp.einsum("bi,bi->b", r, ir) - 0.5 * jnp.log(det)

  vs, logp = jax.vmap(component)(jnp.asarray(MU, jnp.float32), jnp.asarray(COV, jnp.float32))
  w = jax.nn.softmax(logp + jnp.log(jnp.asarray(PI, jnp.float32))[:, None], axis=0)
  return jnp.sum(w[:, :, None] * vs, 0), w


def gmm_velocity(x, t):
  return gmm_posterior(x, t)[0]


def target_stats():
  mean = PI @ MU
  cov = sum(PI[k] * (COV[k] + np.outer(MU[k], MU[k])) for k in range(3)) - np.outer(mean, mean)
  rng = np.random.default_rng(0)
  k = rng.choice(3, size=200_000, p=PI)
  exact = MU[k] + np.einsum("nij,nj->ni", CHOL[k], rng.standard_normal((200_000, 2)))
  c = exact - mean
  se_mean = np.sqrt(np.diag(cov) / N_SAMPLES)
  se_cov = (c[:, :, None] * c[:, None, :]).std(0) / np.sqrt(N_SAMPLES)
  return mean, cov, se_mean, se_cov


def assert_reaches_gmm(samples):
  """Mean, covariance and mixture weights of N_SAMPLES draws vs the exact mixture.

  Tolerance = 5 Monte-Carlo standard errors of the statistic for exact samples (se_mean <= 0.02,
  se_cov <= 0.03 at N = 8000; 5 se makes a false alarm ~1e-6 for any seed) plus a discretisation
  allowance: 200 Euler steps move single samples by ~0.03 RMS from the exact ODE solution (the
  pathwise test below checks that), which can bias the moments by about as much; we allow 0.04
  on means and 0.06 on covariances (covariance entries are 1-3). Mixture weights: the average
  posterior responsibility of exact samples is unbiased for pi with sd <= 0.5/sqrt(N) = 0.006.
  """
  samples = np.asarray(samples, np.float64)
  assert np.isfinite(samples).all()
  mean, cov, se_mean, se_cov = target_stats()
  np.testing.assert_array_less(np.abs(samples.mean(0) - mean), 5 * se_mean + 0.04)
  np.testing.assert_array_less(np.abs(np.cov(samples.T) - cov), 5 * se_cov + 0.06)
  resp = gmm_posterior(jnp.asarray(samples, jnp.float32), jnp.zeros(len(samples)) + 1e-4)[1]
  np.testing.assert_array_less(np.abs(np.asarray(resp).mean(1) - PI), 0.04)


@pytest.fixture(scope="module")
def noise():
  return jax.random.normal(jax.random.key(0), (N_SAMPLES, 2))


@pytest.mark.parametrize("method", ["euler", "heun2"])
def test_ode_reaches_gmm(noise, method):
  tr = T.create_transport(time_dist_shift=2.0)
  run = jax.jit(lambda x: S.sample_ode(tr, gmm_velocity, x, sampling_method=method,
                                       num_steps=200))
  assert_reaches_gmm(run(noise))


def test_ode_orders_against_dopri5_and_reverse(noise):
  """Pathwise: dopri5 (adaptive) is the exact-flow reference; Heun (2nd order) is ~100x closer
  to it than Euler with 200 steps; the reverse ODE maps the samples back to their noise."""
  tr = T.create_transport(time_dist_shift=2.0)
  x = noise[:1000]
  ref = jax.jit(lambda x: S.sample_ode(tr, gmm_velocity, x, sampling_method="dopri5",
                                       num_steps=2, rtol=1e-5, atol=1e-6))(x)
  rms = lambda a: float(jnp.sqrt(jnp.mean((a - ref) ** 2)))
  err = {m: rms(jax.jit(lambda x: S.sample_ode(tr, gmm_velocity, x, sampling_method=m,
                                               num_steps=200))(x)) for m in ("euler", "heun2")}
  assert err["heun2"] < 2e-3 and err["euler"] < 0.06 and err["heun2"] < err["euler"] / 20
  back = jax.jit(lambda x: S.sample_ode(tr, gmm_velocity, x, sampling_method="dopri5",
                                        num_steps=2, rtol=1e-5, atol=1e-6, reverse=True))(ref)
  assert float(jnp.sqrt(jnp.mean((back - x) ** 2))) < 1e-2


@pytest.mark.parametrize("method,form,last_step", [("euler", "sigma", "Mean"),
                                                   ("heun", "decreasing", "Tweedie"),
                                                   ("euler", "linear", "Euler")])
def test_sde_reaches_gmm(noise, method, form, last_step):
  tr = T.create_transport(time_dist_shift=1.0)
  run = jax.jit(lambda x, k: S.sample_sde(tr, gmm_velocity, x, k, sampling_method=method,
                                          diffusion_form=form, last_step=last_step,
                                          num_steps=200))
  assert_reaches_gmm(run(noise, jax.random.key(5)))


# -- reference DiTDH runs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ditdh():
  from rae_jax.interop.ditdh_names import ditdh_from_torch
  from rae_jax.models.ditdh import DiTDH
  ref_dir = FIXTURES / "reference"
  cfg = json.loads((ref_dir / "ditdh_tiny.json").read_text())["config"]
  params = ditdh_from_torch(load_file(ref_dir / "ditdh_tiny.weights.safetensors"), cfg)
  model = DiTDH(**cfg)
  apply_fn = lambda p, x, t, y: model.apply({"params": p}, x, t, y)
  return apply_fn, params, dict(np.load(ref_dir / "ditdh_tiny.io.npz"))


def _sampler(tr, apply_fn, *, mode="ODE", guidance=None, scale=1.0, null_class=None,
             **sampler_kwargs):
  """The production path (pipeline/image_generator.py): make_model_fn -> sampling.sample, jitted."""
  @jax.jit
  def sample(params, x, y, key=None, guide_params=None):
    model_fn = S.make_model_fn(apply_fn, params, y, guidance=guidance, scale=scale,
                               null_class=null_class, guide_params=guide_params)
    return S.sample(tr, model_fn, x, mode=mode, key=key, **sampler_kwargs)
  return sample


def test_method_names_map_to_steps_and_unknown_names_fail():
  assert set(S.SDE_METHODS) == set(S.SDE_STEPS) and set(S.ODE_STEPS) < set(S.ODE_METHODS)
  tr = T.create_transport(time_dist_shift=2.0)
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="sampling_method 'milstein' unknown"):
    S.sample(tr, linear_field, x, mode="SDE", key=jax.random.key(0), sampling_method="milstein")
  with pytest.raises(ValueError, match="sampler mode 'DDIM' unknown"):
    S.sample(tr, linear_field, x, mode="DDIM")


@pytest.mark.parametrize("method", ["euler", "heun2"])
def test_ode_matches_reference_ditdh(tiny_ditdh, method):
  apply_fn, params, io = tiny_ditdh
  tr = T.create_transport("Linear", "velocity", time_dist_type="uniform", time_dist_shift=2.0)
  sample = _sampler(tr, apply_fn, sampling_method=method, num_steps=8)
  noise = io["ode_noise"].transpose(0, 2, 3, 1)  # NCHW at the boundary
  out = np.asarray(sample(params, noise, io["ode_y"].astype(np.int32)))
  err = rel_err(out.transpose(0, 3, 1, 2), io[f"ode_{method}_8"])
  assert err <= 1e-4, err


def test_guidance_scale_one_is_plain_sampling(tiny_ditdh):
  apply_fn, params, io = tiny_ditdh
  tr = T.create_transport(time_dist_shift=2.0)
  noise = io["ode_noise"].transpose(0, 2, 3, 1)
  y = io["ode_y"].astype(np.int32)
  plain = np.asarray(_sampler(tr, apply_fn, sampling_method="euler", num_steps=4)(
      params, noise, y))
  cfg = _sampler(tr, apply_fn, guidance="cfg", scale=1.0, null_class=10,
                 sampling_method="euler", num_steps=4)
  auto = _sampler(tr, apply_fn, guidance="autoguidance", scale=1.0,
                  sampling_method="euler", num_steps=4)
  np.testing.assert_array_equal(np.asarray(cfg(params, noise, y)), plain)
  np.testing.assert_array_equal(np.asarray(auto(params, noise, y, guide_params=params)), plain)


def labeled_toy(params, x, t, y):
  """A label-conditional toy 'velocity' that records the batch sizes it is called with."""
  labeled_toy.batches.append(x.shape[0])
  return params[y][:, None] * x + t[:, None]


def test_guidance_binding_interval_and_forward_count():
  labeled_toy.batches = []
  w = jnp.array([1.0, 2.0, -3.0, 0.5])  # label 3 is the null class
  g = jnp.array([0.7, 1.5, -1.0, 0.1])  # a weaker guide
  x = jax.random.normal(jax.random.key(0), (4, 2))
  y = jnp.array([0, 1, 2, 0])
  t = jnp.array([0.05, 0.3, 0.6, 0.95])
  cond = labeled_toy(w, x, t, y)
  null = labeled_toy(w, x, t, jnp.full_like(y, 3))
  inside = ((t >= 0.2) & (t <= 0.7))[:, None]
  labeled_toy.batches = []
  plain = S.make_model_fn(labeled_toy, w, y, guidance="cfg", scale=1.0, null_class=3)(x, t)
  assert labeled_toy.batches == [4]  # scale 1: one forward, no doubled batch
  np.testing.assert_array_equal(plain, cond)
  labeled_toy.batches = []
  cfg = S.make_model_fn(labeled_toy, w, y, guidance="cfg", scale=3.0, interval=(0.2, 0.7),
                        null_class=3)(x, t)
  assert labeled_toy.batches == [8]  # [cond; null] in one forward
  np.testing.assert_array_equal(np.where(inside, 0, cfg), np.where(inside, 0, cond))
  np.testing.assert_allclose(cfg, np.where(inside, null + 3.0 * (cond - null), cond), rtol=1e-6)
  guide = labeled_toy(g, x, t, y)
  ag = S.make_model_fn(labeled_toy, w, y, guidance="autoguidance", scale=1.42,
                       interval=(0.2, 0.7), guide_params=g)(x, t)
  np.testing.assert_array_equal(np.where(inside, 0, ag), np.where(inside, 0, cond))
  np.testing.assert_allclose(ag, np.where(inside, guide + 1.42 * (cond - guide), cond), rtol=1e-6)
  with pytest.raises(ValueError, match="null_class"):
    S.make_model_fn(labeled_toy, w, y, guidance="cfg", scale=2.0)
  with pytest.raises(ValueError, match="guide_params"):
    S.make_model_fn(labeled_toy, w, y, guidance="autoguidance", scale=2.0)
  with pytest.raises(ValueError, match="guidance"):
    S.make_model_fn(labeled_toy, w, y, guidance="pag", scale=2.0)


# -- loop mechanics (a cheap linear field: these tests are about the loops, not the maths) -------


def linear_field(x, t):
  return -x * (1 + t[:, None]) + 0.5


def test_trajectory_sharding_and_one_compiled_loop():
  tr = T.create_transport(time_dist_shift=2.0)
  x = jax.random.normal(jax.random.key(1), (64, 2))
  calls = []

  def counted(x, t):
    calls.append(1)  # Python-side: counts traces, not steps
    return linear_field(x, t)

  end = jax.jit(lambda x: S.sample_ode(tr, counted, x, sampling_method="heun2", num_steps=50))
  traj = jax.jit(lambda x: S.sample_ode(tr, counted, x, sampling_method="heun2", num_steps=50,
                                        return_trajectory=True))
  out = end(x)
  assert len(calls) == 2  # two evaluation sites traced once: the loop is a scan, not unrolled
  path = traj(x)
  assert path.shape == (50, 64, 2)
  np.testing.assert_array_equal(path[0], x)
  np.testing.assert_allclose(path[-1], out, rtol=1e-6, atol=1e-6)
  sde_traj = S.sample_sde(tr, linear_field, x, jax.random.key(0), num_steps=10,
                          diffusion_form="sigma", return_trajectory=True)
  assert sde_traj.shape == (10, 64, 2)  # the reference's list: 9 steps + the last step

  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  xs = jax.device_put(x, sharding)
  out_sharded = end(xs)
  np.testing.assert_allclose(out_sharded, out, rtol=1e-5, atol=1e-6)
  assert out_sharded.sharding.is_equivalent_to(sharding, 2)
  sde = jax.jit(lambda x, k: S.sample_sde(tr, linear_field, x, k, num_steps=20,
                                          diffusion_form="sigma", last_step_at_grid_end=True))
  np.testing.assert_allclose(sde(xs, jax.random.key(2)), sde(x, jax.random.key(2)), rtol=1e-5,
                             atol=1e-5)


def test_sde_per_example_keys_and_last_step_options():
  tr = T.create_transport(time_dist_shift=1.0)
  x = jax.random.normal(jax.random.key(1), (6, 2))
  keys = jax.random.split(jax.random.key(9), 6)
  run = lambda x, k, **kw: S.sample_sde(tr, linear_field, x, k, num_steps=30,
                                        diffusion_form="sigma", **kw)
  full = run(x, keys)
  np.testing.assert_allclose(run(x[:2], keys[:2]), full[:2], rtol=1e-6, atol=1e-6)
  assert not np.allclose(run(x, jax.random.key(9)), full)  # a single key is a different stream
  # shift 1: the grid ends at last_step_size, so both last-step placements agree
  np.testing.assert_allclose(run(x, keys, last_step_at_grid_end=True), full, rtol=1e-5, atol=1e-6)
  tr2 = T.create_transport(time_dist_shift=3.0)
  run2 = lambda **kw: S.sample_sde(tr2, linear_field, x, keys, num_steps=30,
                                   diffusion_form="sigma", **kw)
  assert not np.allclose(run2(last_step_at_grid_end=True), run2())
  none = run(x, keys, last_step=None, sampling_method="euler")
  assert np.isfinite(np.asarray(none)).all()
  with pytest.raises(ValueError, match="leading size"):
    run(x, keys[:3])
  with pytest.raises(ValueError, match="last_step"):
    run(x, keys, last_step="Median")
  with pytest.raises(ValueError, match="sampling_method"):
    run(x, keys, sampling_method="rk4")
  with pytest.raises(ValueError, match="sampling_method"):
    S.sample_ode(tr, linear_field, x, sampling_method="rk4")
  with pytest.raises(ValueError, match="num_steps"):
    S.sample_ode(tr, linear_field, x, sampling_method="euler", num_steps=1)


def test_dopri5_budget_exhausted_gives_nan():
  tr = T.create_transport(time_dist_shift=2.0)
  x = jax.random.normal(jax.random.key(1), (16, 2))
  out = S.sample_ode(tr, linear_field, x, sampling_method="dopri5", num_steps=3, max_steps=2)
  assert np.isnan(np.asarray(out)).all()
  ok = S.sample_ode(tr, linear_field, x, sampling_method="dopri5", num_steps=3)
  assert np.isfinite(np.asarray(ok)).all()
