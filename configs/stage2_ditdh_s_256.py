"""Stage 2: DiTDH-S (12x384 + 2x2048 head) on DINOv2-B latents 768x16x16, ImageNet 256px.

Official configs/stage2/training/ImageNet256/DiTDH-S_DINOv2-B.yaml (same schedule as XL). Also the
autoguidance guide model for DiTDH-XL (the official guide is this model at epoch 14).

  python main.py --config=configs/stage2_ditdh_s_256.py --workdir=$W --mode=train_stage2
"""
from rae_jax import presets


def get_config():
  c = presets.base_config()
  c.model = presets.ditdh_s()
  return c
