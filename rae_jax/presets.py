"""Shared config presets: recipes in configs/ compose these instead of copying values.

Values equal the official YAMLs (bytetriper/RAE configs/); epoch-based schedules are kept in
epochs here and turned into steps from the dataset size and global batch at run time.
"""
from __future__ import annotations

import ml_collections as mlc


def ditdh(hidden, depth, heads, *, input_size=16, in_channels=768, num_classes=1000) -> mlc.ConfigDict:
  """Official DiTwDDTHead constructor arguments (names kept so export can state them)."""
  return mlc.ConfigDict(dict(
      name="DiTDH",
      input_size=input_size,
      patch_size=1,
      in_channels=in_channels,
      hidden_size=tuple(hidden),
      depth=tuple(depth),
      num_heads=tuple(heads),
      mlp_ratio=4.0,
      class_dropout_prob=0.1,
      num_classes=num_classes,
      use_qknorm=False,
      use_swiglu=True,
      use_rope=True,
      use_rmsnorm=True,
      wo_shift=False,
      use_pos_embed=True,
      remat=False,
      remat_policy="nothing_saveable",  # models/layers.py REMAT_POLICIES; used when remat
      scan_layers=False,
      # JAX-only: the attention kernel of every transformer in the run (models/attention.py).
      attention_impl="auto",
  ))


def ditdh_xl(**kw) -> mlc.ConfigDict:
  return ditdh((1152, 2048), (28, 2), (16, 16), **kw)


def ditdh_s(**kw) -> mlc.ConfigDict:
  return ditdh((384, 2048), (12, 2), (6, 16), **kw)


def lightning_dit(hidden=1152, depth=28, heads=16, *, input_size=16, in_channels=768,
                  num_classes=1000) -> mlc.ConfigDict:
  """Official LightningDiT (the plain-DiT baseline) constructor arguments."""
  return mlc.ConfigDict(dict(
      name="LightningDiT", input_size=input_size, patch_size=1, in_channels=in_channels,
      hidden_size=hidden, depth=depth, num_heads=heads, mlp_ratio=4.0, class_dropout_prob=0.1,
      num_classes=num_classes, learn_sigma=False, use_qknorm=False, use_swiglu=True,
      use_rope=True, use_rmsnorm=True, wo_shift=False, use_gembed=True, remat=False,
      remat_policy="nothing_saveable", scan_layers=False, attention_impl="auto"))


def dinov2_b_encoder(input_size: int = 224) -> mlc.ConfigDict:
  """Frozen DINOv2-B with registers, final LN without affine (official `Dinov2withNorm`)."""
  return mlc.ConfigDict(dict(
      name="dinov2_reg",
      path="facebook/dinov2-with-registers-base",  # HF hub id or local HF folder
      input_size=input_size,
      # Only used by the 'toy' encoder (random init, no download):
      hidden_size=768, depth=12, num_heads=12, patch_size=14,
  ))


def dinov3_b_encoder(input_size: int = 256) -> mlc.ConfigDict:
  """Frozen DINOv3 ViT-B/16 (4 registers, RoPE), final LN without affine, CLS + registers dropped.

  Patch 16 at 256px gives the same 16x16x768 latent as DINOv2-B/14 at 224px. RoPE positions are
  computed for the actual grid, so 256 input needs no interpolation (the processor's 224 is only
  its default resize); mean/std come from the checkpoint's preprocessor_config.json.
  """
  return mlc.ConfigDict(dict(
      name="dinov3",
      path="facebook/dinov3-vitb16-pretrain-lvd1689m",  # HF hub id (gated) or local HF folder
      input_size=input_size,
      hidden_size=768, depth=12, num_heads=12, patch_size=16,
  ))


def vit_decoder(name: str = "XL", *, patch_size: int = 16) -> mlc.ConfigDict:
  """MAE-style ViT decoders of the official configs/decoder/ViT{B,L,XL}/config.json."""
  sizes = {
      "B": dict(decoder_hidden_size=768, decoder_num_hidden_layers=12,
                decoder_num_attention_heads=12, decoder_intermediate_size=3072),
      "L": dict(decoder_hidden_size=1024, decoder_num_hidden_layers=24,
                decoder_num_attention_heads=16, decoder_intermediate_size=4096),
      "XL": dict(decoder_hidden_size=1152, decoder_num_hidden_layers=28,
                 decoder_num_attention_heads=16, decoder_intermediate_size=4096),
  }[name]
  return mlc.ConfigDict(dict(patch_size=patch_size, layer_norm_eps=1e-12, remat=False,
                             remat_policy="nothing_saveable", scan_layers=False, pretrained="",
                             **sizes))


def optim(*, lr, final_lr, schedule, warmup_epochs, decay_end_epoch, epochs, warmup_from_zero,
          betas=(0.9, 0.95), weight_decay=0.0, clip_grad=0.0, eps=1e-8) -> mlc.ConfigDict:
  """AdamW + the official LambdaLR schedule (utils/optim_utils.py: build_optimizer/_scheduler)."""
  return mlc.ConfigDict(dict(
      lr=float(lr), final_lr=float(final_lr), schedule=schedule,
      warmup_epochs=float(warmup_epochs), decay_end_epoch=float(decay_end_epoch),
      epochs=float(epochs), warmup_from_zero=warmup_from_zero,
      betas=tuple(float(b) for b in betas), weight_decay=float(weight_decay),
      eps=float(eps), clip_grad=float(clip_grad),
      # Set to a positive number to override `epochs` (demo, smoke tests).
      num_steps=-1,
  ))


def shift_dim(latent_hw: int, channels: int) -> int:
  return latent_hw * latent_hw * channels


def base_config() -> mlc.ConfigDict:
  """Every section with the official 256px DINOv2-B / DiTDH-XL values as defaults."""
  c = mlc.ConfigDict()
  c.seed = 0
  c.compute_dtype = "float32"  # the official recommendation; 'bfloat16' for speed

  c.data = mlc.ConfigDict(dict(
      source="tfds",  # 'tfds' | 'image_folder' | 'synthetic' | 'latents'
      path="",  # image folder / latent cache folder
      tfds_name="imagenet2012",
      split="train",
      eval_split="validation",
      data_dir="",
      image_size=256,
      num_classes=1000,
      synthetic_size=0,
      num_threads=0,  # loader threads; 0: one per core this process may use (sched_getaffinity)
      prefetch=2,
  ))

  c.encoder = dinov2_b_encoder()
  c.decoder = vit_decoder("XL")
  # Latent normalisation stats: official stat.pt (torch), or ours from --mode=stats.
  c.stats = mlc.ConfigDict(dict(path="", eps=1e-5))

  c.stage1 = mlc.ConfigDict(dict(
      global_batch_size=512,
      grad_accum_steps=1,  # generator update over micro-batches (same update up to rounding)
      noise_tau=0.8,
      ema_decay=0.9978,
      # The official trainer trains decoder_pos_embed (requires_grad_(True) on the whole decoder
      # un-freezes the sin-cos table); False keeps it fixed. See models/decoder.py.
      train_pos_embed=True,
      optim=optim(lr=2e-4, final_lr=2e-5, schedule="cosine", warmup_epochs=1, decay_end_epoch=16,
                  epochs=16, warmup_from_zero=True, clip_grad=0.0),
      loss=mlc.ConfigDict(dict(
          l1_weight=1.0,
          perceptual_weight=1.0, lpips_start=0.0,
          disc_weight=0.75, disc_start=8.0, disc_upd_start=6.0, disc_updates=1,
          max_d_weight=1e4, disc_loss="hinge", gen_loss="vanilla",
          lpips_weights="",  # folder with torchvision vgg16 + LPIPS vgg.pth ('' = no LPIPS)
      )),
      disc=mlc.ConfigDict(dict(
          enabled=False,
          dino_ckpt_path="",  # official dino_vit_small_patch8_224.pth
          recipe="S_8", ks=9, norm_type="bn", using_spec_norm=True,
          key_depths=(2, 5, 8, 11), norm_eps=1e-6,
          recipe_overrides=mlc.FieldReference(None, field_type=dict),  # e.g. a tiny DINO
          random_init=False,  # tests only: random DINO instead of dino_ckpt_path
          aug_prob=1.0, cutout=0.0,
          optim=optim(lr=2e-4, final_lr=2e-5, schedule="cosine", warmup_epochs=1,
                      decay_end_epoch=16, epochs=16, warmup_from_zero=True),
      )),
  ))

  c.model = ditdh_xl()
  c.transport = mlc.ConfigDict(dict(
      path_type="Linear", prediction="velocity", loss_weight="",
      time_dist_type="logit-normal_0_1",
      shift_dim=shift_dim(16, 768), shift_base=4096,
      train_eps=0.0, sample_eps=0.0,
  ))
  c.stage2 = mlc.ConfigDict(dict(
      global_batch_size=1024,
      grad_accum_steps=1,
      ema_decay=0.9995,
      use_latent_cache=False,
      latent_cache_dtype="float16",  # or "float32"; float16 halves disk and host-to-device bytes
      optim=optim(lr=2e-4, final_lr=2e-5, schedule="linear", warmup_epochs=40, decay_end_epoch=800,
                  epochs=1400, warmup_from_zero=False, clip_grad=1.0),
  ))

  c.sampler = mlc.ConfigDict(dict(
      mode="ODE", method="euler", num_steps=50, atol=1e-6, rtol=1e-3,
      # SDE only:
      diffusion_form="sigma", diffusion_norm=1.0, last_step="Mean", last_step_size=0.04,
  ))
  c.guidance = mlc.ConfigDict(dict(
      method="cfg",  # 'cfg' | 'autoguidance'
      scale=1.0, t_min=0.0, t_max=1.0,
      guide_model=ditdh_s(),
  ))

  c.sample = mlc.ConfigDict(dict(num_images=64, classes="", grid_cols=8, use_ema=True))
  c.eval = mlc.ConfigDict(dict(
      num_samples=50_000, per_device_batch=32, label_sampling="equal",
      reference_npz="", inception_weights="", shard_size=1000, write_pngs=False,
      online_every_steps=0, online_num_samples=1000,
  ))
  # data = fsdp = -1: fsdp = largest divisor of the device count <= max_fsdp, the rest on data.
  c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=-1, max_fsdp=64))
  c.checkpoint = mlc.ConfigDict(dict(every_steps=5000, keep=3, keep_period=0, async_save=True))
  # Run-defining fields that may differ from the checkpoint's on resume (comma-separated).
  c.resume = mlc.ConfigDict(dict(allow_changes=""))
  c.log = mlc.ConfigDict(dict(every_steps=100, sample_every_steps=10000, tensorboard=True,
                              wandb_project=""))
  # JAX's persistent compilation cache, so a restarted (preempted) run does not recompile:
  # dir "" = <workdir>/compilation_cache (every host shares it; gs:// works), "off" = disabled,
  # or any path. Programs that compiled faster than min_compile_time_s are not stored.
  c.compilation_cache = mlc.ConfigDict(dict(dir="", min_compile_time_s=1.0))
  # jax.profiler trace of steps start_step..start_step+num_steps-1 into <workdir>/profile.
  c.profile = mlc.ConfigDict(dict(start_step=-1, num_steps=3, all_processes=False))

  c.interop = mlc.ConfigDict(dict(
      decoder="", stage2_model="", guide_model="", stats="",  # paths or hf://repo/path
  ))
  c.export = mlc.ConfigDict(dict(which="ema"))
  c.distributed = mlc.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))
  return c

