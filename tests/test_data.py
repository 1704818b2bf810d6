"""rae_jax.data: sources, ADM transforms, deterministic/resumable/sharded iterator, latent cache."""
import json
import logging as pylogging
import sys

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from rae_jax.data import (CenterCropped, DataIterator, ImageFolderSource, LatentCacheSource,
                          LatentCacheWriter, SyntheticSource, TfdsSource, cached_indices,
                          center_crop_arr, epoch_permutation, make_source, to_global)


class IndexSource:
  """4x4 images that encode their index (top-left pixel) and orientation (left column only)."""

  kind = "image"
  num_classes = 7

  def __init__(self, n, bad=()):
    self.n, self.bad = n, set(bad)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if i in self.bad:
      raise OSError(f"corrupt example {i}")
    img = np.zeros((4, 4, 3), np.uint8)
    img[:, 0, 0] = i
    img[:, 0, 1] = 255
    return img, i % 7


def decode(batch):
  """(indices, flipped) back from IndexSource images."""
  x = np.rint(batch["image"] * 255).astype(int)
  flipped = x[:, 0, -1, 1] == 255
  idx = np.where(flipped, x[:, 0, -1, 0], x[:, 0, 0, 0])
  return idx, flipped


def take(it, n):
  return [next(it) for _ in range(n)]


# --- image folder ----------------------------------------------------------------------------

def _write_folder(root):
  rng = np.random.default_rng(0)
  for cls, sizes in (("b_dog", [(20, 30), (24, 24), (40, 18)]), ("a_cat", [(16, 16), (30, 22)])):
    (root / cls / "sub").mkdir(parents=True)
    for k, (h, w) in enumerate(sizes):
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{k}.png")
  Image.fromarray(rng.integers(0, 256, (12, 20), dtype=np.uint8)).save(root / "a_cat/sub/gray.PNG")
  (root / "a_cat" / "notes.txt").write_text("not an image")
  (root / "a_cat" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")  # index 2
  good = root / "b_dog" / "0.png"
  (root / "b_dog" / "1_truncated.png").write_bytes(good.read_bytes()[:60])  # index 6


def test_image_folder_labels_order_and_corrupt_files_are_skipped(tmp_path, caplog):
  _write_folder(tmp_path)
  src = ImageFolderSource(str(tmp_path))
  names = [p[len(str(tmp_path)) + 1:] for p in src.paths]
  assert names == ["a_cat/0.png", "a_cat/1.png", "a_cat/broken.jpg", "a_cat/sub/gray.PNG",
                   "b_dog/0.png", "b_dog/1.png", "b_dog/1_truncated.png", "b_dog/2.png"]
  assert list(src.labels) == [0, 0, 0, 0, 1, 1, 1, 1] and src.num_classes == 2
  img, label = src[3]
  assert img.shape == (12, 20, 3) and img.dtype == np.uint8 and label == 0

  cropped = CenterCropped(src, 8)
  bad = {2, 6}
  caplog.set_level(pylogging.WARNING)
  for threads in (0, 2):
    it = DataIterator(cropped, 4, seed=3, process_index=0, process_count=1,
                      prefetch=2 if threads else 0, num_threads=threads)
    batches = take(it, 2 * it.steps_per_epoch)  # Two full epochs.
    it.close()
    assert all(b["image"].shape == (4, 8, 8, 3) and b["label"].shape == (4,) for b in batches)
    assert it.num_skipped == 2 * len(bad)  # Each bad file is met once per epoch.
    assert it.skipped_indices == sorted(bad)
    assert it.metrics() == {"data/num_skipped": 4}
    # The replacement is the next readable index, with the flip of the bad one's position.
    perm = epoch_permutation(3, 0, len(src))
    expect = [i + 1 if i in bad else i for i in perm[:4]]
    got = np.stack([center_crop_arr(src[i][0], 8) for i in expect])
    first = np.rint(batches[0]["image"] * 255).astype(np.uint8)
    for k in range(4):
      assert np.array_equal(first[k], got[k]) or np.array_equal(first[k], got[k][:, ::-1])
    if threads == 0:
      reference = batches
    else:  # Threads change nothing.
      for a, b in zip(reference, batches):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
  logs = caplog.text
  assert "broken.jpg" in logs and "1_truncated.png" in logs and "replaced" in logs


def test_image_folder_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ImageFolderSource(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="no class sub-folders"):
    ImageFolderSource(str(tmp_path))


# --- order, resume, sharding -----------------------------------------------------------------

def test_order_is_deterministic_and_restore_resumes_exactly():
  src = IndexSource(40)
  kw = dict(process_index=0, process_count=1, prefetch=3, num_threads=2)
  with DataIterator(src, 8, seed=5, **kw) as a, DataIterator(src, 8, seed=5, **kw) as b:
    full = take(a, 13)  # steps_per_epoch = 5: crosses two epoch boundaries.
    again = take(b, 13)
  for x, y in zip(full, again):
    np.testing.assert_array_equal(x["image"], y["image"])
  epochs = [np.sort(np.concatenate([decode(x)[0] for x in full[e * 5:(e + 1) * 5]]))
            for e in range(2)]
  assert all(np.array_equal(e, np.arange(40)) for e in epochs)  # Each epoch a permutation.
  assert not np.array_equal(decode(full[0])[0], decode(full[5])[0])  # Reshuffled per epoch.
  with DataIterator(src, 8, seed=6, **kw) as c:
    assert not np.array_equal(decode(next(c))[0], decode(full[0])[0])

  for cut in (3, 5, 7):  # Mid-epoch, at a boundary, in epoch 1.
    with DataIterator(src, 8, seed=5, **kw) as it:
      take(it, cut)
      state = json.loads(json.dumps(it.state()))
      assert state == {"epoch": cut // 5, "step_in_epoch": cut % 5}
    with DataIterator(src, 8, seed=5, **kw) as resumed:
      resumed.restore(state)
      for x, y in zip(take(resumed, 13 - cut), full[cut:]):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
  with DataIterator(src, 8, seed=5, **kw) as it:  # Restore with batches already in flight.
    take(it, 9)
    it.restore({"epoch": 0, "step_in_epoch": 2})
    np.testing.assert_array_equal(next(it)["image"], full[2]["image"])
    with pytest.raises(ValueError, match="step_in_epoch"):
      it.restore({"epoch": 0, "step_in_epoch": 5})
    with pytest.raises(ValueError, match="epoch"):
      it.restore({"step": 3})


@pytest.mark.parametrize("n", [48, 53])
def test_process_shards_are_disjoint_cover_the_epoch_and_match_one_process(n):
  src, gb = IndexSource(n), 12
  def run(p, count):
    with DataIterator(src, gb, seed=1, process_index=p, process_count=count, prefetch=0) as it:
      assert it.steps_per_epoch == n // gb and it.local_batch_size == gb // count
      return [decode(b)[0] for b in take(it, 2 * it.steps_per_epoch)]
  single = run(0, 1)
  for count in (2, 3, 4):
    shards = [run(p, count) for p in range(count)]
    for step in range(len(single)):
      # Concatenated process slices equal the one-process global batch (C5).
      np.testing.assert_array_equal(np.concatenate([s[step] for s in shards]), single[step])
    for epoch in range(2):
      spe = n // gb
      per_proc = [np.concatenate(s[epoch * spe:(epoch + 1) * spe]) for s in shards]
      seen = np.concatenate(per_proc)
      assert len(np.unique(seen)) == len(seen) == spe * gb  # Disjoint, no repeats.
      perm = epoch_permutation(1, epoch, n)
      assert set(seen) == set(perm[:spe * gb])  # Covers the epoch but the dropped remainder.
  if n % gb == 0:
    assert set(np.concatenate(single[:n // gb])) == set(range(n))
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    DataIterator(src, 10, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    DataIterator(IndexSource(5), 8, process_index=0, process_count=1)


# --- transforms ------------------------------------------------------------------------------

def test_center_crop_arr_follows_the_adm_recipe():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (300, 517, 3), dtype=np.uint8)  # PIL size (517, 300) -> 64.
  pil = Image.fromarray(a)
  pil = pil.resize((258, 150), Image.BOX)  # min 300 >= 128: halve.
  pil = pil.resize((129, 75), Image.BOX)   # min 150 >= 128: halve again; 75 < 128 stops.
  pil = pil.resize((110, 64), Image.BICUBIC)  # scale 64/75: round(129 * 64/75) = 110.
  expect = np.asarray(pil)[0:64, 23:87]  # crop x = (110 - 64) // 2 = 23.
  np.testing.assert_array_equal(center_crop_arr(a, 64), expect)
  np.testing.assert_array_equal(center_crop_arr(Image.fromarray(a), 64), expect)

  b = rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)  # No BOX step: bicubic to (80, 64).
  expect = np.asarray(Image.fromarray(b).resize((80, 64), Image.BICUBIC))[:, 8:72]
  np.testing.assert_array_equal(center_crop_arr(b, 64), expect)
  g = rng.integers(0, 256, (40, 33), dtype=np.uint8)  # Grayscale -> RGB.
  out = center_crop_arr(g, 16)
  assert out.shape == (16, 16, 3) and np.array_equal(out[..., 0], out[..., 2])


def test_flips_are_deterministic_per_example_and_off_for_eval():
  src = IndexSource(64)
  def flips(seed, count=1, p=0, **kw):
    with DataIterator(src, 16, seed=seed, process_index=p, process_count=count, prefetch=0,
                      **kw) as it:
      out = [decode(b) for b in take(it, 8)]
    return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])
  idx, f = flips(2)
  idx2, f2 = flips(2)
  np.testing.assert_array_equal(f, f2)
  assert 0.3 < f.mean() < 0.7
  # A given (epoch, index) flips the same way whichever process reads it.
  parts = [flips(2, count=4, p=p) for p in range(4)]
  multi_idx = np.stack([p[0].reshape(8, 4) for p in parts], 1).reshape(-1)
  multi_f = np.stack([p[1].reshape(8, 4) for p in parts], 1).reshape(-1)
  np.testing.assert_array_equal(multi_idx, idx)
  np.testing.assert_array_equal(multi_f, f)
  assert not np.array_equal(f[:64][np.argsort(idx[:64])], f[64:][np.argsort(idx[64:])])
  _, none = flips(2, flip=False)
  assert not none.any()
  idx_eval, f_eval = flips(2, train=False)
  assert not f_eval.any() and np.array_equal(idx_eval, np.tile(np.arange(64), 2))


# --- synthetic -------------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_classes_are_distinguishable():
  a, b = SyntheticSource(80, 8, 24), SyntheticSource(80, 8, 24)
  for i in (0, 13, 79):
    xa, la = a[i]
    xb, lb = b[i]
    assert xa.shape == (24, 24, 3) and xa.dtype == np.uint8 and la == lb == i % 8
    np.testing.assert_array_equal(xa, xb)
  assert not np.array_equal(a[0][0], SyntheticSource(80, 8, 24, seed=1)[0][0])
  assert SyntheticSource(4, 2, 57)[3][0].shape == (57, 57, 3)
  # Class identity is visible: mean colour of the brightest pixels (the object) per class.
  means = []
  for c in range(8):
    imgs = np.stack([a[i][0] for i in range(c, 80, 8)]).astype(np.float32) / 255
    fg = imgs.reshape(-1, 3)[imgs.reshape(-1, 3).max(-1) > 0.5]
    means.append(fg.mean(0))
  means = np.stack(means)
  dist = np.linalg.norm(means[:, None] - means[None], axis=-1) + np.eye(8)
  assert dist.min() > 0.1, dist
  # Within a class the object colour is consistent (well below the between-class distance).
  for c in (0, 3):
    per_image = []
    for i in range(c, 80, 8):
      px = a[i][0].reshape(-1, 3).astype(np.float32) / 255
      per_image.append(px[px.max(-1) > 0.5].mean(0))
    spread = np.linalg.norm(np.stack(per_image) - means[c], axis=-1).max()
    assert spread < dist.min() / 2, (c, spread, dist.min())
  cfg = ml_collections.ConfigDict(dict(source="synthetic", path="", tfds_name="", split="train",
                                       image_size=24, num_classes=8, synthetic_size=80))
  src = make_source(cfg)
  assert len(src) == 80 and src.num_classes == 8
  np.testing.assert_array_equal(src[5][0], a[5][0])


def test_make_source_validates_fields(tmp_path):
  cfg = ml_collections.ConfigDict(dict(source="imagenet", path="", tfds_name="", split="train",
                                       image_size=8, num_classes=2, synthetic_size=4))
  with pytest.raises(ValueError, match="data.source"):
    make_source(cfg)
  cfg.source = "image_folder"
  with pytest.raises(ValueError, match="data.path"):
    make_source(cfg)
  _write_folder(tmp_path)
  cfg.path = str(tmp_path)
  assert make_source(cfg)[0][0].shape == (8, 8, 3)
  cfg.num_classes = 1
  with pytest.raises(ValueError, match="data.num_classes"):
    make_source(cfg)


# --- tfds adapter ----------------------------------------------------------------------------

def test_tfds_adapter_with_a_fake_random_access_source():
  import io
  rng = np.random.default_rng(1)
  arrays = [rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8) for i in range(4)]
  buf = io.BytesIO()
  Image.fromarray(arrays[1]).save(buf, format="PNG")
  records = [{"image": arrays[0], "label": np.int64(3)},
             {"image": buf.getvalue(), "label": 1},  # Undecoded (SkipDecoding) bytes.
             {"image": b"garbage", "label": 0},
             {"image": arrays[3], "label": 2}]
  src = TfdsSource("fake", "train", data_source=records, num_classes=4)
  assert len(src) == 4 and src.num_classes == 4
  np.testing.assert_array_equal(src[0][0], arrays[0])
  np.testing.assert_array_equal(src[1][0], arrays[1])
  assert src[0][1] == 3
  with pytest.raises(Exception):
    src[2]
  with pytest.raises(KeyError, match="'label'"):
    TfdsSource("fake", "train", data_source=[{"image": arrays[0]}])[0]
  it = DataIterator(CenterCropped(src, 8), 4, seed=0, process_index=0, process_count=1,
                    prefetch=0)
  assert next(it)["image"].shape == (4, 8, 8, 3) and it.num_skipped == 1
  assert "tfds fake[train] record 2" in src.describe(2)


def test_tfds_missing_package_error_names_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # As if not installed.
  with pytest.raises(ImportError, match="tensorflow-datasets.*rae_jax\\[tfds\\]"):
    TfdsSource("imagenet2012", "train")


# --- latent cache ----------------------------------------------------------------------------

def test_latent_cache_writer_reader_and_flip_choice(tmp_path):
  rng = np.random.default_rng(0)
  n, shape = 24, (2, 2, 3)
  lat = rng.normal(size=(n, 2) + shape).astype(np.float32)
  labels = np.arange(n) % 5
  # Two processes write interleaved index sets, shards of 4 examples.
  for p in (0, 1):
    w = LatentCacheWriter(str(tmp_path), process_index=p, dtype=np.float32)  # exact compare
    mine = np.arange(p, n, 2)
    for k in range(0, len(mine), 4):
      sel = mine[k:k + 4]
      w.append(lat[sel], labels[sel], sel)
  # A shard killed mid-write (latents but no meta) and a temp file are ignored.
  np.save(tmp_path / "latents-p0000-000099.npy", lat[:2])
  (tmp_path / "meta-p0000-000100.npz.tmp-1").write_bytes(b"partial")
  np.testing.assert_array_equal(cached_indices(str(tmp_path)), np.arange(n))
  w = LatentCacheWriter(str(tmp_path), process_index=0)
  assert w._next == 3  # Continues after its complete shards.
  with pytest.raises(ValueError, match=r"\(n, 2, h, w, C\)"):
    w.append(lat[:, 0], labels, np.arange(n))

  src = LatentCacheSource(str(tmp_path))
  assert len(src) == n and src.latent_shape == shape and src.num_classes == 5
  for i in (0, 7, 23):
    np.testing.assert_array_equal(src[i][0], lat[i])
    assert src[i][1] == labels[i]
  with DataIterator(src, 8, seed=4, process_index=0, process_count=1, prefetch=2) as it:
    batch = next(it)
    assert set(batch) == {"latent", "label"} and batch["latent"].shape == (8,) + shape
    idx, flips = it.batch_indices(0, 0)
  np.testing.assert_array_equal(batch["label"], labels[idx])
  np.testing.assert_array_equal(batch["latent"], lat[idx, flips.astype(int)])
  assert 0 < flips.sum() < 8

  class PairsOnly:  # A latent source without the read_flip fast path.
    kind = "latent"
    __len__ = src.__len__
    __getitem__ = src.__getitem__
  with DataIterator(PairsOnly(), 8, seed=4, process_index=0, process_count=1, prefetch=0) as it:
    np.testing.assert_array_equal(next(it)["latent"], batch["latent"])
  # Same flip choice as the image path for the same (seed, epoch, index).
  with DataIterator(IndexSource(n), 8, seed=4, process_index=0, process_count=1,
                    prefetch=0) as img_it:
    img_idx, img_flipped = decode(next(img_it))
  np.testing.assert_array_equal(img_idx, idx)
  np.testing.assert_array_equal(img_flipped, flips)


# --- prefetch shutdown and global arrays -----------------------------------------------------

def test_all_unreadable_fails_clearly_and_keeps_state():
  it = DataIterator(IndexSource(16, bad=range(16)), 4, seed=0, process_index=0, process_count=1,
                    prefetch=2, num_threads=2)
  with pytest.raises(RuntimeError, match="consecutive unreadable.*corrupt example"):
    next(it)
  assert it.state() == {"epoch": 0, "step_in_epoch": 0}
  it.close()


def test_close_stops_workers():
  it = DataIterator(SyntheticSource(64, 4, 16), 8, seed=0, process_index=0, process_count=1,
                    prefetch=4, num_threads=2)
  next(it)
  it.close()
  it.close()
  assert it._pool._shutdown and not it._pending
  with pytest.raises(RuntimeError, match="closed"):
    next(it)


def test_to_global_builds_a_sharded_global_array():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  with DataIterator(SyntheticSource(32, 4, 8), 16, seed=0, prefetch=0) as it:
    local = next(it)
  batch = to_global(local, sharding)
  assert batch["image"].shape == (16, 8, 8, 3) and batch["label"].shape == (16,)
  for key in ("image", "label"):
    assert batch[key].sharding == sharding
    assert len(batch[key].addressable_shards) == 8
    for shard in batch[key].addressable_shards:
      assert shard.data.shape[0] == 2
      np.testing.assert_array_equal(np.asarray(shard.data), local[key][shard.index])
  np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])
  with pytest.raises(ValueError, match="batch\\['label'\\]"):
    to_global({"label": np.zeros((3,), np.int32)}, sharding)


def test_adjacent_bad_examples_count_once_each():
  """Three adjacent bad files are three replacements per epoch (was 3+2+1=6: attempts)."""
  bad = {4, 5, 6}
  it = DataIterator(IndexSource(16, bad), 16, seed=0, process_index=0, process_count=1,
                    prefetch=0, flip=False)
  batch = next(it)
  assert it.num_skipped == 3 and it.metrics() == {"data/num_skipped": 3}
  idx = sorted(int(v) for v in batch["image"][:, 0, 0, 0] * 255 + 0.5)
  assert idx.count(7) == 4 and not bad & set(idx)  # each bad one replaced by index 7
  next(it)
  assert it.num_skipped == 6  # second epoch: the same three again
  it.close()
