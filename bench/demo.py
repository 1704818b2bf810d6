"""The README's demo, timed per mode, with a check that its samples show their class.

  python bench/demo.py                           # the README's main command in a fresh workdir
  python bench/demo.py --workdir=/tmp/d --keep   # keep the workdir (samples.png to look at)
  python bench/demo.py --score_only=/tmp/rae_demo/samples.npz

Prints the CPU, wall time per mode (from the log's mode banners), the logged steps/s of both
stages, and how many samples are class-true: the synthetic classes differ by hue (class k has
hue k / num_classes, data/synthetic.py), so a sample counts when the circular mean hue of its
bright, saturated pixels (the object; the background is dark) is nearest to its own class's hue.
Training images score 100% this way; an untrained model's samples score about chance (10%).
"""
from __future__ import annotations

import argparse
import colorsys
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def class_true(images: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Per image: is the hue of its object nearest to its class's hue? (False: no object.)"""
  rgb = images.astype(np.float32) / 255.0
  mx, mn = rgb.max(-1), rgb.min(-1)
  sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
  hsv = np.vectorize(lambda r, g, b: colorsys.rgb_to_hsv(r, g, b)[0])
  hue = hsv(rgb[..., 0], rgb[..., 1], rgb[..., 2])
  out = []
  for h, s, v, y in zip(hue, sat, mx, labels):
    obj = (s > 0.5) & (v > 0.5)
    if obj.sum() < 4:
      out.append(False)
      continue
    angle = np.angle(np.mean(np.exp(2j * np.pi * h[obj])))  # circular mean
    centres = np.arange(num_classes) / num_classes
    dist = np.abs(np.angle(np.exp(2j * np.pi * (angle / (2 * np.pi) - centres))))
    out.append(int(np.argmin(dist)) == int(y))
  return np.asarray(out)


def score(npz_path: str, num_classes: int = 10) -> tuple[int, int]:
  with np.load(npz_path) as f:
    ok = class_true(f["arr_0"], f["arr_1"], num_classes)
  return int(ok.sum()), len(ok)


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
  except OSError:
    return "unknown CPU"
  model = re.search(r"model name\s*:\s*(.*)", text)
  isa = "AVX-512" if re.search(r"\bavx512f\b", text) else "AVX2" if "avx2" in text else "?"
  if "--xla_cpu_max_isa=AVX2" in os.environ.get("XLA_FLAGS", ""):
    isa += " (XLA capped at AVX2)"
  return f"{model.group(1).strip() if model else 'unknown CPU'}, {os.cpu_count()} cores, {isa}"


def run_demo(workdir: str, extra: list[str]) -> tuple[float, dict, dict, str]:
  cmd = [sys.executable, "main.py", "--config=configs/demo.py", f"--workdir={workdir}", *extra]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  total = time.perf_counter() - t0
  if proc.returncode != 0:
    sys.exit(f"demo failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
  log = proc.stderr
  # absl lines start with e.g. "I1202 13:45:01.123456": mode banners give the per-mode split.
  stamps = []
  for m in re.finditer(r"^\w\d{4} (\d\d):(\d\d):(\d\d\.\d+).*===== all: (\w+) =====", log, re.M):
    h, mi, s, mode = m.groups()
    stamps.append((mode, int(h) * 3600 + int(mi) * 60 + float(s)))
  last = re.findall(r"^\w\d{4} (\d\d):(\d\d):(\d\d\.\d+)", log, re.M)[-1]
  end = int(last[0]) * 3600 + int(last[1]) * 60 + float(last[2])
  per_mode = {mode: (stamps[i + 1][1] if i + 1 < len(stamps) else end) - t
              for i, (mode, t) in enumerate(stamps)}
  sps = {}
  for stage in ("stage1", "stage2"):
    rates = [float(x) for x in re.findall(rf"\[{stage}\] step \d+/\d+ .*?\| ([\d.]+) steps/s", log)]
    if rates:
      sps[stage] = float(np.median(rates))
  return total, per_mode, sps, log


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", default="")
  p.add_argument("--keep", action="store_true")
  p.add_argument("--score_only", default="")
  p.add_argument("overrides", nargs="*", help="extra main.py flags, e.g. --config.x=y")
  args = p.parse_args()
  if args.score_only:
    ok, n = score(args.score_only)
    print(f"class-true samples: {ok}/{n}")
    return
  workdir = args.workdir or tempfile.mkdtemp(prefix="rae_demo_bench_")
  total, per_mode, sps, log = run_demo(workdir, args.overrides)
  with open(os.path.join(workdir, "demo.log"), "w") as f:
    f.write(log)
  ok, n = score(os.path.join(workdir, "samples.npz"))
  print(f"demo on {cpu_name()}")
  print("| what | value |\n|---|---|")
  print(f"| wall time, process start to exit | {total:.0f} s ({total / 60:.1f} min) |")
  for mode, seconds in per_mode.items():
    print(f"| {mode} | {seconds:.0f} s |")
  for stage, rate in sps.items():
    print(f"| {stage} median steps/s | {rate:.1f} |")
  print(f"| class-true samples (hue of the object) | {ok}/{n} |")
  if not args.keep and not args.workdir:
    import shutil
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
