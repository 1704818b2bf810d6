"""Input pipeline throughput: can one host feed the accelerators? Prints a table.

  python bench/data.py                                # 500 JPEGs, 2 workers, batch 64
  python bench/data.py --workers 8 --step_rate 2.5    # cores a host needs at 2.5 steps/s x 1024

Generates --num_images real-size JPEGs once (ImageNet-like: sides 300-500 px, q=90, textured
content so they do not compress to nothing) under --folder, then times decode -> centre crop
(the official ADM `center_crop_arr`) -> random flip at 256 px:
  ours      rae_jax.data DataIterator over image_folder (threads), the path main.py trains from
            (uint8 batches; the float [0, 1] conversion runs on the device), and the same with
            the float conversion on the host;
  official  torch DataLoader over an ImageFolder-equivalent Dataset with the official transforms
            (PIL decode, center_crop_arr, RandomHorizontalFlip, ToTensor) and the same worker
            count. torchvision itself does not import beside this venv's torch build, so its
            ImageFolder / transforms are re-stated with PIL + numpy, op for op.
Both are reported per worker (core); plus latent-cache read throughput (16x16x768 float32
latents, the cache stage 2 reads with use_latent_cache) and the cores a host needs to feed
--step_rate steps/s at --global_batch images per step (per host: divide by hosts).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rae_jax import data as data_lib  # noqa: E402
from rae_jax.data.latent_cache import LatentCacheSource, LatentCacheWriter  # noqa: E402


def make_jpegs(folder: str, n: int, classes: int = 10, seed: int = 0) -> None:
  """ImageNet-like JPEGs: random sides in [300, 500], smooth colour fields + noise, q=90."""
  done = os.path.join(folder, f".done_{n}")
  if os.path.exists(done):
    return
  rng = np.random.default_rng(seed)
  for i in range(n):
    h, w = (int(v) for v in rng.integers(300, 501, 2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f = rng.uniform(0.005, 0.05, (3, 2))
    ph = rng.uniform(0, 6.28, 3)
    img = np.stack([127 + 100 * np.sin(f[c, 0] * yy + f[c, 1] * xx + ph[c]) for c in range(3)], -1)
    img += rng.normal(0, 20, (h, w, 3))
    d = os.path.join(folder, f"class_{i % classes:03d}")
    os.makedirs(d, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
        os.path.join(d, f"img_{i:05d}.JPEG"), quality=90)
  open(done, "w").close()


def bench_ours(folder: str, workers: int, batch: int, batches: int, size: int,
               image_dtype=np.uint8) -> float:
  """uint8 is what main.py's training steps take (converted to float on the device)."""
  source = data_lib.make_source(dict(source="image_folder", path=folder, image_size=size))
  it = data_lib.DataIterator(source, batch, seed=0, process_index=0, process_count=1,
                             train=True, flip=True, prefetch=max(2, workers),
                             num_threads=workers, image_dtype=image_dtype)
  next(it)  # thread start-up
  t = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  assert b["image"].shape == (batch, size, size, 3)
  dt = time.perf_counter() - t
  it.close()
  return batches * batch / dt


def _center_crop_arr(pil_image, image_size):
  """ADM/official center_crop_arr: BOX-halve while >= 2x, BICUBIC to the short side, crop."""
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                               resample=Image.BICUBIC)
  arr = np.array(pil_image)
  y = (arr.shape[0] - image_size) // 2
  x = (arr.shape[1] - image_size) // 2
  return Image.fromarray(arr[y:y + image_size, x:x + image_size])


def bench_official(folder: str, workers: int, batch: int, batches: int, size: int) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils.data import DataLoader, Dataset  # pylint: disable=g-import-not-at-top

  classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
  samples = [(os.path.join(folder, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(folder, c)))]

  class ImageFolderLike(Dataset):  # torchvision.datasets.ImageFolder + the official transform
    def __len__(self):
      return len(samples)

    def __getitem__(self, i):
      path, label = samples[i]
      with open(path, "rb") as f:
        img = Image.open(f).convert("RGB")  # torchvision's pil_loader
      img = _center_crop_arr(img, size)
      if torch.rand(1) < 0.5:  # RandomHorizontalFlip
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
      x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)  # ToTensor
      return x, label

  loader = DataLoader(ImageFolderLike(), batch_size=batch, shuffle=True, num_workers=workers,
                      drop_last=True, persistent_workers=workers > 0, pin_memory=False)
  n, t = 0, None
  while n < batches + 1:
    for x, _ in loader:
      if t is None:  # first batch: worker start-up
        t = time.perf_counter()
      else:
        n += 1
      if n >= batches:
        break
    if n >= batches:
      break
  assert x.shape == (batch, 3, size, size)
  return batches * batch / (time.perf_counter() - t)


def bench_latents(workdir: str, n: int, batch: int, batches: int, workers: int) -> float:
  d = os.path.join(workdir, "latents")
  if not os.path.isdir(d):
    w = LatentCacheWriter(d)
    rng = np.random.default_rng(0)
    for s in range(0, n, 128):
      k = min(128, n - s)
      w.append(rng.standard_normal((k, 2, 16, 16, 768), np.float32),
               rng.integers(0, 1000, k), np.arange(s, s + k))
  it = data_lib.DataIterator(LatentCacheSource(d), batch, seed=0, process_index=0,
                             process_count=1, train=True, prefetch=max(2, workers),
                             num_threads=workers)
  next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  dt = time.perf_counter() - t
  it.close()
  return batches * batch / dt


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "rae_bench_jpegs"))
  ap.add_argument("--num_images", type=int, default=500)
  ap.add_argument("--workers", type=int, default=2, help="threads (ours) = DataLoader workers")
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--batches", type=int, default=6)
  ap.add_argument("--image_size", type=int, default=256)
  ap.add_argument("--latents", type=int, default=1024, help="latent-cache examples (0: skip)")
  ap.add_argument("--skip_official", action="store_true")
  ap.add_argument("--step_rate", type=float, default=0.0,
                  help="train steps/s to feed (e.g. xl_step's); 0: only per-core numbers")
  ap.add_argument("--global_batch", type=int, default=1024)
  args = ap.parse_args()

  t = time.perf_counter()
  make_jpegs(os.path.join(args.folder, "images"), args.num_images)
  print(f"{args.num_images} JPEGs in {args.folder}/images ({time.perf_counter() - t:.1f} s to "
        f"make); {os.cpu_count()} CPUs; {args.workers} workers, batch {args.batch}")
  rows = []
  ours = bench_ours(os.path.join(args.folder, "images"), args.workers, args.batch, args.batches,
                    args.image_size)
  rows.append(("images/s, ours (DataIterator, threads, uint8 as main.py trains)", ours,
               ours / args.workers))
  ours_f32 = bench_ours(os.path.join(args.folder, "images"), args.workers, args.batch,
                        args.batches, args.image_size, np.float32)
  rows.append(("images/s, ours with float32 [0, 1] on the host", ours_f32,
               ours_f32 / args.workers))
  official = None
  if not args.skip_official:
    official = bench_official(os.path.join(args.folder, "images"), args.workers, args.batch,
                              args.batches, args.image_size)
    rows.append(("images/s, official (DataLoader, processes)", official,
                 official / args.workers))
  if args.latents:
    lat = bench_latents(args.folder, args.latents, args.batch, args.batches * 4, args.workers)
    rows.append(("latents/s, latent cache (16x16x768 f32)", lat, lat / args.workers))
  print(f"| pipeline ({args.image_size}px decode+crop+flip) | total | per worker |")
  print("|---|---|---|")
  for name, total, per in rows:
    print(f"| {name} | {total:.1f} | {per:.1f} |")
  if official:
    print(f"| ours / official per worker | {ours / official:.2f}x | |")
  if args.step_rate:
    need = args.step_rate * args.global_batch
    print(f"\nTo feed {args.step_rate:g} steps/s x {args.global_batch} images = {need:.0f} img/s: "
          f"{need / (ours / args.workers):.1f} cores decoding JPEGs (ours)"
          + (f", {need / (official / args.workers):.1f} (official)" if official else "")
          + (f"; {need / (lat / args.workers):.2f} cores from the latent cache" if args.latents
             else "") + " (divide by hosts).")


if __name__ == "__main__":
  main()
