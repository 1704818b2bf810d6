"""Spectral normalisation with persistent power-iteration vectors (torch `spectral_norm` semantics).

The vectors live in the 'spectral' variable collection (not 'params') so optimizers never touch
them; they advance by one power iteration per call in training mode and are used as stored in
eval mode, exactly as `torch.nn.utils.spectral_norm` (n_power_iterations=1, dim=0) does. The
collection is a plain pytree, so it checkpoints with the rest of the discriminator state.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

SPECTRAL = "spectral"


def _l2_normalize(x: jax.Array, eps: float) -> jax.Array:
  # torch.nn.functional.normalize: x / max(||x||, eps).
  return x / jnp.maximum(jnp.linalg.norm(x), eps)


def power_iteration(w_mat: jax.Array, u: jax.Array, eps: float = 1e-12):
  """One torch-style power iteration on (out, in) `w_mat`; returns the new (u, v)."""
  w_mat = jax.lax.stop_gradient(w_mat)
  v = _l2_normalize(w_mat.T @ u, eps)
  u = _l2_normalize(w_mat @ v, eps)
  return u, v


def spectral_sigma(w_mat: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
  """sigma = u . (W v); gradients flow through W only, as in torch (u, v are constants)."""
  u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
  return jnp.dot(u, w_mat @ v)


def conv1d_kernel_to_matrix(kernel: jax.Array) -> jax.Array:
  """flax (K, I, O) kernel -> torch's (O, I*K) `weight.reshape(O, -1)` matrix, so u/v keep torch order."""
  return jnp.transpose(kernel, (2, 1, 0)).reshape(kernel.shape[-1], -1)


class SpectralConv1d(nn.Module):
  """1-D conv over tokens (B, L, C) with circular padding and spectral-normalised kernel.

  train=True runs one power iteration and writes u/v back (needs mutable=['spectral']);
  train=False divides by the stored u . (W v). `use_spectral_norm=False` gives a plain conv.
  """
  features: int
  kernel_size: int
  use_spectral_norm: bool = True
  eps: float = 1e-12

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    in_features = x.shape[-1]
    k = self.kernel_size
    fan_in = in_features * k
    bound = 1.0 / fan_in ** 0.5  # torch Conv1d default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    init = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)  # noqa: E731
    kernel = self.param("kernel", init, (k, in_features, self.features))
    bias = self.param("bias", init, (self.features,))
    if self.use_spectral_norm:
      w_mat = conv1d_kernel_to_matrix(kernel)

      def init_vec(n):
        return lambda: _l2_normalize(jax.random.normal(self.make_rng("params"), (n,), jnp.float32), self.eps)

      u_var = self.variable(SPECTRAL, "u", init_vec(w_mat.shape[0]))
      v_var = self.variable(SPECTRAL, "v", init_vec(w_mat.shape[1]))
      u, v = u_var.value, v_var.value
      if train and not self.is_initializing():
        if not self.is_mutable_collection(SPECTRAL):
          raise ValueError(f"{self.name}: train=True updates spectral-norm vectors; "
                           f"call apply(..., mutable=['{SPECTRAL}'])")
        u, v = power_iteration(w_mat, u, self.eps)
        u_var.value, v_var.value = u, v
      kernel = kernel / spectral_sigma(w_mat, u, v)
    pad = k // 2
    if pad:
      x = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)), mode="wrap")
    y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (1,), "VALID",
                                     dimension_numbers=("NWC", "WIO", "NWC"))
    return y + bias.astype(y.dtype)
