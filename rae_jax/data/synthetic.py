"""Embedded, procedurally generated, class-labelled image dataset (no download).

Each class has its own hue and shape (disk, square, triangle, ring, cross, stripes)
drawn on a dim textured background; position, size, hue jitter and background vary
per example. Class identity is therefore visible at a glance, which is what the demo
needs to show that class-conditional samples follow their label. Every example is a
pure function of (seed, index), rendered on demand at any resolution.
"""
from __future__ import annotations

import colorsys

import numpy as np

SHAPES = ("disk", "square", "triangle", "ring", "cross", "stripes")


def _mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
  """Shape mask on centred coordinates (u right, v down), half-size r."""
  if shape == "disk":
    return u * u + v * v <= r * r
  if shape == "square":
    return np.maximum(np.abs(u), np.abs(v)) <= r * 0.85
  if shape == "triangle":
    return (v <= r * 0.8) & (v >= 2.0 * np.abs(u) - r)
  if shape == "ring":
    d = np.sqrt(u * u + v * v)
    return (d <= r) & (d >= 0.55 * r)
  if shape == "cross":
    return (np.maximum(np.abs(u), np.abs(v)) <= r) & (np.minimum(np.abs(u), np.abs(v)) <= 0.3 * r)
  if shape == "stripes":
    inside = np.maximum(np.abs(u), np.abs(v)) <= r
    return inside & (np.mod(np.floor((u + v) / (0.35 * r)), 2) == 0)
  raise ValueError(f"unknown synthetic shape {shape!r}")


class SyntheticSource:
  """`num_examples` images of `resolution`^2 pixels; label = index mod num_classes (balanced)."""

  kind = "image"

  def __init__(self, num_examples: int, num_classes: int, resolution: int, seed: int = 0):
    for field, value in (("data.synthetic_size", num_examples), ("data.num_classes", num_classes),
                         ("data.image_size", resolution)):
      if int(value) <= 0:
        raise ValueError(f"{field} must be positive for the synthetic dataset, got {value}")
    self.num_examples = int(num_examples)
    self.num_classes = int(num_classes)
    self.resolution = int(resolution)
    self.seed = int(seed)
    grid = (np.arange(self.resolution, dtype=np.float32) + 0.5) / self.resolution
    self._y, self._x = np.meshgrid(grid, grid, indexing="ij")

  def __len__(self) -> int:
    return self.num_examples

  def label(self, index: int) -> int:
    return int(index) % self.num_classes

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"synthetic index {index} out of range [0, {self.num_examples})")
    label = self.label(index)
    rng = np.random.default_rng([self.seed, index])
    x, y = self._x, self._y
    # Background: dark, low-contrast gradient plus fine noise (texture for the decoder to learn).
    base = rng.uniform(0.08, 0.22, size=3).astype(np.float32)
    tilt = rng.uniform(-0.06, 0.06, size=(2, 3)).astype(np.float32)
    img = base + x[..., None] * tilt[0] + y[..., None] * tilt[1]
    img = img + rng.normal(0.0, 0.02, size=img.shape).astype(np.float32)
    # Foreground: the class's shape in (jittered) class colour.
    hue = (label / self.num_classes + rng.uniform(-0.15, 0.15) / self.num_classes) % 1.0
    colour = np.asarray(colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 0.95), rng.uniform(0.85, 1.0)),
                        np.float32)
    r = rng.uniform(0.22, 0.32)
    cx, cy = rng.uniform(0.5 - (0.45 - r), 0.5 + (0.45 - r), size=2)
    mask = _mask(SHAPES[label % len(SHAPES)], x - cx, y - cy, r)
    shade = 1.0 - 0.25 * (y - cy + r) / (2 * r)  # A soft top-lit gradient on the object.
    img = np.where(mask[..., None], colour * shade[..., None], img)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8), label

  def describe(self, index: int) -> str:
    return f"synthetic example {index}"
