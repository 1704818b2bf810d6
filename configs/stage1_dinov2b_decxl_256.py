"""Stage 1: ViT-XL pixel decoder on frozen DINOv2-B (registers), ImageNet 256px.

Official recipe configs/stage1/training/DINOv2-B_decXL.yaml: tau = 0.8 noise-augmented latents,
L1 + LPIPS (w 1.0 from epoch 0) + DINO-S/8 GAN (w 0.75 from epoch 8, D updates from epoch 6),
AdamW 2e-4 cosine to 2e-5, batch 512, 16 epochs, EMA 0.9978. Paper: rFID ~0.57 (0.49 with the
decoder fine-tuned longer). Needs LPIPS/VGG and DINO weights (see README) and ImageNet via tfds.

  python main.py --config=configs/stage1_dinov2b_decxl_256.py --workdir=$W --mode=train_stage1
  python main.py --config=configs/stage1_dinov2b_decxl_256.py --workdir=$W --mode=stats

On a v5e-64 pod this is roughly a day; on 8 GPUs about 3 days.

Memory plan (issue 15 item 4), remat policy per target chip. Default: decoder.remat=True with
remat_policy="dots_saveable": the least-recompute policy that fits the smallest
target chip (v5e, 16 GiB) at 64 chips. Where "remat off" fits (v4/v5p, or 256 v5e chips; table),
--config.decoder.remat=False recomputes nothing and is faster. Remat never changes results.
Mesh: the default (fsdp = 64, the rest on data; all 256 on fsdp would replicate widths like
1152). scan_layers does not change memory, only compile time (--rows=xl_compile).

  python bench/train_step.py --rows=memory_plan   # 256 forced host devices, ~1 min on 2 CPUs

Per-chip GiB are estimates calibrated on three compiled cells (how: bench/train_step.py
bench_memory_plan). Step time: not yet measured on a pod. Stage 1 counts the generator half of
the step (the decoder through L1 + LPIPS + DINO GAN; the D update runs after its residuals are
freed): "state" = state + gradients,
"frozen" = DINOv2-B + VGG16 + DINO-S/8, replicated.
  64 chips, mesh (1, 64), 8 img/chip (GiB):
    off                               13.84 (state 0.12, act 13.23, frozen 0.49) v5e:NO v4:ok v5p:ok
    dots_saveable                     9.82 (state 0.12, act 9.22, frozen 0.49) v5e:ok v4:ok v5p:ok
    dots_with_no_batch_dims_saveable  8.82 (state 0.12, act 8.21, frozen 0.49) v5e:ok v4:ok v5p:ok
    save_attention_out                8.01 (state 0.12, act 7.40, frozen 0.49) v5e:ok v4:ok v5p:ok
    nothing_saveable                  7.88 (state 0.12, act 7.28, frozen 0.49) v5e:ok v4:ok v5p:ok
  256 chips, mesh (4, 64), 2 img/chip (GiB):
    off                               4.52 (state 0.12, act 3.92, frozen 0.49) v5e:ok v4:ok v5p:ok
    dots_saveable                     2.94 (state 0.12, act 2.34, frozen 0.49) v5e:ok v4:ok v5p:ok
    dots_with_no_batch_dims_saveable  2.69 (state 0.12, act 2.09, frozen 0.49) v5e:ok v4:ok v5p:ok
    save_attention_out                2.49 (state 0.12, act 1.88, frozen 0.49) v5e:ok v4:ok v5p:ok
    nothing_saveable                  2.46 (state 0.12, act 1.85, frozen 0.49) v5e:ok v4:ok v5p:ok
  least recompute that fits, 64 chips | 256 chips:
    v5e (16 GiB)   dots_saveable | remat off
    v4 (32 GiB)    remat off | remat off
    v5p (95 GiB)   remat off | remat off
"""
from rae_jax import presets


def get_config():
  c = presets.base_config()
  c.compute_dtype = "auto"  # bf16 on GPU/TPU (tests/test_precision.py), float32 on CPU
  c.stage1.disc.enabled = True
  c.decoder.remat = True  # memory plan above
  c.decoder.scan_layers = True  # remat bounds compiled memory only in a scan (memory plan)
  c.decoder.remat_policy = "dots_saveable"
  return c
