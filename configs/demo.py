"""Demo (the default): the whole RAE pipeline on 2 CPU cores in a few minutes, no downloads.

Embedded synthetic dataset (10 classes of coloured shapes, 32px), a tiny randomly initialised
frozen ViT encoder (a stand-in for DINOv2: random features still make a usable latent space for a
toy problem, which is the point being demonstrated, not quality), a tiny ViT decoder trained on
tau-noised latents, latent stats, a tiny DiTDH, and a class-per-row sample grid:

  python main.py --config=configs/demo.py --workdir=/tmp/rae_demo     # -> /tmp/rae_demo/samples.png

Fast variant for tests: --config.stage1.optim.num_steps=20 --config.stage2.optim.num_steps=20.
"""
from rae_jax import presets


def get_config():
  c = presets.base_config()
  c.data.source = "synthetic"
  c.data.image_size = 32
  c.data.num_classes = 10
  c.data.synthetic_size = 2000

  # 32px / patch 8 -> 4x4 tokens of width 64: latents (4, 4, 64).
  c.encoder.name = "toy_vit"
  c.encoder.path = ""
  c.encoder.input_size = 32
  c.encoder.patch_size = 8
  c.encoder.hidden_size = 64
  c.encoder.depth = 2
  c.encoder.num_heads = 4

  c.decoder.patch_size = 8
  c.decoder.decoder_hidden_size = 128
  c.decoder.decoder_num_hidden_layers = 3
  c.decoder.decoder_num_attention_heads = 4
  c.decoder.decoder_intermediate_size = 256

  c.stage1.global_batch_size = 64
  c.stage1.ema_decay = 0.99
  c.stage1.optim.lr = 1e-3
  c.stage1.optim.final_lr = 1e-4
  c.stage1.optim.warmup_epochs = 0.5
  c.stage1.optim.decay_end_epoch = 16  # 2000 // 64 = 31 steps/epoch: cosine over the run
  c.stage1.optim.num_steps = 500
  c.stage1.loss.perceptual_weight = 0.0  # LPIPS needs VGG weights; off in the demo
  c.stage1.disc.enabled = False

  c.model = presets.ditdh((128, 192), (4, 1), (4, 4), input_size=4, in_channels=64,
                          num_classes=10)
  c.transport.shift_dim = presets.shift_dim(4, 64)
  c.transport.shift_base = 1024  # shift sqrt(1024/1024) = 1: the reference requires shift >= 1
  # Class-true samples need the step count more than the batch: 1800 steps of 32 at lr 1e-3
  # show their class more often than 1800 steps of 64 at 5e-4, in half the time (bench/demo.py).
  c.stage2.global_batch_size = 32
  c.stage2.ema_decay = 0.995
  c.stage2.optim.lr = 1e-3
  c.stage2.optim.final_lr = 2e-4
  c.stage2.optim.warmup_epochs = 1
  c.stage2.optim.decay_end_epoch = 29  # 2000 // 32 = 62 steps/epoch
  c.stage2.optim.num_steps = 1800

  c.guidance.method = "cfg"
  c.guidance.scale = 2.0
  c.guidance.guide_model = presets.ditdh((64, 96), (2, 1), (2, 2), input_size=4, in_channels=64,
                                         num_classes=10)
  c.sample.num_images = 80
  c.sample.grid_cols = 8

  c.eval.num_samples = 100
  c.eval.per_device_batch = 50
  c.eval.shard_size = 50
  c.checkpoint.every_steps = 500
  c.log.every_steps = 100
  c.log.sample_every_steps = 0
  return c
