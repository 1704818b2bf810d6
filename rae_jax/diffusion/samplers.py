"""ODE / SDE samplers for a `Transport`, each a single traced loop (lax.scan / while_loop).

A sampler takes `model_fn(x, t) -> model output` (t a (B,) float32 array; velocity for the RAE
default), so labels and guidance are bound outside (`make_model_fn`). The functions are pure and
trace into whatever `jax.jit` encloses them (the caller passes parameters as arguments, never baked
in as constants); `sample` picks ODE or SDE from the config's mode, the one path generation and the
tests take. Batches may be sharded: every per-step operation is elementwise or a global reduction,
so GSPMD keeps the input sharding.

A method name maps to its step in `ODE_STEPS` / `SDE_STEPS` (dopri5, adaptive, is its own loop);
a name in neither fails naming the known ones. A new fixed-grid method is one step function and
one entry.

Time grids follow the reference exactly: 1 - linspace(t0, t1, num_steps) pushed through the shift,
i.e. from t = 1 (noise) to shift(1/1000) for the velocity ODE.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rae_jax.diffusion.transport import Transport, expand_t, time_shift

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
LAST_STEPS = ("Mean", "Tweedie", "Euler", None)


def _times(t, x) -> jax.Array:
  return jnp.full((x.shape[0],), t, jnp.float32)


def _grid(t0: float, t1: float, num_steps: int, shift: float) -> np.ndarray:
  if num_steps < 2:
    raise ValueError(f"num_steps must be >= 2, got {num_steps}")
  u = 1 - np.linspace(t0, t1, num_steps, dtype=np.float64)
  return time_shift(u, shift).astype(np.float32)


def ode_time_grid(transport: Transport, num_steps: int, *, reverse: bool = False) -> np.ndarray:
  """The num_steps model times of the reference ODE sampler (decreasing; increasing if reverse)."""
  t0, t1 = transport.check_interval(sde=False, eval=True)
  grid = _grid(t0, t1, num_steps, transport.time_dist_shift)
  return grid[::-1].copy() if reverse else grid


def sde_time_grid(transport: Transport, num_steps: int, *, diffusion_form: str = "SBDM",
                  last_step_size: float = 0.04) -> tuple[np.ndarray, float]:
  """(grid of the num_steps - 1 stochastic steps, model time of the reference's last step)."""
  t0, t1 = transport.check_interval(sde=True, eval=True, diffusion_form=diffusion_form,
                                    last_step_size=last_step_size)
  return _grid(t0, t1, num_steps, transport.time_dist_shift), 1 - t1


# ----------------------------------------------------------------------------------------------
# ODE.


def _scan_grid(step, x, grid, return_trajectory):
  def body(x, tt):
    x = step(x, tt[0], tt[1])
    return x, (x if return_trajectory else None)

  grid = jnp.asarray(grid)
  x_end, xs = jax.lax.scan(body, x, (grid[:-1], grid[1:]))
  if return_trajectory:
    return jnp.concatenate([x[None], xs], axis=0)
  return x_end


# Dormand-Prince 5(4) tableau (the standard coefficients, as in torchdiffeq's dopri5).
_DP_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_E = (35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
         -2187 / 6784 + 12231 / 42400, 11 / 84 - 649 / 6300, -1 / 60)


def _rms(x):
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def _lincomb(coeffs, ks):
  terms = [c * k for c, k in zip(coeffs, ks) if c != 0]
  out = terms[0]
  for t in terms[1:]:
    out = out + t
  return out


def _dopri5(f, x, grid, *, atol, rtol, max_steps, return_trajectory):
  """Adaptive Dormand-Prince through the grid points (steps are clipped to land on each point
  exactly, so no dense-output interpolation). Controller and first-step rule as torchdiffeq:
  RMS error norm over the whole batch, safety 0.9, factors in [0.2, 10], Hairer's initial step.
  If max_steps is exhausted the result is NaN rather than silently wrong."""
  d = 1.0 if grid[-1] > grid[0] else -1.0
  grid = jnp.asarray(grid, jnp.float32)
  t_start = grid[0]
  f0 = f(x, t_start)

  # Hairer, Norsett & Wanner, Sec. II.4.
  scale = atol + jnp.abs(x) * rtol
  d0, d1 = _rms(x / scale), _rms(f0 / scale)
  h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
  f1 = f(x + d * h0 * f0, t_start + d * h0)
  d2 = _rms((f1 - f0) / scale) / h0
  h1 = jnp.where((d1 <= 1e-15) & (d2 <= 1e-15), jnp.maximum(1e-6, h0 * 1e-3),
                 (0.01 / jnp.maximum(d1, d2)) ** (1 / 5))
  h = jnp.minimum(100 * h0, h1)

  def step(x, fx, t, dt, t_new):
    ks = [fx]
    for c, a in zip(_DP_C, _DP_A):
      xi = x + dt * _lincomb(a, ks)
      ks.append(f(xi, t_new if c == 1.0 else t + c * dt))
    return xi, ks[-1], dt * _lincomb(_DP_E, ks)

  def to_point(carry, t_end):
    def cond(s):
      t, _, _, _, n = s
      return (d * (t_end - t) > 0) & (n < max_steps)

    def body(s):
      t, x, fx, h, n = s
      remaining = d * (t_end - t)
      last = h >= remaining
      h_use = jnp.minimum(h, remaining)
      t_new = jnp.where(last, t_end, t + d * h_use)
      x_new, f_new, err = step(x, fx, t, d * h_use, t_new)
      tol = atol + rtol * jnp.maximum(jnp.abs(x), jnp.abs(x_new))
      ratio = _rms(err / tol)
      accept = ratio <= 1
      factor = jnp.clip(0.9 * ratio ** (-1 / 5), jnp.where(accept, 1.0, 0.2), 10.0)
      factor = jnp.where(ratio == 0, 10.0, factor)
      return (jnp.where(accept, t_new, t), jnp.where(accept, x_new, x),
              jnp.where(accept, f_new, fx), h_use * factor, n + 1)

    t, x, fx, h, n = jax.lax.while_loop(cond, body, carry)
    x_out = jnp.where(d * (t_end - t) > 0, jnp.nan, x)
    return (t, x, fx, h, n), (x_out if return_trajectory else None)

  init = (t_start, x, f0, h.astype(jnp.float32), jnp.zeros((), jnp.int32))
  (t, x_end, _, _, _), xs = jax.lax.scan(to_point, init, grid[1:])
  if return_trajectory:
    return jnp.concatenate([x[None], xs], axis=0)
  return jnp.where(d * (grid[-1] - t) > 0, jnp.nan, x_end)


def _ode_euler(velocity, x, t0, t1):
  return x + (t1 - t0) * velocity(x, t0)


def _ode_heun2(velocity, x, t0, t1):
  dt = t1 - t0
  k1 = velocity(x, t0)
  k2 = velocity(x + dt * k1, t1)
  return x + dt * (0.5 * k1 + 0.5 * k2)


# Fixed-grid ODE steps: step(velocity, x, t0, t1) -> x at t1 (torchdiffeq's names).
ODE_STEPS = {"euler": _ode_euler, "heun2": _ode_heun2}
ODE_ALIASES = {"heun": "heun2"}
ODE_METHODS = tuple(ODE_STEPS) + ("dopri5",)


def sample_ode(transport: Transport, model_fn: ModelFn, x: jax.Array, *,
               sampling_method: str = "dopri5", num_steps: int = 50, atol: float = 1e-6,
               rtol: float = 1e-3, reverse: bool = False, return_trajectory: bool = False,
               max_steps: int = 10_000) -> jax.Array:
  """Integrate the probability-flow ODE from noise x (t = 1) to data, as `Sampler.sample_ode`.

  euler / heun2 step exactly on the shifted grid (torchdiffeq's fixed-grid solvers); dopri5 is
  adaptive (atol, rtol) and stops at each grid point. reverse=True integrates data -> noise on the
  same grid in reverse order (the reference's reverse flag trips its own assert). Returns the end
  point, or with return_trajectory the (num_steps, *x.shape) values at the grid points (first =
  x), like odeint.
  """
  method = ODE_ALIASES.get(sampling_method.lower(), sampling_method.lower())
  if method not in ODE_METHODS:
    raise ValueError(f"sampling_method {sampling_method!r} unknown; expected one of {ODE_METHODS}")
  grid = ode_time_grid(transport, num_steps, reverse=reverse)

  def velocity(x, t):
    tb = _times(t, x)
    return transport.velocity(model_fn(x, tb), x, tb)

  if method == "dopri5":
    return _dopri5(velocity, x, grid, atol=atol, rtol=rtol, max_steps=max_steps,
                   return_trajectory=return_trajectory)
  step = ODE_STEPS[method]
  return _scan_grid(lambda x, t0, t1: step(velocity, x, t0, t1), x, grid, return_trajectory)


# ----------------------------------------------------------------------------------------------
# SDE.


def _is_batched_key(key, batch: int) -> bool:
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    batched = key.ndim == 1
  else:
    batched = key.ndim == 2
  if batched and key.shape[0] != batch:
    raise ValueError(f"per-example keys have leading size {key.shape[0]}, batch is {batch}")
  return batched


def _noise(key, i, x, batched):
  """Step-i Gaussian noise. Per-example keys make each sample's noise independent of the batch
  it is drawn in (same images on 1 or 256 devices)."""
  if batched:
    keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(key)
    return jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(keys)
  return jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)


def _sde_euler(terms, diffusion, x, dw, t_cur, t_next, h):
  """Euler-Maruyama."""
  del diffusion, t_next
  _, drift, diff = terms(x, t_cur)
  return x - drift * h + jnp.sqrt(2 * diff) * dw


def _sde_heun(terms, diffusion, x, dw, t_cur, t_next, h):
  """Stochastic Heun: noise first, then a Heun step of the drift."""
  xhat = x + jnp.sqrt(2 * diffusion(x, t_cur)) * dw
  k1 = terms(xhat, t_cur)[1]
  k2 = terms(xhat - h * k1, t_next)[1]
  return xhat - 0.5 * h * (k1 + k2)


# SDE steps: step(terms, diffusion, x, dw, t_cur, t_next, h) -> x at t_next, where
# terms(x, t) = (velocity, drift v - D score, D) from one model call and diffusion(x, t) = D.
SDE_STEPS = {"euler": _sde_euler, "heun": _sde_heun}
SDE_METHODS = tuple(SDE_STEPS)


def sample_sde(transport: Transport, model_fn: ModelFn, x: jax.Array, key: jax.Array, *,
               sampling_method: str = "euler", diffusion_form: str = "SBDM",
               diffusion_norm: float = 1.0, last_step: Optional[str] = "Mean",
               last_step_size: float = 0.04, num_steps: int = 250,
               return_trajectory: bool = False, last_step_at_grid_end: bool = False) -> jax.Array:
  """Reverse SDE dx = [v - D score] dt + sqrt(2 D) dW from t = 1, as `Sampler.sample_sde`.

  num_steps - 1 Euler-Maruyama or stochastic-Heun steps on the shifted grid, then the last step
  (Mean: drift step without noise; Tweedie: posterior mean; Euler: probability-flow step; None:
  identity). As in the reference, the last step is taken from model time 1 - t1 = last_step_size,
  which is the grid end only when the shift is 1; last_step_at_grid_end=True starts it from the
  actual grid end instead (step size = that time) so shifted grids also finish at t = 0.
  `key` is one PRNG key or one per example (leading dim B). Returns the end point or the
  (num_steps, *x.shape) list of step outputs (the reference's list: no initial point).
  """
  method = sampling_method.lower()
  if method not in SDE_STEPS:
    raise ValueError(f"sampling_method {sampling_method!r} unknown; expected one of {SDE_METHODS}")
  if isinstance(last_step, str) and last_step.lower() == "none":
    last_step = None
  if last_step not in LAST_STEPS:
    raise ValueError(f"last_step {last_step!r} unknown; expected one of {LAST_STEPS}")
  if last_step is None:
    last_step_size = 0.0
  grid, t_last = sde_time_grid(transport, num_steps, diffusion_form=diffusion_form,
                               last_step_size=last_step_size)
  if last_step_at_grid_end:
    t_last = last_step_size = float(grid[-1]) if last_step is not None else 0.0
  path = transport.path
  batched = _is_batched_key(key, x.shape[0])

  def terms(x, t):
    """(probability-flow velocity, SDE drift v - D score, D) from one model evaluation."""
    tb = _times(t, x)
    out = model_fn(x, tb)
    v = transport.velocity(out, x, tb)
    diff = path.diffusion(x, expand_t(tb, x), diffusion_form, diffusion_norm)
    return v, v - diff * transport.score(out, x, tb), diff

  def step(carry, inp):
    x, i = carry
    t_cur, t_next = inp
    h = t_cur - t_next
    dw = _noise(key, i, x, batched) * jnp.sqrt(h)
    diffusion = lambda x, t: path.diffusion(x, expand_t(_times(t, x), x), diffusion_form,  # noqa: E731
                                            diffusion_norm)
    x = SDE_STEPS[method](terms, diffusion, x, dw, t_cur, t_next, h)
    return (x, i + 1), (x if return_trajectory else None)

  grid_j = jnp.asarray(grid)
  (x_sde, _), xs = jax.lax.scan(step, (x, jnp.zeros((), jnp.int32)), (grid_j[:-1], grid_j[1:]))

  if last_step is None:
    x_end = x_sde
  else:
    tb = _times(t_last, x_sde)
    te = expand_t(tb, x_sde)
    out = model_fn(x_sde, tb)
    if last_step == "Tweedie":
      alpha_t, sigma_t = path.alpha(te)[0], path.sigma(te)[0]
      x_end = x_sde / alpha_t + sigma_t ** 2 / alpha_t * transport.score(out, x_sde, tb)
    else:
      v = transport.velocity(out, x_sde, tb)
      if last_step == "Mean":
        diff = path.diffusion(x_sde, te, diffusion_form, diffusion_norm)
        v = v - diff * transport.score(out, x_sde, tb)
      x_end = x_sde - v * last_step_size
  if return_trajectory:
    return jnp.concatenate([xs, x_end[None]], axis=0)
  return x_end


# ----------------------------------------------------------------------------------------------
# Binding labels and guidance.


def make_model_fn(apply_fn: Callable, params, y: jax.Array, *, guidance: Optional[str] = None,
                  scale: float = 1.0, interval: Sequence[float] = (0.0, 1.0),
                  null_class: Optional[int] = None, guide_apply_fn: Optional[Callable] = None,
                  guide_params=None, **apply_kwargs) -> ModelFn:
  """model_fn(x, t) for the samplers from `apply_fn(params, x, t, y, **apply_kwargs)`.

  guidance: None, 'cfg' (doubles the batch with `null_class` labels) or 'autoguidance' (guide =
  `guide_apply_fn` or apply_fn, with `guide_params`). A Python scale of 1 binds the plain model,
  so it costs no extra forward and equals unguided sampling bit for bit.
  """
  def model(x, t, labels):
    return apply_fn(params, x, t, labels, **apply_kwargs)

  plain = lambda x, t: model(x, t, y)
  if guidance is None or (isinstance(scale, (int, float)) and scale == 1.0):
    return plain
  from rae_jax.models import guidance as guidance_lib  # model side owns the guidance maths
  interval = tuple(interval)
  if guidance == "cfg":
    if null_class is None:
      raise ValueError("cfg guidance needs null_class (the label index of the null class)")
    return lambda x, t: guidance_lib.cfg_velocity(model, x, t, y, scale=scale, interval=interval,
                                                  null_class=null_class)
  if guidance == "autoguidance":
    if guide_params is None:
      raise ValueError("autoguidance needs guide_params (the guide model's parameters)")
    g_apply = guide_apply_fn or apply_fn
    guide = lambda x, t, labels: g_apply(guide_params, x, t, labels, **apply_kwargs)
    return lambda x, t: guidance_lib.autoguidance_velocity(model, guide, x, t, y, scale=scale,
                                                           interval=interval)
  raise ValueError(f"guidance {guidance!r} unknown; expected None, 'cfg' or 'autoguidance'")


def sample(transport: Transport, model_fn: ModelFn, x: jax.Array, *, mode: str = "ODE",
           key: Optional[jax.Array] = None, **sampler_kwargs) -> jax.Array:
  """`sample_ode` or `sample_sde` by mode (the config's sampler.mode); sampler_kwargs are theirs
  (the reference's sampler `params`, e.g. sampling_method, num_steps). SDE needs `key` (one, or one
  per example)."""
  mode = mode.upper()
  if mode == "ODE":
    return sample_ode(transport, model_fn, x, **sampler_kwargs)
  if mode != "SDE":
    raise ValueError(f"sampler mode {mode!r} unknown; expected 'ODE' or 'SDE'")
  if key is None:
    raise ValueError("SDE sampling needs a PRNG key")
  return sample_sde(transport, model_fn, x, key, **sampler_kwargs)
