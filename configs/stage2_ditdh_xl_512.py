"""Stage 2: DiTDH-XL at 512px: DINOv2-B at 448px input gives 768x32x32 latents.

Official configs/stage2/{training,sampling}/ImageNet512: encoder input 448, ViT-XL decoder with
patch 16 on 32x32 tokens, shift sqrt(768*32*32/4096). (The official training YAML still lists
input_size 16 / latent 16x16; its sampling YAML, which must match the released weights, uses 32:
we follow the latter.) Paper: gFID 1.13 at 512 with autoguidance.

  python main.py --config=configs/stage2_ditdh_xl_512.py --workdir=$W --mode=train_stage2
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
  return c
