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
"""
from rae_jax import presets


def get_config():
  c = presets.base_config()
  c.compute_dtype = "auto"  # bf16 on GPU/TPU (tests/test_precision.py), float32 on CPU
  c.model = presets.ditdh_xl()
  return c
