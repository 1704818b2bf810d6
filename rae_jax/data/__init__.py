"""Data sources, transforms and deterministic, resumable, per-process iterators."""
from rae_jax.data.image_folder import ImageFolderSource
from rae_jax.data.latent_cache import LatentCacheSource, LatentCacheWriter, cached_indices
from rae_jax.data.pipeline import (DataIterator, epoch_flips, epoch_permutation,
                                   resolve_num_threads, to_global, usable_cores)
from rae_jax.data.sources import SOURCES, Source, make_source
from rae_jax.data.synthetic import SyntheticSource
from rae_jax.data.tfds_source import TfdsSource
from rae_jax.data.transforms import CenterCropped, center_crop_arr
