"""tensorflow-datasets for real: a tiny dataset built by tfds itself (ArrayRecord, no tensorflow).

tfds' `ImageFolder` builder and `imagenet2012` need tensorflow to build; a GeneratorBasedBuilder
writing `array_record` does not, and reading (`as_data_source`) never does. The builder skips
registration, so `make_source` opens the files as a user's prepared ImageNet would be opened.
"""
import json
import logging as pylogging
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from rae_jax import config_checks, presets
from rae_jax.data import DataIterator, make_source, resolve_num_threads, to_global, usable_cores
from rae_jax.data import pipeline as pipeline_lib

tfds = pytest.importorskip("tensorflow_datasets")  # The CI installs the 'tfds' extra.

NAME = "rae_tiny_images"
CLASSES = ["a_cat", "b_dog", "c_owl"]
SIZE = 8


def _write_images(root):
  """12 images in image-folder layout: mixed sizes, PNG and JPEG, one greyscale."""
  rng = np.random.default_rng(0)
  for c, cls in enumerate(CLASSES):
    (root / cls).mkdir(parents=True)
    for k in range(4):
      h, w = 10 + 3 * k, 12 + 2 * c
      if (c, k) == (1, 2):
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(root / cls / f"{k}.png")
      elif k % 2:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            root / cls / f"{k}.jpg", quality=90)
      else:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{k}.png")


class _TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Encoded files as they are, ClassLabel by folder name, the file name for matching."""

  VERSION = tfds.core.Version("1.0.0")
  root = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=CLASSES),
        "file_name": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for path in sorted(self.root.glob("*/*")):
      name = f"{path.parent.name}/{path.name}"
      yield name, {"image": str(path), "label": path.parent.name, "file_name": name}


_TinyImages.name = NAME


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """(image folder root, tfds data_dir) of the same 12 images."""
  base = tmp_path_factory.mktemp("tfds")
  _write_images(base / "images")
  _TinyImages.root = base / "images"
  builder = _TinyImages(data_dir=str(base / "tfds"), file_format="array_record")
  builder.download_and_prepare()
  assert list((base / "tfds" / NAME / "1.0.0").glob(f"{NAME}-train.array_record-*"))
  return base / "images", base / "tfds"


def _cfg(source, **kw):
  c = ml_collections.ConfigDict(dict(source=source, path="", tfds_name="", split="train",
                                     data_dir="", image_size=SIZE, num_classes=3))
  c.update(kw)
  return c


def _sources(built):
  root, data_dir = built
  return (make_source(_cfg("tfds", tfds_name=NAME, data_dir=str(data_dir))),
          make_source(_cfg("image_folder", path=str(root))))


def test_tfds_built_dataset_reads_like_the_image_folder(built):
  ours, folder = _sources(built)
  assert len(ours) == len(folder) == 12 and ours.num_classes == 3
  records = ours.source.data_source
  by_file = {f"{p.split('/')[-2]}/{p.split('/')[-1]}": i for i, p in enumerate(folder.source.paths)}
  seen = set()
  for i in range(len(ours)):
    name = records[i]["file_name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    image, label = ours[i]
    ref_image, ref_label = folder[by_file[name]]
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, ref_image)  # PIL decode of the same bytes, same crop.
    assert label == ref_label == CLASSES.index(name.split("/")[0])
    seen.add(name)
  assert seen == set(by_file)

  # Through the iterator (index order, no flips): one epoch of each holds the same pixels.
  def epoch(src):
    with DataIterator(src, 4, train=False, process_index=0, process_count=1, prefetch=2,
                      num_threads=2) as it:
      assert it.steps_per_epoch == 3
      batches = [next(it) for _ in range(3)]
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    order = np.lexsort((images.reshape(12, -1).sum(1), labels))
    return images[order], labels[order]
  for a, b in zip(epoch(ours), epoch(folder)):
    np.testing.assert_array_equal(a, b)


def test_tfds_process_slices_devices_and_resume(built):
  ours, _ = _sources(built)
  kw = dict(seed=3, prefetch=2, num_threads=2)
  with DataIterator(ours, 4, process_index=0, process_count=1, **kw) as it:
    single = [next(it) for _ in range(7)]  # steps_per_epoch 3: crosses two epoch boundaries.
  labels = np.concatenate([b["label"] for b in single[:3]])
  assert np.array_equal(np.bincount(labels, minlength=3), [4, 4, 4])  # An epoch visits all 12.

  # Two processes: disjoint halves whose concatenation is the one-process global batch.
  halves = []
  for p in range(2):
    with DataIterator(ours, 4, process_index=p, process_count=2, **kw) as it:
      assert it.local_batch_size == 2
      halves.append([next(it) for _ in range(7)])
  for s in range(7):
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([halves[0][s][key], halves[1][s][key]]), single[s][key])

  # On 2 devices, device p holds exactly process p's slice.
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  batch = to_global(single[4], NamedSharding(mesh, P("data")))
  for shard in batch["image"].addressable_shards:
    p = mesh.devices.tolist().index(shard.device)
    np.testing.assert_array_equal(np.asarray(shard.data), halves[p][4]["image"])

  # Resume mid-epoch 1 from a JSON round-tripped state: the same batches follow.
  with DataIterator(ours, 4, process_index=0, process_count=1, **kw) as it:
    for _ in range(4):
      next(it)
    state = json.loads(json.dumps(it.state()))
  assert state == {"epoch": 1, "step_in_epoch": 1}
  with DataIterator(ours, 4, process_index=0, process_count=1, **kw) as it:
    it.restore(state)
    for want in single[4:]:
      got = next(it)
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["label"], want["label"])


def test_tfds_errors_name_the_problem_and_the_fix(built, tmp_path):
  _, data_dir = built
  # A copy whose metadata says TFRecord (writing real TFRecord shards needs tensorflow).
  shutil.copytree(data_dir / NAME, tmp_path / NAME)
  version_dir = tmp_path / NAME / "1.0.0"
  info = json.loads((version_dir / "dataset_info.json").read_text())
  info["fileFormat"] = "tfrecord"
  (version_dir / "dataset_info.json").write_text(json.dumps(info))
  for f in version_dir.glob("*.array_record-*"):
    f.rename(f.with_name(f.name.replace(".array_record-", ".tfrecord-")))
  with pytest.raises(ValueError, match=r"prepared as \['tfrecord'\].*convert_format.*"
                                       r"--out_file_format=array_record"):
    make_source(_cfg("tfds", tfds_name=NAME, data_dir=str(tmp_path)))
  with pytest.raises(FileNotFoundError, match="no_such_set.*data.tfds_name"):
    make_source(_cfg("tfds", tfds_name="no_such_set", data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match="no split 'validation'.*'train'"):
    make_source(_cfg("tfds", tfds_name=NAME, data_dir=str(data_dir), split="validation"))
  with pytest.raises(ValueError, match="num_classes=2 but the tfds dataset has 3"):
    make_source(_cfg("tfds", tfds_name=NAME, data_dir=str(data_dir), num_classes=2))


# --- loader threads --------------------------------------------------------------------------

def test_num_threads_defaults_to_usable_cores_and_is_logged_once(monkeypatch, caplog):
  assert presets.base_config().data.num_threads == 0
  monkeypatch.setattr(pipeline_lib.os, "sched_getaffinity", lambda pid: {0, 3, 5})
  monkeypatch.setattr(pipeline_lib, "_LOGGED_THREADS", set())
  assert usable_cores() == 3
  with caplog.at_level(pylogging.INFO):
    assert resolve_num_threads(0) == resolve_num_threads(None) == 3
    assert resolve_num_threads(0) == 3
    assert resolve_num_threads(5) == 5  # An explicit count is kept, even above the cores.
  logged = [r.getMessage() for r in caplog.records if "loader threads" in r.getMessage()]
  assert logged == ["data: 3 loader threads (data.num_threads=0: one per usable core; this "
                    "process may use 3 cores)",
                    "data: 5 loader threads (data.num_threads=5; this process may use 3 cores)"]

  class Tiny:
    kind = "image"
    def __len__(self):
      return 4
    def __getitem__(self, i):
      return np.full((2, 2, 3), i, np.uint8), i
  with DataIterator(Tiny(), 2, process_index=0, process_count=1) as it:
    assert it._pool._max_workers == 3  # pylint: disable=protected-access
  with DataIterator(Tiny(), 2, process_index=0, process_count=1, num_threads=1) as it:
    assert it._pool._max_workers == 1  # pylint: disable=protected-access

  c = presets.base_config()
  c.data.num_threads = -1
  with pytest.raises(config_checks.ConfigError, match="config.data.num_threads=-1"):
    config_checks.check(c, "all", num_devices=8)


def test_tfds_on_gcs_stops_at_start_with_the_fix(built, gcs, monkeypatch):
  """A data_dir on gs://: tfds reads the metadata through etils (len works), but array_record's
  C++ reader cannot read the records from object storage (google/array_record#120; against the
  emulator it waits without an answer), so the source stops at start naming the fix instead of
  hanging in the loader threads."""
  import uuid
  from rae_jax import storage
  from rae_jax.data import tfds_source
  _, data_dir = built
  remote = gcs.url(f"tfds-{uuid.uuid4().hex[:8]}")
  storage.copy_tree(str(data_dir), remote)
  monkeypatch.setattr(tfds_source, "REMOTE_PROBE_TIMEOUT_S", 5.0)
  with pytest.raises(OSError, match="cannot be read from object storage") as e:
    make_source(_cfg("tfds", tfds_name=NAME, data_dir=remote))
  assert "gcloud storage cp" in str(e.value) and "gcsfuse" in str(e.value)
  assert remote in str(e.value)
