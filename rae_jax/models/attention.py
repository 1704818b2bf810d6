"""The one attention kernel every transformer in the project calls, with a selectable backend.

`impl` (the modules' `attention_impl` field):
  xla     jax.nn.dot_product_attention's XLA path: logits accumulate in float32 and the softmax
          runs in float32 even for bf16 inputs. Runs everywhere; the parity reference.
  cudnn   cuDNN flash attention (jax.nn.dot_product_attention(implementation='cudnn')); CUDA
          GPUs, bf16/fp16 inputs, head_dim a multiple of 8 and <= 128.
  splash  the Pallas TPU splash-attention kernel; sequence padded to its 128-token blocks with
          segment ids masking the pad. XLA cannot partition a Mosaic call, so when traced under
          a mesh (the train steps are) the kernel runs per device inside shard_map over the
          batch axes: no collective, each device attends over its own examples.
  auto    cudnn on a GPU when the inputs are bf16/fp16 and the head fits, else xla. On TPU it
          stays xla: for the <= 1k-token grids of RAE, XLA's fused attention is as fast and
          needs no shard_map; select splash explicitly for long grids.

A forced kernel on the wrong backend or dtype raises instead of silently running xla.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from rae_jax.models.partitioning import per_batch_shard

IMPLS = ("xla", "cudnn", "splash", "auto")
SPLASH_BLOCK = 128
_HALF = (jnp.bfloat16, jnp.float16)


def _backend() -> str:
  return jax.default_backend()


def _cudnn_problem(dtype, head_dim: int, backend: str) -> Optional[str]:
  """Why cuDNN flash attention cannot run here (None if it can)."""
  if backend not in ("gpu", "cuda"):
    return f"it needs a CUDA GPU, but the JAX backend is {backend!r}"
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _HALF]:
    return (f"it needs bf16/fp16 inputs, got {jnp.dtype(dtype).name} "
            "(set config.compute_dtype='bfloat16')")
  if head_dim % 8 or head_dim > 128:
    return f"head_dim {head_dim} must be a multiple of 8 and <= 128"
  return None


def resolve(impl: str, dtype, head_dim: int, backend: Optional[str] = None) -> str:
  """The concrete backend for `impl`; raises naming the reason when a forced one cannot run."""
  backend = backend or _backend()
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r}; valid: {list(IMPLS)}")
  if impl == "auto":
    return "cudnn" if _cudnn_problem(dtype, head_dim, backend) is None else "xla"
  if impl == "cudnn":
    why = _cudnn_problem(dtype, head_dim, backend)
    if why:
      raise ValueError(f"attention_impl='cudnn' cannot run: {why}. Use 'xla' or 'auto'.")
  if impl == "splash" and backend != "tpu":
    raise ValueError(f"attention_impl='splash' is the Pallas TPU kernel, but the JAX backend is "
                     f"{backend!r}. Use 'xla' or 'auto'.")
  return impl


@functools.lru_cache(maxsize=64)
def _splash_kernel(num_heads: int, padded_len: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  mask = sa.MultiHeadMask([sa.FullMask((padded_len, padded_len)) for _ in range(num_heads)])
  return sa.make_splash_mha_single_device(mask, interpret=interpret)


def _splash(q, k, v, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  b, n, h, d = q.shape
  pad = -n % SPLASH_BLOCK
  # The kernel does not scale; fold 1/sqrt(d) into q. Layout per example: (H, N, D).
  q = q * jnp.asarray(1.0 / np.sqrt(d), q.dtype)
  q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
             for a in (q, k, v))
  kernel = _splash_kernel(h, n + pad, interpret)
  seg = None
  if pad:  # pad tokens form their own segment: real queries never attend to them
    ids = jnp.concatenate([jnp.ones((n,), jnp.int32), jnp.zeros((pad,), jnp.int32)])
    seg = sa.SegmentIds(q=ids, kv=ids)
  per_device = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1, segment_ids=seg))
  out = per_batch_shard(per_device, q.shape[0])(q, k, v)
  return out.transpose(0, 2, 1, 3)[:, :n]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "xla",
                          interpret: bool = False) -> jax.Array:
  """Softmax(q k^T / sqrt(Dh)) v for (B, N, H, Dh) inputs of one dtype; output like q.

  `interpret` runs the splash kernel in Pallas interpret mode (tests on CPU only).
  """
  if q.ndim != 4 or q.shape != k.shape or k.shape != v.shape:
    raise ValueError(f"attention expects q, k, v of one (B, N, H, Dh) shape, got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  backend = "tpu" if interpret else None
  chosen = resolve(impl, q.dtype, q.shape[-1], backend)
  if chosen == "splash":
    return _splash(q, k, v, interpret).astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, implementation=chosen)
