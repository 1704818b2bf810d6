"""Flow-matching transport for stage 2: interpolation paths, time sampling, training loss.

Same maths and time convention as the official `stage2.transport` (RAE variant of SiT):
t = 0 is data and t = 1 is noise, x_t = alpha_t x_data + sigma_t x_noise (Linear: alpha = 1 - t,
sigma = t), the training target of a velocity model is u_t = d_alpha x_data + d_sigma x_noise, and
samplers integrate from t = 1 down towards t ~ 0. Training times are drawn from a base distribution
on [t0, t1] and pushed through the resolution shift t' = s t / (1 + (s - 1) t), which moves mass
towards the noise end for high-dimensional latents (s = sqrt(shift_dim / shift_base)).

Everything is a pure function of explicit PRNG keys; `Transport` is a frozen (hashable) dataclass
so it can be a static argument of `jax.jit`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr, ndtri

PATH_TYPES = ("Linear", "GVP", "VP")
PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = (None, "velocity", "likelihood")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing",
                   "increasing-decreasing")


def expand_t(t: jax.Array, x: jax.Array) -> jax.Array:
  """(B,) times -> (B, 1, ..., 1) broadcastable against x."""
  t = jnp.asarray(t)
  return jnp.reshape(t, t.shape[:1] + (1,) * (x.ndim - 1))


def mean_flat(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------------------------
# Paths. Methods take t already broadcastable against x (see expand_t) unless noted.


class LinearPath:
  """Rectified-flow path x_t = (1 - t) x_data + t x_noise (the reference's ICPlan)."""

  def alpha(self, t):
    return 1 - t, -jnp.ones_like(t)

  def sigma(self, t):
    return t, jnp.ones_like(t)

  def d_alpha_alpha_ratio(self, t):
    return -1 / (1 - t)

  def drift(self, x, t):
    """(f, D) with velocity = f + D * score: the probability-flow form used for score models."""
    ratio = self.d_alpha_alpha_ratio(t)
    sigma_t, d_sigma_t = self.sigma(t)
    return ratio * x, ratio * sigma_t ** 2 - sigma_t * d_sigma_t

  def diffusion(self, x, t, form: str = "SBDM", norm: float = 1.0):
    """Diffusion coefficient D(t) of the reverse SDE (dx = [v - D score] dt + sqrt(2D) dW).

    'SBDM' is the path's own 1/2 g^2. The reference computes it with a sign that is negative for
    Linear/GVP in its flipped time convention (so its SBDM samples are NaN); we use the magnitude.
    'increasing-decreasing' is spelled 'inccreasing-decreasing' in the reference; both are accepted.
    """
    if form == "constant":
      return jnp.full_like(t, norm)
    if form == "SBDM":
      return norm * jnp.abs(self.drift(x, t)[1])
    if form == "sigma":
      return norm * self.sigma(t)[0]
    if form == "linear":
      return norm * t
    if form == "decreasing":
      return 0.25 * (norm * jnp.cos(jnp.pi * (1 - t)) + 1) ** 2
    if form in ("increasing-decreasing", "inccreasing-decreasing"):
      return norm * jnp.sin(jnp.pi * (1 - t)) ** 2
    raise ValueError(f"diffusion_form {form!r} unknown; expected one of {DIFFUSION_FORMS}")

  def score_from_velocity(self, v, x, t):
    alpha_t, d_alpha_t = self.alpha(t)
    sigma_t, d_sigma_t = self.sigma(t)
    r = alpha_t / d_alpha_t
    var = sigma_t ** 2 - r * d_sigma_t * sigma_t
    return (r * v - x) / var

  def noise_from_velocity(self, v, x, t):
    alpha_t, d_alpha_t = self.alpha(t)
    sigma_t, d_sigma_t = self.sigma(t)
    r = alpha_t / d_alpha_t
    var = r * d_sigma_t - sigma_t
    return (r * v - x) / var

  def velocity_from_score(self, score, x, t):
    f, d = self.drift(x, t)
    return d * score + f

  def plan(self, t, x_noise, x_data):
    """(x_t, u_t) for expanded t."""
    alpha_t, d_alpha_t = self.alpha(t)
    sigma_t, d_sigma_t = self.sigma(t)
    return alpha_t * x_data + sigma_t * x_noise, d_alpha_t * x_data + d_sigma_t * x_noise


class GVPPath(LinearPath):
  """Trigonometric variance-preserving path alpha = cos(pi t / 2), sigma = sin(pi t / 2)."""

  def alpha(self, t):
    return jnp.cos(t * jnp.pi / 2), -jnp.pi / 2 * jnp.sin(t * jnp.pi / 2)

  def sigma(self, t):
    return jnp.sin(t * jnp.pi / 2), jnp.pi / 2 * jnp.cos(t * jnp.pi / 2)

  def d_alpha_alpha_ratio(self, t):
    return -jnp.pi / 2 * jnp.tan(t * jnp.pi / 2)


@dataclasses.dataclass(frozen=True)
class VPPath(LinearPath):
  """The reference's VPCPlan: SiT's VP schedule with the roles of alpha and sigma swapped so that
  t = 1 is noise; its drift keeps SiT's (unflipped) linear beta schedule, as the reference does."""
  sigma_min: float = 0.1
  sigma_max: float = 20.0

  def _log_mean_coeff(self, t):
    return (-0.25 * (1 - t) ** 2 * (self.sigma_max - self.sigma_min)
            - 0.5 * (1 - t) * self.sigma_min)

  def _d_log_mean_coeff(self, t):
    return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

  def alpha(self, t):
    p = 2 * self._log_mean_coeff(t)
    alpha_t = jnp.sqrt(1 - jnp.exp(p))
    d_alpha_t = jnp.exp(p) * (2 * self._d_log_mean_coeff(t)) / (-2 * alpha_t)
    return alpha_t, d_alpha_t

  def sigma(self, t):
    sigma_t = jnp.exp(self._log_mean_coeff(t))
    return sigma_t, sigma_t * self._d_log_mean_coeff(t)

  def d_alpha_alpha_ratio(self, t):
    alpha_t, d_alpha_t = self.alpha(t)
    return d_alpha_t / alpha_t

  def drift(self, x, t):
    beta_t = self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min)
    return 0.5 * beta_t * x, beta_t / 2 + jnp.zeros_like(t)


_PATHS = {"Linear": LinearPath, "GVP": GVPPath, "VP": VPPath}


# ----------------------------------------------------------------------------------------------
# Time distributions.


def shift_for_dim(shift_dim: float, shift_base: float = 4096) -> float:
  """Resolution shift s = sqrt(shift_dim / shift_base); shift_dim is C*h*w of the latent."""
  if shift_dim <= 0 or shift_base <= 0:
    raise ValueError(f"shift_dim ({shift_dim}) and shift_base ({shift_base}) must be positive")
  return math.sqrt(shift_dim / shift_base)


def time_shift(t, shift):
  """t' = s t / (1 + (s - 1) t): monotone map of [0, 1] onto itself, s > 1 favours noise."""
  return shift * t / (1 + (shift - 1) * t)


def parse_time_dist(time_dist_type: str) -> tuple[str, tuple[float, ...]]:
  """'uniform' -> ('uniform', ()); 'logit-normal_<mu>_<sigma>' -> ('logit-normal', (mu, sigma))."""
  parts = time_dist_type.split("_")
  if parts[0] == "uniform" and len(parts) == 1:
    return "uniform", ()
  if parts[0] == "logit-normal":
    if len(parts) != 3:
      raise ValueError(f"time_dist_type {time_dist_type!r}: logit-normal needs mean and std, "
                       "e.g. 'logit-normal_0_1'")
    mu, sigma = float(parts[1]), float(parts[2])
    if not sigma > 0:
      raise ValueError(f"time_dist_type {time_dist_type!r}: std must be positive")
    return "logit-normal", (mu, sigma)
  raise ValueError(f"time_dist_type {time_dist_type!r} unknown; expected 'uniform' or "
                   "'logit-normal_<mu>_<sigma>'")


def sample_base_time(key, shape, time_dist_type: str, t0: float, t1: float) -> jax.Array:
  """Unshifted times on [t0, t1]: uniform, or logit-normal truncated to [t0, t1] (inverse CDF)."""
  kind, args = parse_time_dist(time_dist_type)
  u = jax.random.uniform(key, shape, jnp.float32)
  if kind == "uniform":
    return u * (t1 - t0) + t0
  mu, sigma = args
  z_lo = -jnp.inf if t0 <= 0 else math.log(t0 / (1 - t0))
  z_hi = jnp.inf if t1 >= 1 else math.log(t1 / (1 - t1))
  c_lo, c_hi = ndtr((z_lo - mu) / sigma), ndtr((z_hi - mu) / sigma)
  z = mu + sigma * ndtri(c_lo + (c_hi - c_lo) * u)
  return jnp.clip(jax.nn.sigmoid(z), t0, t1)


# ----------------------------------------------------------------------------------------------
# Transport.


@dataclasses.dataclass(frozen=True)
class Transport:
  """Path + prediction type + time distribution. Build with `create_transport`."""
  path_type: str = "Linear"
  prediction: str = "velocity"
  loss_weight: Optional[str] = None
  train_eps: float = 0.0
  sample_eps: float = 0.0
  time_dist_type: str = "uniform"
  time_dist_shift: float = 1.0

  def __post_init__(self):
    if self.path_type not in _PATHS:
      raise ValueError(f"path_type {self.path_type!r} unknown; expected one of {PATH_TYPES}")
    if self.prediction not in PREDICTIONS:
      raise ValueError(f"prediction {self.prediction!r} unknown; expected one of {PREDICTIONS}")
    if self.loss_weight not in LOSS_WEIGHTS:
      raise ValueError(f"loss_weight {self.loss_weight!r} unknown; expected one of {LOSS_WEIGHTS}")
    if not self.time_dist_shift >= 1.0:
      raise ValueError(f"time_dist_shift must be >= 1, got {self.time_dist_shift}")
    parse_time_dist(self.time_dist_type)

  @property
  def path(self) -> LinearPath:
    return _PATHS[self.path_type]()

  def check_interval(self, *, sde: bool = False, eval: bool = False, reverse: bool = False,
                     diffusion_form: str = "SBDM", last_step_size: float = 0.0):
    """(t0, t1) in the reference's unshifted 'progress' coordinate (model time is 1 - that)."""
    t0, t1 = 0.0, 1 - 1 / 1000
    eps = self.sample_eps if eval else self.train_eps
    if self.path_type == "VP":
      t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
    elif self.prediction != "velocity" or sde:
      # avoid the singular end by a semi-implicit first step, as the reference does
      t0 = eps if (diffusion_form == "SBDM" and sde) or self.prediction != "velocity" else 0.0
      t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
    if reverse:
      t0, t1 = 1 - t0, 1 - t1
    return t0, t1

  # -- training ---------------------------------------------------------------------------------

  def sample_time(self, key, batch_size: int) -> jax.Array:
    """Training times (B,) float32: base distribution on the train interval, then the shift."""
    t0, t1 = self.check_interval()
    t = sample_base_time(key, (batch_size,), self.time_dist_type, t0, t1)
    return time_shift(t, self.time_dist_shift)

  def draw(self, key, x_shape, dtype=jnp.float32) -> dict:
    """The random inputs of one training loss: {'t': (B,) shifted times, 'noise': x_shape}.

    Drawn for the global batch shape from one key, so a sharded batch gives the same values on
    any device layout. Official draws (t as used, noise x0) can be passed in instead.
    """
    key_t, key_n = jax.random.split(key)
    return {"t": self.sample_time(key_t, x_shape[0]),
            "noise": jax.random.normal(key_n, x_shape, dtype)}

  def training_loss(self, params, apply_fn: Callable[..., jax.Array], x_data: jax.Array, key,
                    **model_kwargs) -> jax.Array:
    """Per-example loss (B,) with draws from `key` (see `draw`)."""
    return self.training_loss_from_draws(params, apply_fn, x_data,
                                         self.draw(key, x_data.shape, x_data.dtype),
                                         **model_kwargs)

  def training_loss_from_draws(self, params, apply_fn: Callable[..., jax.Array],
                               x_data: jax.Array, draws: dict, **model_kwargs) -> jax.Array:
    """Per-example loss (B,): `apply_fn(params, x_t, t, **model_kwargs)` is the model output.

    The reference's training_losses with its `sample` replaced by `draws`: x_t = alpha_t x_data +
    sigma_t noise at the drawn (already shifted) time t.
    """
    t = jnp.asarray(draws["t"], jnp.float32)
    x_noise = jnp.asarray(draws["noise"], x_data.dtype)
    if t.shape != x_data.shape[:1] or x_noise.shape != x_data.shape:
      raise ValueError(f"transport draws: t {t.shape} / noise {x_noise.shape} do not match the "
                       f"batch {x_data.shape}")
    te = expand_t(t, x_data)
    path = self.path
    x_t, u_t = path.plan(te, x_noise, x_data)
    out = apply_fn(params, x_t, t, **model_kwargs)
    if out.shape != x_t.shape:
      raise ValueError(f"model output shape {out.shape} != input shape {x_t.shape}")
    if self.prediction == "velocity":
      return mean_flat((out - u_t) ** 2)
    # |D|: the reference's D is negative on Linear/GVP (flipped time), which would make the
    # likelihood weight negative; the magnitude is the path's 1/2 g^2.
    drift_var = jnp.abs(path.drift(x_t, te)[1])
    sigma_t = path.sigma(te)[0]
    if self.loss_weight == "velocity":
      weight = (drift_var / sigma_t) ** 2
    elif self.loss_weight == "likelihood":
      weight = drift_var / sigma_t ** 2
    else:
      weight = 1.0
    if self.prediction == "noise":
      return mean_flat(weight * (out - x_noise) ** 2)
    return mean_flat(weight * (out * sigma_t + x_noise) ** 2)

  # -- sampling helpers -------------------------------------------------------------------------

  def velocity(self, out, x, t):
    """Probability-flow velocity from the model output (t of shape (B,))."""
    if self.prediction == "velocity":
      return out
    te = expand_t(t, x)
    f, d = self.path.drift(x, te)
    if self.prediction == "score":
      return f + d * out
    return f + d * (out / -self.path.sigma(te)[0])

  def score(self, out, x, t):
    """Score of p_t from the model output (t of shape (B,))."""
    te = expand_t(t, x)
    if self.prediction == "score":
      return out
    if self.prediction == "noise":
      return out / -self.path.sigma(te)[0]
    return self.path.score_from_velocity(out, x, te)


def create_transport(path_type: str = "Linear", prediction: str = "velocity",
                     loss_weight: Optional[str] = None, train_eps: Optional[float] = None,
                     sample_eps: Optional[float] = None, time_dist_type: str = "uniform",
                     time_dist_shift: float = 1.0) -> Transport:
  """Same defaults and eps rules as the reference's `create_transport`.

  VP: train_eps 1e-5, sample_eps 1e-3; Linear/GVP with noise/score prediction: both 1e-3;
  velocity on Linear/GVP is regular everywhere: both 0 (the reference ignores given values there).
  Where the reference would leave sample_eps None (train_eps given, sample_eps not) we use 1e-3.
  """
  if path_type in ("Linear", "GVP") and prediction == "velocity":
    train_eps, sample_eps = 0.0, 0.0
  elif path_type == "VP":
    train_eps = 1e-5 if train_eps is None else train_eps
    sample_eps = 1e-3 if sample_eps is None else sample_eps
  else:
    train_eps = 1e-3 if train_eps is None else train_eps
    sample_eps = 1e-3 if sample_eps is None else sample_eps
  return Transport(path_type=path_type, prediction=prediction, loss_weight=loss_weight,
                   train_eps=float(train_eps), sample_eps=float(sample_eps),
                   time_dist_type=time_dist_type, time_dist_shift=float(time_dist_shift))


def transport_from_config(cfg: Any, latent_shape=None) -> Transport:
  """From a dict/ConfigDict with the reference's transport params plus optional
  time_dist_shift_dim / time_dist_shift_base (default C*h*w of latent_shape and 4096)."""
  get = cfg.get
  shift = get("time_dist_shift", None)
  if shift is None:
    dim = get("time_dist_shift_dim", None)
    if dim is None:
      if latent_shape is None:
        raise ValueError("transport config: give time_dist_shift, time_dist_shift_dim or "
                         "latent_shape")
      dim = math.prod(latent_shape)
    shift = shift_for_dim(dim, get("time_dist_shift_base", 4096))
  return create_transport(
      path_type=get("path_type", "Linear"), prediction=get("prediction", "velocity"),
      loss_weight=get("loss_weight", None), train_eps=get("train_eps", None),
      sample_eps=get("sample_eps", None), time_dist_type=get("time_dist_type", "uniform"),
      time_dist_shift=shift)
