"""ImageNet-layout image folder: `<root>/<class>/**/<image>`, labels as torchvision ImageFolder.

The official scripts read `--data-path` with `torchvision.datasets.ImageFolder`; we
reproduce its indexing (sorted class folders -> 0..K-1, files sorted within each
class, same extensions, same RGB conversion) so label ids and example indices agree.
"""
from __future__ import annotations

import os

import numpy as np
from absl import logging
from PIL import Image

from rae_jax import storage
from rae_jax.data.transforms import to_rgb

# torchvision.datasets.folder.IMG_EXTENSIONS (matched case-insensitively).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def find_classes(root: str) -> list[str]:
  """Sorted names of the class sub-folders of `root`."""
  if not storage.isdir(root):
    raise FileNotFoundError(f"image folder (data.path) does not exist or is not a directory: {root}")
  if storage.is_remote(root):
    classes = sorted(n for n in storage.listdir(root) if storage.isdir(os.path.join(root, n)))
  else:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
  if not classes:
    raise FileNotFoundError(
        f"image folder {root} has no class sub-folders (expected ImageNet layout <root>/<class>/<img>)")
  return classes


def list_images(root: str, classes: list[str]) -> tuple[list[str], np.ndarray]:
  """(paths, labels) in torchvision's order: class by class, os.walk sorted, files sorted."""
  paths, labels = [], []
  empty = []
  for label, name in enumerate(classes):
    n0 = len(paths)
    for dirpath, _, fnames in sorted(storage.walk(os.path.join(root, name))):
      for fname in sorted(fnames):
        if fname.lower().endswith(IMG_EXTENSIONS):
          paths.append(os.path.join(dirpath, fname))
          labels.append(label)
    if len(paths) == n0:
      empty.append(name)
  if empty:
    logging.warning("image folder %s: %d class folder(s) contain no images: %s",
                    root, len(empty), empty[:10])
  return paths, np.asarray(labels, np.int32)


class ImageFolderSource:
  """Random access over an image folder; decoding errors propagate (the iterator skips them)."""

  kind = "image"

  def __init__(self, root: str):
    self.root = os.fspath(root)
    self.classes = find_classes(self.root)
    self.paths, self.labels = list_images(self.root, self.classes)
    if not self.paths:
      raise FileNotFoundError(f"image folder {self.root} contains no images with extensions "
                              f"{IMG_EXTENSIONS}")
    logging.info("image folder %s: %d images, %d classes", self.root, len(self.paths),
                 len(self.classes))

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    # convert() forces the full decode here, so truncated files fail now, not later.
    path = self.paths[index]
    with (storage.open(path, "rb") if storage.is_remote(path) else open(path, "rb")) as f, \
        Image.open(f) as im:
      image = np.asarray(to_rgb(im))  # 16-bit scaled, not clipped
    return image, int(self.labels[index])

  def describe(self, index: int) -> str:
    return self.paths[index]
