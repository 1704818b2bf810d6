"""FID Inception-v3 (pytorch-fid's port of the 2015-12-05 TF graph), NHWC.

This is the network the ADM evaluator scores with: torchvision's Inception-v3 trunk (1008 classes,
no aux head) with the FID-specific blocks, whose average pools ignore padding (TF semantics) and
whose last block max-pools. BatchNorm is folded into each conv's bias at import time (eval-only
network), so params hold only `conv/{kernel,bias}` per BasicConv2d and `fc/{kernel,bias}`.

Outputs: `pool3` (B, 2048) for FID and precision/recall; `logits` (B, 1008) = pool3 @ fc.kernel
WITHOUT the bias, because the ADM suite's Inception Score multiplies by the `softmax/logits/MatMul`
weight only; `logits_fc` adds the bias (torchvision's `fc`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np


INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL3_DIM = 2048
RANDOM_WEIGHTS_WARNING = (
    "FID Inception uses RANDOM weights (real pt_inception-2015-12-05 file not found): "
    "FID/IS/precision/recall are NOT comparable to published numbers")

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- resize
def _bilinear_taps(in_size: int, out_size: int):
  """Source indices and weights of torch's bilinear, align_corners=False, no antialias."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  src = np.maximum(src, np.float32(0))  # torch clamps negative source coords to 0
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = (src - i0.astype(np.float32)).astype(np.float32)
  return i0, i1, np.float32(1) - w1, w1


def _lerp_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
  i0, i1, w0, w1 = _bilinear_taps(x.shape[axis], out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  w0, w1 = jnp.asarray(w0).reshape(shape), jnp.asarray(w1).reshape(shape)
  return jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1


def torch_bilinear_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(B,H,W,C) -> (B,h,w,C) as `F.interpolate(mode='bilinear', align_corners=False)`.

  Gather + lerp (not `jax.image.resize`, which antialiases when downsampling) so the taps equal
  torch's for any ratio; exact in float32 whatever the matmul precision of the backend.
  """
  if x.shape[1] != size[0]:
    x = _lerp_axis(x, 1, size[0])
  if x.shape[2] != size[1]:
    x = _lerp_axis(x, 2, size[1])
  return x


# --------------------------------------------------------------------------- blocks
def _avg_pool_same(x):
  # TF's average pool: padded zeros are not counted (pytorch-fid's count_include_pad=False patch).
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x):
  return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class ConvBN(nn.Module):
  """BasicConv2d (conv, BN eps 1e-3, ReLU) with BN folded into the conv bias."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, self.strides, padding=((ph, ph), (pw, pw)),
                kernel_init=nn.initializers.he_normal(), precision=_HIGHEST, name="conv")(x)
    return nn.relu(x)


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = ConvBN(64, name="branch1x1")(x)
    b5 = ConvBN(48, name="branch5x5_1")(x)
    b5 = ConvBN(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = ConvBN(64, name="branch3x3dbl_1")(x)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = ConvBN(self.pool_features, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction 35 -> 17."""

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(384, (3, 3), (2, 2), name="branch3x3")(x)
    bd = ConvBN(64, name="branch3x3dbl_1")(x)
    bd = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = ConvBN(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = ConvBN(192, name="branch1x1")(x)
    b7 = ConvBN(c, name="branch7x7_1")(x)
    b7 = ConvBN(c, **row, name="branch7x7_2")(b7)
    b7 = ConvBN(192, **col, name="branch7x7_3")(b7)
    bd = ConvBN(c, name="branch7x7dbl_1")(x)
    bd = ConvBN(c, **col, name="branch7x7dbl_2")(bd)
    bd = ConvBN(c, **row, name="branch7x7dbl_3")(bd)
    bd = ConvBN(c, **col, name="branch7x7dbl_4")(bd)
    bd = ConvBN(192, **row, name="branch7x7dbl_5")(bd)
    bp = ConvBN(192, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Grid reduction 17 -> 8."""

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(192, name="branch3x3_1")(x)
    b3 = ConvBN(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
    b7 = ConvBN(192, name="branch7x7x3_1")(x)
    b7 = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = ConvBN(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(nn.Module):
  """`pool='avg'`: FIDInceptionE_1 (TF avg pool); `pool='max'`: FIDInceptionE_2 (the TF graph's
  max pool, kept because the released weights were trained with it)."""
  pool: str = "avg"

  @nn.compact
  def __call__(self, x):
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = ConvBN(320, name="branch1x1")(x)
    b3 = ConvBN(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([ConvBN(384, **row, name="branch3x3_2a")(b3),
                          ConvBN(384, **col, name="branch3x3_2b")(b3)], axis=-1)
    bd = ConvBN(448, name="branch3x3dbl_1")(x)
    bd = ConvBN(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([ConvBN(384, **row, name="branch3x3dbl_3a")(bd),
                          ConvBN(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_same(x)
    elif self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))  # pads with -inf, as torch
    else:
      raise ValueError(f"InceptionE.pool must be 'avg' or 'max', got {self.pool!r}")
    bp = ConvBN(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Logits(nn.Module):
  """fc 2048 -> 1008; returns (pool3 @ W, pool3 @ W + b)."""
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.num_classes))
    bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
    z = jnp.dot(x, kernel, precision=_HIGHEST)
    return z, z + bias


class FIDInceptionV3(nn.Module):
  """Input (B,H,W,3) float in [0,1]; bilinear-resized to 299 and mapped to [-1,1] inside."""
  resize_input: bool = True

  @nn.compact
  def __call__(self, x) -> dict[str, jax.Array]:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"FIDInceptionV3 expects NHWC images (B,H,W,3), got shape {x.shape}")
    x = x.astype(jnp.float32)
    if self.resize_input:
      x = torch_bilinear_resize(x, (INPUT_SIZE, INPUT_SIZE))
    x = 2 * x - 1
    x = ConvBN(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)
    x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_valid(x)
    x = ConvBN(80, name="Conv2d_3b_1x1")(x)
    x = ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_valid(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    logits, logits_fc = Logits(name="fc")(pool3)
    return {"pool3": pool3, "logits": logits, "logits_fc": logits_fc}


# --------------------------------------------------------------------------- functional API
def to_unit_float(images: jax.Array) -> jax.Array:
  """uint8 [0,255] -> float32 [0,1]; floats are taken to be in [0,1] already."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"inception images must be uint8 or float in [0,1], got dtype {images.dtype}")
  return images.astype(jnp.float32)


@jax.jit
def inception_features(params: Any, images: jax.Array) -> dict[str, jax.Array]:
  """{'pool3': (B,2048), 'logits': (B,1008) (ADM IS, no bias), 'logits_fc': (B,1008)}.

  `images`: NHWC uint8 or float in [0,1], any size (resized to 299). Pure and jitted: shard the
  batch over the mesh and jit propagates the sharding.
  """
  return FIDInceptionV3().apply({"params": params}, to_unit_float(images))


def _init_shapes(key):
  # Param shapes do not depend on the spatial size; lazy_init traces without computing.
  return FIDInceptionV3().lazy_init(
      key, jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))["params"]


def param_shapes() -> Any:
  """Param tree of ShapeDtypeStructs (no compute), used by the importer to check names/shapes."""
  return jax.eval_shape(_init_shapes, jax.random.key(0))


def random_inception_params(key: jax.Array) -> Any:
  """He-normal kernels and zero biases, for when the real weights file is absent.

  One normal draw sliced per leaf (per-leaf initializers compile ~40 programs: ~30 s on CPU).
  Scores from these are smoke tests only: callers must label them (RANDOM_WEIGHTS_WARNING,
  `rae_jax.interop.inception_weights.load_fid_inception_or_random`).
  """
  flat = traverse_util.flatten_dict(param_shapes(), sep="/")
  total = sum(int(np.prod(v.shape)) for k, v in flat.items() if k.endswith("kernel"))
  noise = np.asarray(jax.random.normal(key, (total,), jnp.float32))
  out, offset = {}, 0
  for name in sorted(flat):
    shape = flat[name].shape
    if name.endswith("bias"):
      out[name] = jnp.zeros(shape, jnp.float32)
      continue
    size, fan_in = int(np.prod(shape)), int(np.prod(shape[:-1]))
    gain = 1.0 if name.startswith("fc/") else 2.0  # ReLU trunk keeps its variance; fc is linear
    out[name] = jnp.asarray(noise[offset:offset + size].reshape(shape) * np.sqrt(gain / fan_in))
    offset += size
  return traverse_util.unflatten_dict(out, sep="/")
