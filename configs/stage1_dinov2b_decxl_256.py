"""Stage 1: ViT-XL pixel decoder on frozen DINOv2-B (registers), ImageNet 256px.

Official recipe configs/stage1/training/DINOv2-B_decXL.yaml: tau = 0.8 noise-augmented latents,
L1 + LPIPS (w 1.0 from epoch 0) + DINO-S/8 GAN (w 0.75 from epoch 8, D updates from epoch 6),
AdamW 2e-4 cosine to 2e-5, batch 512, 16 epochs, EMA 0.9978. Paper: rFID ~0.57 (0.49 with the
decoder fine-tuned longer). Needs LPIPS/VGG and DINO weights (see README) and ImageNet via tfds.

  python main.py --config=configs/stage1_dinov2b_decxl_256.py --workdir=$W --mode=train_stage1
  python main.py --config=configs/stage1_dinov2b_decxl_256.py --workdir=$W --mode=stats

On a v5e-64 pod this is roughly a day; on 8 GPUs about 3 days.
"""
from rae_jax import presets


def get_config():
  c = presets.base_config()
  c.compute_dtype = "auto"  # bf16 on GPU/TPU (tests/test_precision.py), float32 on CPU
  c.stage1.disc.enabled = True
  return c
