"""Stage 2: DiTDH-XL at 512px: DINOv2-B at 448px input gives 768x32x32 latents.

Official configs/stage2/{training,sampling}/ImageNet512: encoder input 448, ViT-XL decoder with
patch 16 on 32x32 tokens, shift sqrt(768*32*32/4096). (The official training YAML still lists
input_size 16 / latent 16x16; its sampling YAML, which must match the released weights, uses 32:
we follow the latter.) Paper: gFID 1.13 at 512 with autoguidance.

  python main.py --config=configs/stage2_ditdh_xl_512.py --workdir=$W --mode=train_stage2

Memory plan (issue 15 item 4), remat policy per target chip. Default: model.remat=True with
remat_policy="save_attention_out": the least-recompute policy that fits the smallest
target chip (v5e, 16 GiB) at 64 chips. Where "remat off" fits (v4/v5p, or 256 v5e chips; table),
--config.model.remat=False recomputes nothing and is faster. Remat never changes results.
Mesh: the default (fsdp = 64, the rest on data; all 256 on fsdp would replicate widths like
1152). scan_layers does not change memory, only compile time (--rows=xl_compile).

  python bench/train_step.py --rows=memory_plan   # 256 forced host devices, ~1 min on 2 CPUs

Per-chip GiB are estimates calibrated on three compiled cells (how: bench/train_step.py
bench_memory_plan). Step time: not yet measured on a pod.
  64 chips, mesh (1, 64), 16 img/chip:
    off                               91.02 GiB (state+grads 0.24, act 90.77) v5e:NO v4:NO v5p:NO
    dots_saveable                     45.79 GiB (state+grads 0.24, act 45.55) v5e:NO v4:NO v5p:ok
    dots_with_no_batch_dims_saveable  14.68 GiB (state+grads 0.24, act 14.44) v5e:NO v4:ok v5p:ok
    save_attention_out                3.57 GiB (state+grads 0.24, act 3.33) v5e:ok v4:ok v5p:ok
    nothing_saveable                  2.46 GiB (state+grads 0.24, act 2.22) v5e:ok v4:ok v5p:ok
  256 chips, mesh (4, 64), 4 img/chip:
    off                               24.13 GiB (state+grads 0.24, act 23.88) v5e:NO v4:ok v5p:ok
    dots_saveable                     11.65 GiB (state+grads 0.24, act 11.40) v5e:ok v4:ok v5p:ok
    dots_with_no_batch_dims_saveable  3.87 GiB (state+grads 0.24, act 3.63) v5e:ok v4:ok v5p:ok
    save_attention_out                1.09 GiB (state+grads 0.24, act 0.85) v5e:ok v4:ok v5p:ok
    nothing_saveable                  0.82 GiB (state+grads 0.24, act 0.57) v5e:ok v4:ok v5p:ok
  least recompute that fits, 64 chips | 256 chips:
    v5e (16 GiB)   save_attention_out | dots_saveable
    v4 (32 GiB)    dots_with_no_batch_dims_saveable | remat off
    v5p (95 GiB)   dots_saveable | remat off
"""
from rae_jax import presets


def get_config():
  c = presets.base_config()
  c.compute_dtype = "auto"  # bf16 on GPU/TPU (tests/test_precision.py), float32 on CPU
  c.data.image_size = 512
  c.encoder = presets.dinov2_b_encoder(input_size=448)
  c.model = presets.ditdh_xl(input_size=32)
  c.transport.shift_dim = presets.shift_dim(32, 768)
  c.guidance.guide_model = presets.ditdh_s(input_size=32)
  c.model.remat = True  # memory plan above
  c.model.scan_layers = True  # remat bounds compiled memory only in a scan (memory plan)
  c.model.remat_policy = "save_attention_out"
  return c
