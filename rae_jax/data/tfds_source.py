"""tensorflow-datasets by name and split, through tfds' random-access (ArrayRecord) data sources.

`tfds.data_source` gives `len()` + `__getitem__` over ArrayRecord files without a
tf.data graph, which is exactly what our index-based iterator needs (per-process
slices and resumable order come from the index, not from the reader). Images are
read undecoded (`SkipDecoding`) and decoded with PIL in our worker threads, so the
pixels equal the image-folder path (the official code decodes with PIL too).

The dataset must be prepared in ArrayRecord format, e.g.
`tfds build imagenet2012 --file_format=array_record --manual_dir=...`.
tensorflow-datasets is an optional extra: `pip install 'rae_jax[tfds]'`.
"""
from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
from PIL import Image

from rae_jax.data.transforms import as_rgb_uint8


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "data.source='tfds' needs the package 'tensorflow-datasets' (and 'array_record'), which is "
        "not installed: pip install 'rae_jax[tfds]'") from e
  return tfds


def decode_image(value: Any, what: str) -> np.ndarray:
  """Encoded bytes (JPEG/PNG/...) or an already decoded array -> (H,W,3) uint8."""
  if isinstance(value, np.ndarray) and value.dtype.kind in ("S", "O") and value.ndim == 0:
    value = value.item()
  if isinstance(value, (bytes, bytearray, memoryview)):
    with Image.open(io.BytesIO(value)) as im:
      return np.asarray(im.convert("RGB"))
  return as_rgb_uint8(value, what)


class TfdsSource:
  """Adapter: random-access tfds data source of feature dicts -> (uint8 HWC image, label)."""

  kind = "image"

  def __init__(self, name: str, split: str, *, data_dir: str | None = None,
               image_key: str = "image", label_key: str = "label", download: bool = False,
               data_source: Sequence[Any] | None = None, num_classes: int | None = None):
    """`data_source` injects any random-access sequence of dicts (tests, custom readers)."""
    self.name, self.split = name, split
    self.image_key, self.label_key = image_key, label_key
    self._num_classes = num_classes
    if data_source is None:
      if not name:
        raise ValueError("data.tfds_name is empty; set it to a tfds dataset name, e.g. imagenet2012")
      tfds = _import_tfds()
      data_source = tfds.data_source(
          name, split=split, data_dir=data_dir or None, download=download,
          decoders={image_key: tfds.decode.SkipDecoding()})
      if self._num_classes is None:
        try:
          feature = tfds.builder(name, data_dir=data_dir or None).info.features[label_key]
          self._num_classes = int(feature.num_classes)
        except Exception:  # pylint: disable=broad-except
          pass  # Not a ClassLabel; fall back to the config's num_classes.
    self.data_source = data_source

  @property
  def num_classes(self) -> int | None:
    return self._num_classes

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    record = self.data_source[int(index)]
    for key in (self.image_key, self.label_key):
      if key not in record:
        raise KeyError(f"tfds {self.name}[{self.split}] record {index} has no feature '{key}' "
                       f"(features: {sorted(record)})")
    image = decode_image(record[self.image_key], self.describe(index))
    return image, int(np.asarray(record[self.label_key]))

  def describe(self, index: int) -> str:
    return f"tfds {self.name}[{self.split}] record {index}"
