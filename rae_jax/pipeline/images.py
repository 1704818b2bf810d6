"""Image output helpers: uint8 conversion, grids, atomic PNG writes."""
from __future__ import annotations

import numpy as np
from PIL import Image

from rae_jax import storage


def to_uint8(images01) -> np.ndarray:
  """[0,1] float NHWC -> uint8, rounding as torchvision's save_image (x*255+0.5, clamp)."""
  x = np.asarray(images01, np.float32)
  return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
  """(N,H,W,3) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) image."""
  n, h, w, c = images.shape
  cols = max(1, min(cols, n))
  rows = -(-n // cols)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    y, x = pad + r * (h + pad), pad + q * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def write_png(array: np.ndarray, path: str, upscale: int = 1) -> None:
  """Atomic write: a reader never sees half a PNG."""
  img = Image.fromarray(array)
  if upscale > 1:
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
  # storage.write_file (atomic.write_file locally: mkstemp's 0600 would make samples.png
  # unreadable to other users; one upload on gs://).
  storage.write_file(path, lambda f: img.save(f, format="PNG"))
