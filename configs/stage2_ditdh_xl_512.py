"""Stage 2: DiTDH-XL at 512px: DINOv2-B at 448px input gives 768x32x32 latents.

Official configs/stage2/{training,sampling}/ImageNet512: encoder input 448, ViT-XL decoder with
patch 16 on 32x32 tokens, shift sqrt(768*32*32/4096). (The official training YAML still lists
input_size 16 / latent 16x16; its sampling YAML, which must match the released weights, uses 32:
we follow the latter.) Paper: gFID 1.13 at 512 with autoguidance.

  python main.py --config=configs/stage2_ditdh_xl_512.py --workdir=$W --mode=train_stage2

Memory plan, remat policy per target chip. Default: model.remat=True with
remat_policy="save_attention_out": the least-recompute policy that fits the smallest target chip
(v5e, 16 GiB) at 64 chips (planned 10.7 GiB, f32 compiled 13.4 GiB). Use the table's policy for
larger chips or more of them; remat never changes results.
Mesh: the default (fsdp 64, the rest on data). model.scan_layers=True: remat bounds compiled
memory only inside a scan. Table: `python bench/train_step.py --rows=memory_plan` (how "planned"
and "f32 compiled" are made: its bench_memory_plan docstring). Step time: not yet measured on a pod.

  policy                            planned  bf16 est  f32 compiled  fits (planned <= 90%)
  64 chips, mesh (1, 64), 16 img/chip (GiB):
    off                                95.98     90.79        139.46  v5e:NO v4:NO v5p:NO
    dots_saveable                      51.52     45.79         66.43  v5e:NO v4:NO v5p:ok
    dots_with_no_batch_dims_saveable   21.08     14.68         34.88  v5e:NO v4:ok v5p:ok
    save_attention_out                 10.72      3.57         13.41  v5e:ok v4:ok v5p:ok
    nothing_saveable                    9.40      2.46         10.98  v5e:ok v4:ok v5p:ok
  256 chips, mesh (4, 64), 4 img/chip (GiB):
    off                                25.64     24.05         35.35  v5e:NO v4:ok v5p:ok
    dots_saveable                      13.33     11.65         17.04  v5e:ok v4:ok v5p:ok
    dots_with_no_batch_dims_saveable    5.72      3.87          9.15  v5e:ok v4:ok v5p:ok
    save_attention_out                  3.16      1.09          3.82  v5e:ok v4:ok v5p:ok
    nothing_saveable                    2.83      0.82          3.21  v5e:ok v4:ok v5p:ok
  least recompute that fits, 64 chips | 256 chips:
    v5e (16 GiB) save_attention_out | dots_saveable
    v4 (32 GiB)  dots_with_no_batch_dims_saveable | remat off
    v5p (95 GiB) dots_saveable | remat off
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
