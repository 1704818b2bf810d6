"""The Source protocol and `make_source(config.data)`.

A source is random access: `len(source)` and `source[i] -> (example, int label)`,
where the example is a uint8 (H, W, 3) image (`kind == 'image'`) or a float
(2, h, w, C) pair of cached latents [image, mirror] (`kind == 'latent'`). Reading
may raise for a corrupt example; the iterator skips and counts it.
"""
from __future__ import annotations

from typing import Any, Protocol

from absl import logging

from rae_jax.data.image_folder import ImageFolderSource
from rae_jax.data.latent_cache import LatentCacheSource
from rae_jax.data.synthetic import SyntheticSource
from rae_jax.data.tfds_source import TfdsSource
from rae_jax.data.transforms import CenterCropped

SOURCES = ("synthetic", "image_folder", "tfds", "latents")


class Source(Protocol):
  kind: str

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> tuple[Any, int]: ...


def _field(cfg, name: str, default=None):
  value = cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)
  return default if value is None else value


def _require(cfg, name: str):
  value = _field(cfg, name)
  if value in (None, ""):
    raise ValueError(f"data.{name} must be set for data.source='{_field(cfg, 'source')}'")
  return value


def _check_classes(source, cfg) -> None:
  want, got = _field(cfg, "num_classes"), getattr(source, "num_classes", None)
  if want and got and int(got) > int(want):
    raise ValueError(f"data.num_classes={want} but the {_field(cfg, 'source')} dataset has {got} "
                     "classes; labels would overflow the class embedding")
  if want and got and int(got) < int(want):
    logging.info("data: dataset has %d classes, data.num_classes=%d", got, want)


def make_source(cfg) -> Source:
  """Build the source named by `cfg.source` (config.data: source, path, tfds_name, split, ...)."""
  kind = _field(cfg, "source", "synthetic")
  if kind == "synthetic":
    source = SyntheticSource(num_examples=_require(cfg, "synthetic_size"),
                             num_classes=_require(cfg, "num_classes"),
                             resolution=_require(cfg, "image_size"),
                             seed=_field(cfg, "synthetic_seed", 0))
  elif kind == "image_folder":
    source = CenterCropped(ImageFolderSource(_require(cfg, "path")), _require(cfg, "image_size"))
  elif kind == "tfds":
    source = CenterCropped(
        TfdsSource(_require(cfg, "tfds_name"), _field(cfg, "split", "train"),
                   # data.data_dir; data.path is accepted for configs written before it existed.
                   data_dir=_field(cfg, "data_dir") or _field(cfg, "path") or None),
        _require(cfg, "image_size"))
  elif kind == "latents":
    source = LatentCacheSource(_require(cfg, "path"), num_classes=_field(cfg, "num_classes"))
  else:
    raise ValueError(f"data.source must be one of {SOURCES}, got {kind!r}")
  _check_classes(source, cfg)
  return source
