"""Stage 2: DiTDH-XL (28x1152 + 2x2048 head) on DINOv2-B latents 768x16x16, ImageNet 256px.

Official configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml: Linear path, velocity
prediction, logit-normal(0,1) time shifted by sqrt(196608/4096); AdamW 2e-4 (0.9, 0.95), linear
warmup 40 epochs (not from zero), linear decay to 2e-5 at epoch 800, 1400 epochs, batch 1024,
clip 1.0, EMA 0.9995, label dropout 0.1. Paper: gFID 1.51 unguided, 1.13 with autoguidance
(80 epochs already ~2.2 unguided).

  python main.py --config=configs/stage2_ditdh_xl_256.py --workdir=$W --mode=train_stage2 \
      --config.stats.path=$STATS --config.decoder.pretrained=$DECODER

Needs a trained decoder and stats (stage 1, or import_torch of the official releases).
Use --config.stage2.use_latent_cache=True after --mode=cache_latents to skip the encoder per step.

Memory plan, remat policy per target chip. Default: model.remat=True with
remat_policy="dots_saveable": the least-recompute policy that fits the smallest target chip (v5e,
16 GiB) at 64 chips (planned 7.4 GiB, f32 compiled 11.1 GiB). Where "remat off" fits (v4/v5p, or
256 v5e chips), --config.model.remat=False recomputes nothing and is faster. Remat never changes
results.
Mesh: the default (fsdp 64, the rest on data). model.scan_layers=True: remat bounds compiled
memory only inside a scan. Table: `python bench/train_step.py --rows=memory_plan` (how "planned"
and "f32 compiled" are made: its bench_memory_plan docstring). Step time: not yet measured on a pod.

  policy                            planned  bf16 est  f32 compiled  fits (planned <= 90%)
  64 chips, mesh (1, 64), 16 img/chip (GiB):
    off                                16.87     15.61         23.77  v5e:NO v4:ok v5p:ok
    dots_saveable                       7.39      6.03         11.10  v5e:ok v4:ok v5p:ok
    dots_with_no_batch_dims_saveable    5.25      3.88          8.69  v5e:ok v4:ok v5p:ok
    save_attention_out                  2.68      1.09          3.33  v5e:ok v4:ok v5p:ok
    nothing_saveable                    2.46      0.82          2.84  v5e:ok v4:ok v5p:ok
  256 chips, mesh (4, 64), 4 img/chip (GiB):
    off                                 5.85      5.25          6.41  v5e:ok v4:ok v5p:ok
    dots_saveable                       2.36      1.71          3.27  v5e:ok v4:ok v5p:ok
    dots_with_no_batch_dims_saveable    1.78      1.17          2.63  v5e:ok v4:ok v5p:ok
    save_attention_out                  1.10      0.47          1.25  v5e:ok v4:ok v5p:ok
    nothing_saveable                    1.04      0.40          1.11  v5e:ok v4:ok v5p:ok
  least recompute that fits, 64 chips | 256 chips:
    v5e (16 GiB) dots_saveable | remat off
    v4 (32 GiB)  remat off | remat off
    v5p (95 GiB) remat off | remat off
"""
from rae_jax import presets


def get_config():
  c = presets.base_config()
  c.compute_dtype = "auto"  # bf16 on GPU/TPU (tests/test_precision.py), float32 on CPU
  c.model = presets.ditdh_xl()
  c.model.remat = True  # memory plan above
  c.model.scan_layers = True  # remat bounds compiled memory only in a scan (memory plan)
  c.model.remat_policy = "dots_saveable"
  return c
