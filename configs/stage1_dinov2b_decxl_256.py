"""Stage 1: ViT-XL pixel decoder on frozen DINOv2-B (registers), ImageNet 256px.

Official recipe configs/stage1/training/DINOv2-B_decXL.yaml: tau = 0.8 noise-augmented latents,
L1 + LPIPS (w 1.0 from epoch 0) + DINO-S/8 GAN (w 0.75 from epoch 8, D updates from epoch 6),
AdamW 2e-4 cosine to 2e-5, batch 512, 16 epochs, EMA 0.9978. Paper: rFID ~0.57 (0.49 with the
decoder fine-tuned longer). Needs LPIPS/VGG and DINO weights (see README) and ImageNet via tfds.

  python main.py --config=configs/stage1_dinov2b_decxl_256.py --workdir=$W --mode=train_stage1
  python main.py --config=configs/stage1_dinov2b_decxl_256.py --workdir=$W --mode=stats

On a v5e-64 pod this is roughly a day; on 8 GPUs about 3 days.

Memory plan, remat policy per target chip. Default: decoder.remat=True with
remat_policy="dots_saveable" for the smallest target chip (v5e, 16 GiB) at 64 chips: "remat off"
passes the rule there (planned 13.8 GiB) but its float32 compile needs 15.0 GiB, above 90% of the
chip, while dots_saveable is 9.8 / 10.0 GiB. On v4/v5p, or 256 chips, --config.decoder.remat=False
recomputes nothing and is faster. Remat never changes results. Stage 1 is the whole step (decoder
through L1 + LPIPS + DINO GAN, and the D update); the estimate counts the generator half and the
frozen DINOv2-B + VGG16 + DINO-S/8, replicated.
Mesh: the default (fsdp 64, the rest on data). decoder.scan_layers=True: remat bounds compiled
memory only inside a scan. Table: `python bench/train_step.py --rows=memory_plan` (how "planned"
and "f32 compiled" are made: its bench_memory_plan docstring). Step time: not yet measured on a pod.

  policy                            planned  bf16 est  f32 compiled  fits (planned <= 90%)
  64 chips, mesh (1, 64), 8 img/chip (GiB):
    off                                13.81     13.81         15.00  v5e:ok v4:ok v5p:ok
    dots_saveable                       9.80      9.80          9.99  v5e:ok v4:ok v5p:ok
    dots_with_no_batch_dims_saveable    8.79      8.79          8.86  v5e:ok v4:ok v5p:ok
    save_attention_out                  7.98      7.98          7.24  v5e:ok v4:ok v5p:ok
    nothing_saveable                    7.86      7.86          6.99  v5e:ok v4:ok v5p:ok
  256 chips, mesh (4, 64), 2 img/chip (GiB):
    off                                 4.50      4.50          3.95  v5e:ok v4:ok v5p:ok
    dots_saveable                       2.92      2.92          2.69  v5e:ok v4:ok v5p:ok
    dots_with_no_batch_dims_saveable    2.66      2.66          2.41  v5e:ok v4:ok v5p:ok
    save_attention_out                  2.46      2.46          2.01  v5e:ok v4:ok v5p:ok
    nothing_saveable                    2.43      2.43          1.94  v5e:ok v4:ok v5p:ok
  least recompute that fits, 64 chips | 256 chips:
    v5e (16 GiB) remat off | remat off
    v4 (32 GiB)  remat off | remat off
    v5p (95 GiB) remat off | remat off
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
