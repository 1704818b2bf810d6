"""GAN losses and the adaptive weight as the stage-1 step combines it (`losses/decoder_loss.py`),
checked against jax.grad on a toy decoder. The epoch switches: tests/test_stage1.py (Phases)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rae_jax.losses import decoder_loss
from rae_jax.losses.gan import (adaptive_weight_from_grads, disc_accuracy, hinge_d_loss, l1_loss, quantize_pm1, select_gan_losses,
                                vanilla_d_loss, vanilla_g_loss)


def test_losses_match_formulas():
  rng = np.random.default_rng(0)
  lr, lf = rng.normal(size=(4, 50)).astype(np.float32), rng.normal(size=(4, 50)).astype(np.float32)
  relu = lambda a: np.maximum(a, 0)  # noqa: E731
  softplus = lambda a: np.log1p(np.exp(a))  # noqa: E731
  np.testing.assert_allclose(hinge_d_loss(lr, lf), 0.5 * (relu(1 - lr).mean() + relu(1 + lf).mean()), rtol=1e-6)
  np.testing.assert_allclose(hinge_d_loss(lr, lf, "sum"), 0.5 * (relu(1 - lr).sum() + relu(1 + lf).sum()),
                             rtol=1e-6)
  np.testing.assert_allclose(vanilla_d_loss(lr, lf), 0.5 * (softplus(-lr).mean() + softplus(lf).mean()),
                             rtol=1e-6)
  np.testing.assert_allclose(vanilla_g_loss(lf), -lf.mean(), rtol=1e-6)
  np.testing.assert_allclose(vanilla_g_loss(lf, "sum"), -lf.sum(), rtol=1e-6)
  np.testing.assert_allclose(l1_loss(lr, lf), np.abs(lr - lf).mean(), rtol=1e-6)
  np.testing.assert_allclose(disc_accuracy(lr, lf), (lr > lf).mean())
  with pytest.raises(ValueError, match="reduction"):
    vanilla_g_loss(lf, "none")
  assert select_gan_losses("vanilla", "vanilla") == (vanilla_d_loss, vanilla_g_loss)
  with pytest.raises(ValueError, match="wgan"):
    select_gan_losses("wgan", "vanilla")
  q = np.asarray(quantize_pm1(jnp.asarray([-3.0, -1.0, 0.1234, 0.999, 2.0])))
  np.testing.assert_allclose((q + 1) * 127.5, np.round((q + 1) * 127.5), atol=1e-4)
  assert q.min() == -1.0 and q.max() == 1.0


def _toy_decoder(params, z):
  h = jnp.tanh(z @ params["body"])
  return h @ params["decoder_pred"]["kernel"] + params["decoder_pred"]["bias"]


def _rec(recon, target):
  return jnp.mean(jnp.abs(recon - target)) + 0.5 * jnp.mean(jnp.square(recon - target))


def _gan(recon, disc_w):
  return -jnp.mean(jnp.tanh(recon) @ disc_w)


@pytest.mark.parametrize("max_d_weight", [1e4, 0.05])
def test_adaptive_weight_equals_jax_grad_reference(max_d_weight):
  """The step's path (one decoder VJP, each term's last-layer gradient, `combine_generator`)
  against full-model jax.grad of each loss read at the last layer's kernel."""
  k = jax.random.split(jax.random.key(0), 5)
  params = {"body": jax.random.normal(k[0], (6, 8)),
            "decoder_pred": {"kernel": jax.random.normal(k[1], (8, 5)) * 0.3, "bias": jnp.zeros(5)}}
  z, target = jax.random.normal(k[2], (7, 6)), jax.random.normal(k[3], (7, 5))
  disc_w = jax.random.normal(k[4], (5, 3))
  disc_weight = 0.75
  s = decoder_loss.LossSettings(disc_weight=disc_weight, max_d_weight=max_d_weight)

  # Reference: full-model gradients of each loss, read at the last layer's kernel.
  def full(p):
    recon = _toy_decoder(p, z)
    return _rec(recon, target), _gan(recon, disc_w)
  g_rec = jax.grad(lambda p: full(p)[0])(params)["decoder_pred"]["kernel"]
  g_gan = jax.grad(lambda p: full(p)[1])(params)["decoder_pred"]["kernel"]
  want = min(np.linalg.norm(np.asarray(g_rec)) / (np.linalg.norm(np.asarray(g_gan)) + 1e-6), max_d_weight)

  @jax.jit
  def step_path(p):
    recon, pullback = jax.vjp(lambda q: _toy_decoder(q, z), p)
    rec, gr = jax.value_and_grad(lambda xh: _rec(xh, target))(recon)
    gan, gg = jax.value_and_grad(lambda xh: _gan(xh, disc_w))(recon)
    last = lambda g: decoder_loss.last_layer(pullback(g)[0])  # noqa: E731
    loss, g_img, w = decoder_loss.combine_generator(s, rec, gan, gr, gg, last(gr), last(gg))
    return loss, pullback(g_img)[0], w
  loss, grads, got = step_path(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(adaptive_weight_from_grads(g_rec, g_gan, max_d_weight), want, rtol=1e-5)
  if max_d_weight < 1:
    assert float(got) == pytest.approx(max_d_weight)  # the clamp engaged

  # The weight is a constant for the generator's gradient (detached as in the reference).
  g_ref = jax.grad(lambda p: (lambda r, a: r + disc_weight * float(got) * a)(*full(p)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, g_ref)
  rec, gan = full(params)
  np.testing.assert_allclose(loss, rec + disc_weight * float(got) * gan, rtol=1e-6)
