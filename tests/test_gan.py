"""GAN losses, adaptive weight (checked against jax.grad on a toy decoder) and epoch schedules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rae_jax.losses.gan import (GanSchedule, adaptive_gan_weight, adaptive_weight_from_grads,
                                disc_accuracy, hinge_d_loss, l1_loss, quantize_pm1, select_gan_losses,
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
  return h @ params["last"]["kernel"] + params["last"]["bias"]


def _toy_losses(params, z, target, disc_w):
  recon = _toy_decoder(params, z)
  rec = jnp.mean(jnp.abs(recon - target)) + 0.5 * jnp.mean(jnp.square(recon - target))
  gan = -jnp.mean(jnp.tanh(recon) @ disc_w)
  return rec, gan


@pytest.mark.parametrize("max_d_weight", [1e4, 0.05])
def test_adaptive_weight_equals_jax_grad_reference(max_d_weight):
  k = jax.random.split(jax.random.key(0), 5)
  params = {"body": jax.random.normal(k[0], (6, 8)),
            "last": {"kernel": jax.random.normal(k[1], (8, 5)) * 0.3, "bias": jnp.zeros(5)}}
  z, target = jax.random.normal(k[2], (7, 6)), jax.random.normal(k[3], (7, 5))
  disc_w = jax.random.normal(k[4], (5, 3))

  # Reference: full-model gradients of each loss, read at the last layer's kernel.
  g_rec = jax.grad(lambda p: _toy_losses(p, z, target, disc_w)[0])(params)["last"]["kernel"]
  g_gan = jax.grad(lambda p: _toy_losses(p, z, target, disc_w)[1])(params)["last"]["kernel"]
  want = min(np.linalg.norm(np.asarray(g_rec)) / (np.linalg.norm(np.asarray(g_gan)) + 1e-6), max_d_weight)

  def with_last(w):
    return {**params, "last": {**params["last"], "kernel": w}}
  got = jax.jit(lambda w: adaptive_gan_weight(
      lambda w: _toy_losses(with_last(w), z, target, disc_w)[0],
      lambda w: _toy_losses(with_last(w), z, target, disc_w)[1], w, max_d_weight))(params["last"]["kernel"])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(adaptive_weight_from_grads(g_rec, g_gan, max_d_weight), want, rtol=1e-5)
  if max_d_weight < 1:
    assert float(got) == pytest.approx(max_d_weight)  # the clamp engaged

  # The weight is a constant for the generator's gradient (detached as in the reference).
  def total(p):
    rec, gan = _toy_losses(p, z, target, disc_w)
    w = adaptive_gan_weight(lambda w: _toy_losses(with_last(w), z, target, disc_w)[0],
                            lambda w: _toy_losses(with_last(w), z, target, disc_w)[1],
                            p["last"]["kernel"], max_d_weight)
    return rec + 0.75 * w * gan
  g = jax.grad(total)(params)
  g_ref = jax.grad(lambda p: (lambda r, a: r + 0.75 * float(got) * a)(*_toy_losses(p, z, target, disc_w)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g, g_ref)


def test_schedule_from_official_config():
  cfg = dict(disc_loss="hinge", gen_loss="vanilla", disc_weight=0.75, perceptual_weight=1.0, disc_start=8,
             disc_upd_start=6, lpips_start=0, max_d_weight=1e4, disc_updates=1)
  s = GanSchedule.from_config(cfg, steps_per_epoch=100)
  assert (s.lpips_start_step, s.gan_start_step, s.disc_update_step) == (0, 800, 600)
  assert s.disc_updates == 1 and s.max_d_weight == 1e4
  assert bool(s.use_lpips(0)) and not bool(s.use_gan(799)) and bool(s.use_gan(800))
  assert not bool(s.train_disc(599)) and bool(s.train_disc(600))
  flags = jax.jit(lambda t: jnp.stack([s.use_lpips(t), s.use_gan(t), s.train_disc(t)]))
  np.testing.assert_array_equal(flags(700), [True, False, True])
  # Zero weights switch the terms off, whatever the step; disc_upd_start defaults to disc_start.
  off = GanSchedule.from_config(dict(disc_start=2), steps_per_epoch=10)
  assert off.disc_update_step == 20
  assert not bool(off.use_gan(10 ** 6)) and not bool(off.train_disc(10 ** 6)) and not bool(off.use_lpips(0))
  with pytest.raises(ValueError, match="steps_per_epoch"):
    GanSchedule(steps_per_epoch=0)
