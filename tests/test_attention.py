"""Selectable attention kernels: xla parity on CPU, splash through Pallas interpret mode, clear
errors for kernels forced on the wrong backend, and the field reaching every transformer."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rae_jax.models import attention
from rae_jax.models.ditdh import DiTDH
from rae_jax.models.lightning_dit import LightningDiT
from rae_jax.models.decoder import ViTDecoder
from rae_jax.models.vit_encoders import build_encoder
from rae_jax.losses.discriminator import DinoDiscriminator


def _naive(q, k, v):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def _qkv(shape, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in ks)


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_xla_matches_float64_softmax(impl):
  q, k, v = _qkv((2, 17, 3, 16))
  out = attention.dot_product_attention(q, k, v, impl=impl)
  np.testing.assert_allclose(out, _naive(q, k, v), rtol=2e-5, atol=2e-6)


def test_bf16_softmax_statistics_are_float32():
  """300 keys with near-equal logits, bf16 q, k, v. The reference is the float64 attention of
  the same (bf16-rounded) inputs, so what is left is the kernel's own rounding, bounded element
  by element from first principles (u = 2^-8, bf16's unit roundoff: 8 significant bits):
    - the float32 softmax probabilities p are cast to bf16 for the PV matmul: |dp_j| <= u p_j,
      moving the output by <= u * sum_j p_j |v_j| = u * (P|V|);
    - the output is rounded to bf16: <= u |out| <= u * (P|V|);
    - float32 logits (64-term dots of exact bf16 products), exp, the 300-term sums and the
      float32-accumulated PV dot: a few hundred float32 roundoffs (2^-24), < 1e-4 * (P|V|).
  Hence |out - ref| <= (2u + 1e-4) * (P|V|) on any CPU (measured 0.56u at most, identical with
  XLA_FLAGS=--xla_cpu_max_isa=AVX2 and AVX). A softmax whose statistics run in bf16 (the 300-term
  sum stagnates once it passes ~1/2: probabilities summing to 1.11) is off by 12.9u."""
  q, k, v = _qkv((1, 300, 2, 64), seed=1)
  qb, kb, vb = (a.astype(jnp.bfloat16) for a in (q, k, v))
  out = attention.dot_product_attention(qb, kb, vb, impl="xla")
  assert out.dtype == jnp.bfloat16
  q64, k64, v64 = (np.asarray(a, np.float64) for a in (qb, kb, vb))
  logits = np.einsum("bqhd,bkhd->bhqk", q64, k64) / np.sqrt(q64.shape[-1])
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ref = np.einsum("bhqk,bkhd->bqhd", p, v64)
  scale = np.einsum("bhqk,bkhd->bqhd", p, np.abs(v64))  # P|V|
  u = 2.0 ** -8
  ratio = np.abs(np.asarray(out, np.float64) - ref) / scale
  assert ratio.max() <= 2 * u + 1e-4, ratio.max() / u


@pytest.mark.parametrize("n", [128, 70])  # 70: padded to one 128 block, pad masked by segments
def test_splash_kernel_interpret_matches_xla(n):
  q, k, v = _qkv((2, n, 2, 64), seed=2)
  out = attention.dot_product_attention(q, k, v, impl="splash", interpret=True)
  ref = attention.dot_product_attention(q, k, v, impl="xla")
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_splash_gradient_interpret_matches_xla():
  q, k, v = _qkv((1, 128, 2, 64), seed=3)
  loss = lambda impl, *a: jnp.sum(jnp.sin(attention.dot_product_attention(
      *a, impl=impl, interpret=impl == "splash")))
  g_s = jax.grad(functools.partial(loss, "splash"), argnums=(0, 1, 2))(q, k, v)
  g_x = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_s, g_x):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_splash_runs_per_device_under_a_sharded_jit():
  """XLA cannot partition a Mosaic call: traced under a mesh (as the train steps are) splash runs
  per batch shard inside shard_map, matches xla, and moves no activation between devices."""
  from rae_jax.train import mesh as mesh_lib
  mesh = mesh_lib.make_mesh(1, 8)
  q, k, v = _qkv((16, 70, 2, 64), seed=4)
  bsh = mesh_lib.batch_sharding(mesh)

  def attend(impl, q, k, v):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return attention.dot_product_attention(q, k, v, impl=impl, interpret=impl == "splash")
  fn = jax.jit(functools.partial(attend, "splash"), in_shardings=bsh, out_shardings=bsh)
  out = fn(q, k, v)
  np.testing.assert_allclose(out, attend("xla", q, k, v), rtol=1e-4, atol=1e-5)
  assert out.sharding.spec == bsh.spec
  hlo = fn.lower(q, k, v).compile().as_text()
  assert not any(c in hlo for c in ("all-gather", "all-to-all", "collective-permute"))
  # The backward pass (what the train step differentiates) runs per device too.
  grad = lambda impl: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(attend(impl, *a))),  # noqa: E731
                                       argnums=(0, 1, 2)), in_shardings=bsh)
  for a, b in zip(grad("splash")(q, k, v), grad("xla")(q, k, v)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  with pytest.raises(ValueError, match="batch shards"):
    jax.jit(functools.partial(attend, "splash")).lower(*(a[:12] for a in (q, k, v)))


def test_forced_kernels_fail_on_cpu_with_a_reason():
  q, k, v = _qkv((1, 8, 2, 16))
  with pytest.raises(ValueError, match="cudnn.*CUDA GPU.*'cpu'"):
    attention.dot_product_attention(q, k, v, impl="cudnn")
  with pytest.raises(ValueError, match="splash.*TPU.*'cpu'"):
    attention.dot_product_attention(q, k, v, impl="splash")
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    attention.dot_product_attention(q, k, v, impl="flash")


def test_resolve_rules_per_backend():
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert attention.resolve("auto", bf16, 64, "gpu") == "cudnn"
  assert attention.resolve("auto", f32, 64, "gpu") == "xla"  # cuDNN flash is half-precision only
  assert attention.resolve("auto", bf16, 72, "gpu") == "cudnn"  # ViT-XL decoder head
  assert attention.resolve("auto", bf16, 160, "gpu") == "xla"
  assert attention.resolve("auto", bf16, 64, "tpu") == "xla"
  assert attention.resolve("auto", bf16, 64, "cpu") == "xla"
  assert attention.resolve("splash", bf16, 64, "tpu") == "splash"
  with pytest.raises(ValueError, match="bf16/fp16"):
    attention.resolve("cudnn", f32, 64, "gpu")
  with pytest.raises(ValueError, match="head_dim 12"):
    attention.resolve("cudnn", bf16, 12, "gpu")


def test_every_transformer_takes_attention_impl():
  """Each model forwards its field to the kernel: forcing cudnn on CPU fails while tracing."""
  x = jnp.ones((1, 4, 4, 8))
  t, y = jnp.full((1,), 0.3), jnp.zeros((1,), jnp.int32)
  img = jnp.ones((1, 16, 16, 3))
  cases = [
      (lambda impl: DiTDH(input_size=4, in_channels=8, hidden_size=(32, 48), depth=(1, 1),
                          num_heads=(2, 2), num_classes=3, attention_impl=impl), (x, t, y)),
      (lambda impl: LightningDiT(input_size=4, in_channels=8, hidden_size=32, depth=1,
                                 num_heads=2, num_classes=3, attention_impl=impl), (x, t, y)),
      (lambda impl: ViTDecoder(hidden_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                               decoder_num_attention_heads=2, decoder_intermediate_size=64,
                               patch_size=4, num_patches=16, attention_impl=impl),
       (jnp.ones((1, 16, 8)),)),
      (lambda impl: build_encoder("toy_vit", hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, patch_size=8,
                                  image_size=16, attention_impl=impl), (img,)),
      (lambda impl: build_encoder("dinov2_reg", hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, patch_size=8, image_size=16,
                                  attention_impl=impl), (img,)),
      (lambda impl: DinoDiscriminator(recipe_overrides=dict(depth=2, embed_dim=32, num_heads=2,
                                                            patch_size=16), key_depths=(0,),
                                      attention_impl=impl), (img,)),
  ]
  key = jax.random.key(0)
  for make, args in cases:
    jax.eval_shape(make("xla").init, key, *args)  # traces (no compile): the field is accepted
    with pytest.raises(ValueError, match="attention_impl='cudnn' cannot run"):
      jax.eval_shape(make("cudnn").init, key, *args)  # ... and reaches the kernel
