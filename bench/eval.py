"""Evaluation throughput: sharded generation (DiTDH-S on 768x16x16 latents + RAE decode) and FID
Inception features, in images/s, and how both scale over 1..8 devices.

  python bench/eval.py                                    # full sizes (an accelerator)
  python bench/eval.py --steps=2 --per_device_batch=1 --decoder=tiny --devices=1,8  # CPU smoke

Weights are random (throughput does not depend on them). On CPU, 8 forced host devices share the
same cores, so the 1 -> 8 column shows sharding overhead rather than speed-up.
"""
import argparse
import os
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rae_jax import presets  # noqa: E402
from rae_jax.eval import sample_shards, scoring  # noqa: E402
from rae_jax.pipeline import builders, image_generator, loaders  # noqa: E402
from rae_jax.train import mesh as mesh_lib  # noqa: E402

DECODERS = {"XL": presets.vit_decoder("XL"), "B": presets.vit_decoder("B"),
            "tiny": presets.vit_decoder("B").copy_and_resolve_references()}
DECODERS["tiny"].update(decoder_hidden_size=128, decoder_num_hidden_layers=2,
                        decoder_num_attention_heads=4, decoder_intermediate_size=256)


def bench_config(args):
  c = presets.base_config()
  c.compute_dtype = args.dtype
  # The frozen encoder is never run when sampling: a 1-layer toy with DINOv2-B's latent shape.
  c.encoder.name, c.encoder.path = "toy_vit", ""
  c.encoder.input_size, c.encoder.patch_size = 256, 16
  c.encoder.hidden_size, c.encoder.depth, c.encoder.num_heads = 768, 1, 12
  c.decoder = DECODERS[args.decoder]
  c.decoder.patch_size = 16
  c.model = presets.ditdh_s()
  c.sampler.num_steps = args.steps
  c.guidance.method, c.guidance.scale = "cfg", args.cfg_scale
  c.eval.per_device_batch = args.per_device_batch
  return c


def timed(fn, repeats):
  fn()  # compile + warm up
  t = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - t) / repeats


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
  p.add_argument("--per_device_batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=50, help="Euler ODE steps")
  p.add_argument("--cfg_scale", type=float, default=1.0, help="!= 1 doubles the model batch")
  p.add_argument("--decoder", default="XL", choices=sorted(DECODERS))
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--batches", type=int, default=2, help="global batches per measurement")
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--no_inception", action="store_true")
  args = p.parse_args()

  config = bench_config(args)
  rae, rae_vars = builders.build_rae(config, "/nonexistent", with_stats=False)
  rae_vars = {"decoder": rae_vars["decoder"]}
  model = builders.build_stage2_model(config.model, builders.compute_dtype(config))
  params = jax.jit(lambda k: builders.init_stage2_params(model, rae.latent_shape, k))(
      jax.random.PRNGKey(0))
  gen = image_generator.make_generate(config, model, rae, image_generator.transport_for(config,
                                                                          rae.latent_shape))
  print(f"backend {jax.default_backend()}, {jax.device_count()} devices | DiTDH-S "
        f"{rae.latent_shape}, decoder {args.decoder} -> {rae.image_size}px, {args.steps} steps, "
        f"cfg {args.cfg_scale}, {args.dtype}, per-device batch {args.per_device_batch}")
  rows = []
  for k in [int(d) for d in args.devices.split(",")]:
    if k > jax.device_count():
      print(f"skipping {k} devices (only {jax.device_count()})")
      continue
    mesh = mesh_lib.make_mesh(1, -1, devices=jax.devices()[:k])
    sampler = sample_shards.ShardedSampler(gen, mesh, args.per_device_batch)
    n = sampler.global_batch * args.batches
    labels = (np.arange(n) % 1000).astype(np.int32)
    key = sample_shards.eval_seed_key(0)
    p_k = jax.device_put(params, mesh_lib.replicated(mesh))
    v_k = jax.device_put(rae_vars, mesh_lib.replicated(mesh))
    out = {}
    t_gen = timed(lambda: out.update(x=sampler(p_k, None, v_k, labels, np.arange(n), key)),
                  args.repeats)
    row = [k, sampler.global_batch, n / t_gen]
    if not args.no_inception:
      scorer = loaders.load_scorer(mesh, "", args.per_device_batch)
      reader = scoring.array_reader(out["x"])
      t_inc = timed(lambda: scoring.extract(scorer, reader, n, max_kept=0), args.repeats)
      row += [n / t_inc, n / (t_gen + t_inc)]
    rows.append(row)

  head = ["devices", "global batch", "generate img/s"]
  if not args.no_inception:
    head += ["inception img/s", "gen+inception img/s"]
  print(" | ".join(f"{h:>18}" for h in head))
  base = rows[0][-1] if rows else 1.0
  for r in rows:
    cells = [f"{r[0]:>18d}", f"{r[1]:>18d}"] + [f"{v:>18.2f}" for v in r[2:]]
    print(" | ".join(cells) + f"   (x{r[-1] / base:.2f} vs {rows[0][0]} device)")


if __name__ == "__main__":
  main()
