"""Stage 1: ViT-XL pixel decoder on frozen DINOv3-B/16 (4 registers), ImageNet 256px.

No official RAE recipe uses DINOv3; this keeps every training value of the DINOv2-B_decXL recipe
(tau = 0.8 latent noise, L1 + LPIPS + DINO-S/8 GAN from epoch 8, AdamW 2e-4 cosine to 2e-5,
batch 512, 16 epochs, EMA 0.9978) and swaps the encoder.

Latent geometry: the encoder sees the 256px image as is (encoder.input_size = 256, no resize),
patch 16 -> 16x16 tokens of width 768; CLS + 4 registers are dropped. The decoder (patch 16)
maps 16x16x768 back to 256x256x3. A stage-2 model on these latents therefore takes
input_size 16, in_channels 768, and its time shift uses
  shift_dim = 16 * 16 * 768 = 196608  (sqrt(196608 / 4096) ~ 6.93, the same as DINOv2-B/14 @ 224).

The checkpoint is gated on the Hub: accept its licence, `huggingface-cli login`, or point
encoder.path at a downloaded folder (config.json, model.safetensors, preprocessor_config.json).

  python main.py --config=configs/stage1_dinov3b_decxl_256.py --workdir=$W --mode=train_stage1
  python main.py --config=configs/stage1_dinov3b_decxl_256.py --workdir=$W --mode=stats
"""
from rae_jax import presets

LATENT_GRID = 16  # 256 / 16
LATENT_CHANNELS = 768


def get_config():
  c = presets.base_config()
  c.encoder = presets.dinov3_b_encoder(input_size=LATENT_GRID * 16)
  c.data.image_size = 256
  c.decoder = presets.vit_decoder("XL", patch_size=16)
  c.stage1.disc.enabled = True
  # The stage-2 side of the geometry, so stats / cache_latents / stage 2 on this workdir agree.
  c.model.input_size = LATENT_GRID
  c.model.in_channels = LATENT_CHANNELS
  c.transport.shift_dim = presets.shift_dim(LATENT_GRID, LATENT_CHANNELS)
  return c
