"""Per-step cost of the jitted Euler sampler vs one bare DiTDH forward, and compile times.

  python bench/sampling.py                       # DiTDH-S, 768x16x16 latents, batch 8, 50 steps
  python bench/sampling.py --batch 1 --steps 4   # small run on a CPU
  python bench/sampling.py --model tiny          # smoke test of the script itself

The sampler is one lax.scan over steps, so its per-step time should be the forward time plus a
few elementwise ops (target: overhead <= 5%). Weights are random: timing does not depend on them.
Also printed: model FLOPs of one forward and of the sampler (XLA's count vs analytic), MFU
against the device's peak (bench/flops.py), and sampled images/s (latents, no decode).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from rae_jax.diffusion import samplers, transport
from rae_jax.models.ditdh import DiTDH

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flops  # noqa: E402  (bench/flops.py)

COMMON = dict(patch_size=1, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
              use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False,
              use_pos_embed=True)
PRESETS = {
    "S": dict(input_size=16, in_channels=768, hidden_size=(384, 2048), depth=(12, 2),
              num_heads=(6, 16)),
    "XL": dict(input_size=16, in_channels=768, hidden_size=(1152, 2048), depth=(28, 2),
               num_heads=(16, 16)),
    "tiny": dict(input_size=4, in_channels=16, hidden_size=(32, 64), depth=(2, 1),
                 num_heads=(2, 4)),
}


def timed(fn, *args, repeats: int):
  """Median wall time of fn(*args) over `repeats` runs after one warm-up, outputs synced."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def compile_timed(fn, *args):
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - t0


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="S", choices=sorted(PRESETS))
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--attention_impl", default="auto", help="xla | cudnn | splash | auto")
  args = ap.parse_args()

  cfg = dict(COMMON, **PRESETS[args.model])
  model = DiTDH(**cfg, dtype=jnp.dtype(args.dtype), attention_impl=args.attention_impl)
  n, c = cfg["input_size"], cfg["in_channels"]
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (args.batch, n, n, c))
  y = jax.random.randint(ky, (args.batch,), 0, cfg["num_classes"])
  t = jnp.full((args.batch,), 0.5)
  params = jax.jit(model.init)(kp, x[:1], t[:1], y[:1])["params"]
  n_params = sum(p.size for p in jax.tree.leaves(params))

  apply_fn = lambda p, x, t, y: model.apply({"params": p}, x, t, y)
  tr = transport.create_transport(
      time_dist_shift=max(1.0, transport.shift_for_dim(n * n * c)))

  def run(params, x, y):
    model_fn = samplers.make_model_fn(apply_fn, params, y)
    return samplers.sample_ode(tr, model_fn, x, sampling_method="euler", num_steps=args.steps + 1)

  fwd, fwd_compile = compile_timed(apply_fn, params, x, t, y)
  smp, smp_compile = compile_timed(run, params, x, y)
  t_fwd = timed(fwd, params, x, t, y, repeats=args.repeats)
  t_smp = timed(smp, params, x, y, repeats=max(1, args.repeats // 2))
  per_step = t_smp / args.steps

  enc_d, dec_d = cfg["depth"]
  per_sample = ["t_embedder", "y_embedder"] + [f"blocks_{i}/adaLN" for i in range(enc_d)]
  tok, n_smp = flops.matmul_params(params, per_sample)
  attn = [(n * n, cfg["hidden_size"][0])] * enc_d + [(n * n, cfg["hidden_size"][1])] * dec_d
  fwd_analytic = flops.analytic_flops(args.batch, n * n, tok, n_smp, attn, train=False)
  # cost_analysis counts a while-loop body once, so the sampler is steps x one forward.
  fwd_xla = flops.xla_flops(fwd)
  smp_xla = args.steps * fwd_xla
  mfu_fwd, source = flops.mfu(fwd_xla, t_fwd, args.dtype)
  mfu_smp, _ = flops.mfu(smp_xla, t_smp, args.dtype)

  dev = jax.devices()[0]
  print(f"DiTDH-{args.model} ({n_params / 1e6:.1f}M params), latents {n}x{n}x{c}, "
        f"batch {args.batch}, {args.dtype}, {len(jax.devices())} x {dev.device_kind}")
  rows = [
      ("compile: forward", f"{fwd_compile:9.2f} s"),
      (f"compile: {args.steps}-step Euler sampler", f"{smp_compile:9.2f} s"),
      ("one forward", f"{t_fwd * 1e3:9.2f} ms"),
      (f"{args.steps}-step Euler total", f"{t_smp * 1e3:9.2f} ms"),
      (f"Euler total / {args.steps}", f"{per_step * 1e3:9.2f} ms"),
      ("per-step overhead vs forward", f"{100 * (per_step - t_fwd) / t_fwd:8.1f} %"),
      ("forward GFLOPs XLA / analytic", f"{fwd_xla / 1e9:.3f} / {fwd_analytic / 1e9:.3f}"),
      (f"sampler GFLOPs ({args.steps} x forward)", f"{smp_xla / 1e9:9.3f}"),
      ("forward MFU", f"{100 * mfu_fwd:8.1f} %"),
      ("sampler MFU", f"{100 * mfu_smp:8.1f} %"),
      ("sampled latents / s", f"{args.batch / t_smp:9.2f}"),
  ]
  print(f"MFU peak: {source}")
  width = max(len(r[0]) for r in rows)
  print(f"| {'measure':<{width}} | {'value':>12} |")
  print(f"|{'-' * (width + 2)}|{'-' * 14}|")
  for name, value in rows:
    print(f"| {name:<{width}} | {value:>12} |")


if __name__ == "__main__":
  main()
