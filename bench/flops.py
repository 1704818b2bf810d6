"""FLOP accounting and MFU for the bench scripts (imported by them; not a benchmark itself).

MFU = model FLOPs per step / (step time x peak FLOP/s of the devices used). Model FLOPs come
from XLA (`compiled.cost_analysis()['flops']`, per device, times the device count) and are
cross-checked against the analytic count 2 x matmul params x tokens (forward; x3 for a train
step) + the attention matmuls 4 x T^2 x width per layer and sample (x3 for a train step).
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

# Dense peak TFLOP/s per chip (vendor numbers, no sparsity). 'float32' is what a float32 matmul
# runs at under JAX's default precision: one bf16 pass on TPU, TF32 tensor cores on A100/H100.
PEAK_TFLOPS = {
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},  # v5e
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v5": {"bfloat16": 459.0, "float32": 459.0},  # v5p reports 'TPU v5'
    "TPU v6 lite": {"bfloat16": 918.0, "float32": 918.0},  # v6e (Trillium)
    "A100": {"bfloat16": 312.0, "float32": 156.0},  # float32: TF32
    "H100": {"bfloat16": 989.0, "float32": 494.0},  # SXM; float32: TF32
    "H200": {"bfloat16": 989.0, "float32": 494.0},
}
_CPU_PEAK: dict[str, float] = {}


def measured_cpu_peak(dtype: str = "float32", n: int = 1536, repeats: int = 5) -> float:
  """TFLOP/s of a large jitted matmul on one CPU device: the 'peak' a CPU run is measured on."""
  if dtype not in _CPU_PEAK:
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    best = float("inf")
    for _ in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(f(a))
      best = min(best, time.perf_counter() - t)
    _CPU_PEAK[dtype] = 2 * n ** 3 / best / 1e12
  return _CPU_PEAK[dtype]


def peak_tflops(dtype: str, device: Optional[Any] = None) -> tuple[float, str]:
  """(peak TFLOP/s of one device, where the number comes from)."""
  device = device or jax.devices()[0]
  kind = device.device_kind
  if device.platform == "cpu":
    return measured_cpu_peak(dtype), "measured CPU matmul"
  for name, peaks in PEAK_TFLOPS.items():
    if kind.startswith(name) or f" {name}" in kind:
      return peaks[dtype], f"{name} spec"
  return float("nan"), f"unknown device {kind!r}"


def xla_flops(compiled, num_devices: int = 1) -> float:
  """FLOPs of one call of a compiled executable: XLA's per-device count x the devices."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return (float(cost.get("flops", float("nan"))) if cost else float("nan")) * num_devices


def matmul_params(params, per_sample: Iterable[str] = ()) -> tuple[int, int]:
  """(params of kernels applied to every token, of kernels applied once per sample).

  `per_sample`: path substrings of modules that see one vector per sample (time/class embedders,
  adaLN of per-sample conditions). Biases, norms and tables are not matmul params.
  """
  per_tok, per_smp = 0, 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = "/".join(str(getattr(k, "key", k)) for k in path)
    if not keys.endswith("kernel"):
      continue
    if any(s in keys for s in per_sample):
      per_smp += int(np.prod(leaf.shape))
    else:
      per_tok += int(np.prod(leaf.shape))
  return per_tok, per_smp


def analytic_flops(batch: int, tokens: int, per_token_params: int, per_sample_params: int,
                   attn_layers: Iterable[tuple[int, int]], train: bool) -> float:
  """2 N T B matmuls + 4 T^2 D B per attention layer ((tokens, width) pairs); x3 if train."""
  fwd = 2.0 * batch * (tokens * per_token_params + per_sample_params)
  fwd += sum(4.0 * batch * t * t * d for t, d in attn_layers)
  return 3.0 * fwd if train else fwd


def mfu(flops: float, seconds: float, dtype: str, num_devices: int = 1) -> tuple[float, str]:
  peak, source = peak_tflops(dtype)
  return flops / seconds / (peak * 1e12 * num_devices), source


def flops_rows(row, name: str, compiled, analytic: float, seconds: float, dtype: str,
               num_devices: int = 1) -> None:
  """Adds 'FLOPs (XLA / analytic)', 'TFLOP/s achieved' and 'MFU' rows via row(name, metric, v)."""
  xf = xla_flops(compiled, num_devices)
  row(name, "GFLOPs/step XLA / analytic", f"{xf / 1e9:.1f} / {analytic / 1e9:.1f} "
      f"({xf / analytic:.2f}x)")
  use = xf if np.isfinite(xf) and xf > 0 else analytic
  row(name, "TFLOP/s achieved", f"{use / seconds / 1e12:.3f}")
  util, source = mfu(use, seconds, dtype, num_devices)
  row(name, "MFU", f"{100 * util:.1f} % of {source} ({dtype})")
