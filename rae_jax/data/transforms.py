"""Image transforms of the official recipe: ADM center crop, horizontal flip, uint8 -> [0,1].

The official stage-2 / stats pipelines (`train.py`, `calculate_stat.py`) run
`center_crop_arr -> RandomHorizontalFlip -> ToTensor` on PIL images. We keep the
resize in PIL so the pixels match the reference bit for bit (PIL's BOX and BICUBIC
filters are not what `jax.image.resize` computes), and do the rest in numpy.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image


# 16-bit grayscale (PNG, TIFF, PGM): PIL's convert("RGB") clips these to 255 instead of scaling
# (a 16-bit PNG comes out almost white), and torchvision's ImageFolder loader does the same.
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
  """PIL image of any mode -> 8-bit RGB. 16-bit (and 32-bit integer "I", which PIL uses for
  16-bit PNGs) samples are scaled from [0, 65535] to [0, 255] with rounding, not clipped."""
  if image.mode in _HIGH_BIT_MODES:
    wide = np.asarray(image).astype(np.int64)
    eight = ((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(eight, mode="L").convert("RGB")
  return image if image.mode == "RGB" else image.convert("RGB")


def as_rgb_uint8(image: Any, what: str = "image") -> np.ndarray:
  """(H,W), (H,W,1), (H,W,3) or (H,W,4) uint8 / PIL image -> (H,W,3) uint8."""
  if isinstance(image, Image.Image):
    return np.asarray(to_rgb(image))
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    raise ValueError(f"{what}: expected uint8 pixels, got dtype {arr.dtype}")
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
    raise ValueError(f"{what}: expected an (H,W,C) image with C in (1,3,4), got shape {arr.shape}")
  if arr.shape[-1] == 1:
    arr = np.repeat(arr, 3, axis=-1)
  elif arr.shape[-1] == 4:  # Drop alpha, as PIL's convert('RGB') does.
    arr = arr[..., :3]
  return arr


def center_crop_arr(image: Any, image_size: int) -> np.ndarray:
  """ADM center crop: halve with BOX while >= 2x the target, BICUBIC to it, crop the middle.

  Returns an (image_size, image_size, 3) uint8 array. The repeated 2x BOX steps are
  what ADM (and the RAE code) use to anti-alias large downscales before the single
  bicubic resize whose short side lands exactly on `image_size`.
  """
  if isinstance(image, Image.Image):
    pil = to_rgb(image)
  else:
    arr = as_rgb_uint8(image)
    if arr.shape[0] == arr.shape[1] == image_size:
      return np.ascontiguousarray(arr)  # PIL would return an identical copy.
    pil = Image.fromarray(arr)
  while min(pil.size) >= 2 * image_size:
    pil = pil.resize((pil.size[0] // 2, pil.size[1] // 2), resample=Image.BOX)
  scale = image_size / min(pil.size)
  pil = pil.resize((round(pil.size[0] * scale), round(pil.size[1] * scale)),
                   resample=Image.BICUBIC)
  out = np.asarray(pil)
  top = (out.shape[0] - image_size) // 2
  left = (out.shape[1] - image_size) // 2
  return np.ascontiguousarray(out[top:top + image_size, left:left + image_size])


def hflip(image: np.ndarray) -> np.ndarray:
  """Mirror an (H,W,C) image left-right (torchvision's RandomHorizontalFlip when it fires)."""
  return image[:, ::-1]


def to_unit_float(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """uint8 -> float32 in [0,1] as torchvision's ToTensor (a float32 division by 255)."""
  return np.divide(image, np.float32(255.0), out=out, dtype=np.float32)


class CenterCropped:
  """Wraps an image source so every example comes out ADM-center-cropped to `image_size`."""

  kind = "image"

  def __init__(self, source, image_size: int):
    if int(image_size) <= 0:
      raise ValueError(f"data.image_size must be positive, got {image_size}")
    self.source = source
    self.image_size = int(image_size)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int):
    image, label = self.source[index]
    return center_crop_arr(image, self.image_size), label

  @property
  def num_classes(self) -> int:
    return self.source.num_classes

  def describe(self, index: int) -> str:
    describe = getattr(self.source, "describe", None)
    return describe(index) if describe else f"example {index}"
