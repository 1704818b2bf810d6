"""tensorflow-datasets by name and split, through tfds' random-access (ArrayRecord) data sources.

`builder.as_data_source` gives `len()` + `__getitem__` over ArrayRecord files without a
tf.data graph, which is exactly what our index-based iterator needs (per-process
slices and resumable order come from the index, not from the reader). Images are
read undecoded (`SkipDecoding`) and decoded with PIL in our worker threads, so the
pixels equal the image-folder path (the official code decodes with PIL too).

Reading needs only `tensorflow-datasets` and `array_record` (the `tfds` extra), not
tensorflow. Preparing ImageNet (`tfds build imagenet2012 --file_format=array_record
--manual_dir=...`), tfds' `ImageFolder` builder and TFRecord files need tensorflow
(`pip install tensorflow-cpu`, the `tfds_prepare` extra); a custom
`GeneratorBasedBuilder` writing `array_record` does not.
"""
from __future__ import annotations

import io
import os
import re
import threading
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
      return as_rgb_uint8(im, what)  # 16-bit PNGs scaled, not clipped
  return as_rgb_uint8(value, what)


def _open_array_record(tfds, name: str, split: str, data_dir: str | None, image_key: str):
  """(random-access source, builder) of a prepared dataset; clear errors for the common misses."""
  where = data_dir or "the default tfds data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f"tfds dataset '{name}' not found under {where} (data.tfds_name / data.data_dir): "
        f"{type(e).__name__}: {e}") from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"tfds dataset '{name}' is not prepared in {builder.data_dir} (data.data_dir={data_dir!r}): "
        f"prepare it once with `tfds build {name} --file_format=array_record --data_dir=<dir>` "
        "(ImageNet also needs --manual_dir with the ILSVRC2012 tars, and tensorflow for the "
        "build: pip install 'rae_jax[tfds_prepare]')")
  formats = {f.value for f in builder.info.available_file_formats()} or {
      str(getattr(builder.info.file_format, "value", builder.info.file_format))}
  if "array_record" not in formats:
    raise ValueError(
        f"tfds dataset '{name}' in {builder.data_dir} is prepared as {sorted(formats)}, but "
        "data.source='tfds' reads ArrayRecord (random access, no tensorflow). Convert it once "
        f"with `tfds convert_format --dataset_version_dir={builder.data_dir} "
        f"--out_file_format=array_record --out_dir=<new_dir>/{name}/{builder.info.version}` "
        "(reading TFRecord needs tensorflow: pip install 'rae_jax[tfds_prepare]') and point "
        "data.data_dir at <new_dir>, or rebuild with "
        f"`tfds build {name} --file_format=array_record`")
  missing = [part for part in re.split(r"\s*\+\s*", split)
             if part.split("[")[0].strip() not in builder.info.splits]
  if missing:
    raise ValueError(f"tfds dataset '{name}' has no split {split!r} (data.split / "
                     f"data.eval_split); it has {sorted(builder.info.splits)}")
  decoders = ({image_key: tfds.decode.SkipDecoding()}
              if image_key in builder.info.features else None)
  source = builder.as_data_source(split=split, decoders=decoders, file_format="array_record")
  if "://" in str(builder.data_dir) and len(source):
    _probe_remote_read(source, name, str(builder.data_dir))
  return source, builder


# How long the first record of a dataset on gs:// may take before the run stops (seconds).
REMOTE_PROBE_TIMEOUT_S = float(os.environ.get("RAE_REMOTE_DATA_PROBE_S", "60"))


def _probe_remote_read(source, name: str, data_dir: str) -> None:
  """Reads record 0 of a dataset on object storage once, with a deadline, before training.

  tfds reads its metadata from gs:// through etils, but the records go to array_record's C++
  reader, whose open-source builds (riegeli's FdReader) cannot open gs:// objects: they fail
  ("open() failed: No such file or directory", google/array_record#120), or, in builds with
  a GCS reader that cannot reach its endpoint, wait without an answer. Either way the run must
  stop at start with the fix, not hang in the loader threads."""
  result: dict = {}

  def read():
    try:
      source[0]
      result["ok"] = True
    except BaseException as e:  # pylint: disable=broad-except
      result["error"] = e

  thread = threading.Thread(target=read, name="tfds-remote-probe", daemon=True)
  thread.start()
  thread.join(REMOTE_PROBE_TIMEOUT_S)
  if result.get("ok"):
    return
  try:
    import array_record  # pylint: disable=g-import-not-at-top
    version = getattr(array_record, "__version__", "")
  except ImportError:
    version = ""
  why = (f"{type(result['error']).__name__}: {str(result['error']).strip().splitlines()[0]}"
         if "error" in result else
         f"no answer within {REMOTE_PROBE_TIMEOUT_S:.0f} s (RAE_REMOTE_DATA_PROBE_S)")
  raise OSError(
      f"tfds dataset '{name}' in {data_dir} (data.data_dir): its ArrayRecord files cannot be read "
      f"from object storage by this array_record{' ' + version if version else ''} ({why}); "
      "the metadata reads through etils, the records through array_record's own file layer, "
      "which reads local paths. Copy the prepared dataset to local disk (e.g. `gcloud storage cp "
      f"-r {data_dir.rstrip('/')}/{name} /data/tfds/`) and set data.data_dir=/data/tfds, or mount "
      "the bucket with gcsfuse and point data.data_dir at the mount")


class TfdsSource:
  """Adapter: random-access tfds data source of feature dicts -> (uint8 HWC image, label)."""

  kind = "image"

  def __init__(self, name: str, split: str, *, data_dir: str | None = None,
               image_key: str = "image", label_key: str = "label",
               data_source: Sequence[Any] | None = None, num_classes: int | None = None):
    """`data_source` injects any random-access sequence of dicts (tests, custom readers)."""
    self.name, self.split = name, split
    self.image_key, self.label_key = image_key, label_key
    self._num_classes = num_classes
    if data_source is None:
      if not name:
        raise ValueError("data.tfds_name is empty; set it to a tfds dataset name, e.g. imagenet2012")
      data_source, builder = _open_array_record(_import_tfds(), name, split, data_dir, image_key)
      features = builder.info.features
      for key in (image_key, label_key):
        if key not in features:
          raise KeyError(f"tfds dataset '{name}' has no feature '{key}' (features: "
                         f"{sorted(features)})")
      if self._num_classes is None and hasattr(features[label_key], "num_classes"):
        self._num_classes = int(features[label_key].num_classes)
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
