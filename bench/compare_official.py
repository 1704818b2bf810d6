"""Side by side with the official PyTorch code on this machine, in one run. Prints a table.

  git clone https://github.com/bytetriper/RAE /tmp/RAE       # never copied into this repo
  bash bench/official_env.sh /tmp/rae-official-env          # run automatically when missing
  python bench/compare_official.py --official_src=/tmp/RAE/src

The official side runs in a child interpreter (this venv's torch + transformers) with the official
src/ and a separate package folder (--official_env, made by bench/official_env.sh: torchvision
matching torch, pytorch-fid, torchdiffeq, timm, omegaconf) on its sys.path; nothing of it is
installed into this venv. This torch is a CPU build whose torchvision compiled ops do not register,
so the worker pre-seeds `torchvision._meta_registrations` before importing torchvision: only
torchvision's pure-Python models (VGG16, Inception-v3) are used. The worker constructs and calls
the official classes (DiTwDDTHead, RAE / GeneralDecoder, Sampler / create_transport, LPIPS,
DinoDiscriminator, DiffAug, the GAN losses, build_optimizer / build_scheduler, update_ema);
the stage-1 generator + discriminator update is the loop body of train_stage1.py written out
around them (their loop is not a callable).

Weights are random on both sides (no network here, and timing does not depend on them): the
DINOv2-B-with-registers encoder is a randomly initialised HF folder written once under --work_dir;
LPIPS's VGG16 and lin layers, the DINO-S/8 discriminator ViT and the FID Inception are not
downloaded (their loaders are bypassed; the FID Inception gets the reference README's seeded-rule
weights on both sides, so the row also reports how far the two pool3 outputs are apart).

Rows (float32, this CPU, same shapes both sides; --steps/--num_images/--repeats/--s1_* shrink them):
  DiTDH-S train step   batch --batch: forward, flow-matching loss, backward, clip 1.0, AdamW.
  DiTDH-S forward      batch --batch.
  Euler + CFG sampling --num_images images end to end: the official ODE sampler (Euler,
                       num_steps=--steps time points, shifted grid, CFG 1.5 on the doubled batch)
                       of DiTDH-S, then the RAE decoder (ViT-B, official configs/decoder/ViTB,
                       patch 16 -> 256 px). Ours: pipeline.image_generator.make_generate, jitted.
  stage-1 step         batch --s1_batch at --s1_image_size px: noise-augmented encode (DINOv2-B at
                       --s1_encoder_input), ViT-B decoder, L1 + LPIPS (VGG16), GAN term with the
                       adaptive weight through DINO-S/8 + DiffAug, AdamW; then one D update (fresh
                       eval-mode reconstruction, 8-bit quantised, hinge loss, AdamW); decoder EMA.
                       Ours: pipeline.stage1.build_parts + make_step, all phases on.
  Inception pool3      --inception_batch 256 px uint8 images, resized to 299 inside (images/s).
  data loading         bench/data.py's ours vs official-equivalent DataLoader, 256px JPEGs.
Each time is the median of --repeats runs after one warm-up call (the sampling row runs once: its
first call is the measurement; ours is compiled beforehand). Both sides use every core they are
given (torch's intra-op threads, XLA's CPU thread pool); run on an idle machine: under contention
PyTorch's OpenMP threads lose more than XLA, which inflates the speed-ups.
Differences that are the official code's own: its stage-1 EMA also averages the frozen encoder
(update_ema walks all of rae.named_parameters()); it re-runs the encoder for the D update's fresh
reconstruction, as ours does. DDP is left out (one process, as on one device).

Defaults are the issue's settings (50 sampler steps, 8 images, stage-1 batch 2 at 256 px). A quick
check on a busy machine: --batch 2 --steps 3 --num_images 2 --repeats 1 --s1_image_size 64
--s1_encoder_input 56 --inception_batch 4 (2 minutes on the idle 2-core machine, 4 when loaded).
The full default run takes about 15-20 minutes there, most of it the two 50-step samplers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)
REFERENCE = os.path.join(REPO, "tests", "fixtures", "reference")

from rae_jax.interop.common import seeded_state_dict  # noqa: E402  (numpy only)

S = dict(hidden_size=(384, 2048), depth=(12, 2), num_heads=(6, 16))
COMMON = dict(input_size=16, patch_size=1, in_channels=768, mlp_ratio=4.0,
              class_dropout_prob=0.1, num_classes=1000, use_qknorm=False, use_swiglu=True,
              use_rope=True, use_rmsnorm=True, wo_shift=False, use_pos_embed=True)
CFG_SCALE = 1.5
SHIFT_DIM, SHIFT_BASE = 16 * 16 * 768, 4096
# ViT-B decoder = the official configs/decoder/ViTB/config.json (used from there when present).
VITB_DECODER = dict(decoder_hidden_size=768, decoder_num_hidden_layers=12,
                    decoder_num_attention_heads=12, decoder_intermediate_size=3072,
                    layer_norm_eps=1e-12)
DINOV2_B = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                patch_size=14, image_size=518, num_register_tokens=4, layerscale_value=1.0)
S1_OPTIM = dict(optimizer=dict(lr=2e-4, betas=[0.9, 0.95], weight_decay=0.0),
                scheduler=dict(type="cosine", warmup_epochs=1, decay_end_epoch=16, base_lr=2e-4,
                               final_lr=2e-5, warmup_from_zero=True))
S1_LOSS = dict(perceptual_weight=1.0, disc_weight=0.75, max_d_weight=1e4, noise_tau=0.8,
               ema_decay=0.9978, ks=9, disc_recipe="S_8")
S1_STEPS_PER_EPOCH = 1000  # any value: the schedules' shape does not change the step's cost


def median_time(fn, repeats, warmup=True):
  if warmup:
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def fid_inception_state_dict() -> dict:
  with open(os.path.join(REFERENCE, "fid_inception.state_dict.json")) as f:
    return seeded_state_dict(json.load(f))


def test_images(n, size, seed=0):
  """uint8 NHWC images (smooth + noise, so nothing is constant)."""
  rng = np.random.default_rng(seed)
  ramp = np.linspace(0, 255, size, dtype=np.float32)
  base = (ramp[None, :, None, None] + ramp[None, None, :, None]) / 2
  return np.clip(base + rng.normal(0, 40, (n, size, size, 3)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Shared assets (written once under --work_dir)

def decoder_config_dir(args) -> str:
  """The official ViT-B decoder config folder (from the official repo when it has one)."""
  official = os.path.join(os.path.dirname(os.path.abspath(args.official_src)), "configs",
                          "decoder", "ViTB")
  if os.path.isfile(os.path.join(official, "config.json")):
    return official
  folder = os.path.join(args.work_dir, "decoder_ViTB")
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(REFERENCE, "tiny_decoder_config", "config.json")) as f:
    cfg = json.load(f)
  cfg.update(VITB_DECODER, hidden_size=768, image_size=224, patch_size=16)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f, indent=1)
  return folder


def encoder_dir(args) -> str:
  """A randomly initialised DINOv2-B-with-registers HF folder (config, weights, preprocessor)."""
  folder = os.path.join(args.work_dir, "dinov2_reg_base_random")
  if os.path.isfile(os.path.join(folder, "model.safetensors")):
    return folder
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  with open(os.path.join(REFERENCE, "tiny_dinov2_reg", "config.json")) as f:
    cfg = {k: v for k, v in json.load(f).items()
           if k not in ("architectures", "transformers_version", "dtype", "intermediate_size",
                        "out_features", "out_indices", "stage_names")}
  cfg.update(DINOV2_B)
  model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**cfg))
  tmp = folder + ".tmp"
  model.save_pretrained(tmp)
  with open(os.path.join(REFERENCE, "tiny_dinov2_reg", "preprocessor_config.json")) as f:
    proc = json.load(f)
  proc.update(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})
  with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
    json.dump(proc, f)
  os.replace(tmp, folder)
  return folder


# ----------------------------------------------------------------------------------------------
# Official side (child interpreter)

def _import_official(args):
  sys.path.insert(0, os.path.abspath(args.official_env))
  sys.path.insert(0, os.path.abspath(args.official_src))
  # torchvision's compiled ops fail to register against this CPU torch build; its meta
  # registrations are the only import that needs them, and the models used here do not.
  sys.modules.setdefault("torchvision._meta_registrations",
                         types.ModuleType("torchvision._meta_registrations"))
  import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import


def official_stage2(args, out):
  import torch  # pylint: disable=g-import-not-at-top
  from stage1 import RAE  # pylint: disable=g-import-not-at-top
  from stage2.models.DDT import DiTwDDTHead  # pylint: disable=g-import-not-at-top
  from stage2.transport import Sampler, create_transport  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = DiTwDDTHead(**COMMON, **{k: list(v) for k, v in S.items()})
  b = args.batch
  x = torch.randn(b, 768, 16, 16)
  y = torch.randint(0, 1000, (b,))
  opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0)

  def train_step():
    model.train()
    t = torch.sigmoid(torch.randn(b))
    noise = torch.randn_like(x)
    te = t.view(-1, 1, 1, 1)
    loss = ((model(te * x + (1 - te) * noise, t, y) - (x - noise)) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  def forward():
    with torch.no_grad():
      model.eval()
      model(x, torch.full((b,), 0.5), y)

  out["train"] = median_time(train_step, args.repeats)
  out["forward"] = median_time(forward, args.repeats)
  print(f"official: train {out['train']:.2f} s, forward {out['forward']:.2f} s", flush=True)

  enc = encoder_dir(args)
  rae = RAE(encoder_cls="Dinov2withNorm", encoder_config_path=enc, encoder_input_size=224,
            encoder_params={"dinov2_path": enc, "normalize": True},
            decoder_config_path=decoder_config_dir(args), decoder_patch_size=16, noise_tau=0.0,
            reshape_to_2d=True).eval()
  transport = create_transport("Linear", "velocity", time_dist_type="uniform",
                               time_dist_shift=math.sqrt(SHIFT_DIM / SHIFT_BASE))
  sample_fn = Sampler(transport).sample_ode(sampling_method="euler", num_steps=args.steps,
                                            atol=1e-6, rtol=1e-3, reverse=False)
  n = args.num_images
  z0 = torch.randn(n, 768, 16, 16)
  yc = torch.randint(0, 1000, (n,))

  def sample():  # as the official sample.py: doubled batch, forward_with_cfg, then decode
    with torch.no_grad():
      model.eval()
      z = torch.cat([z0, z0])
      yy = torch.cat([yc, torch.full_like(yc, 1000)])
      lat = sample_fn(z, model.forward_with_cfg, y=yy, cfg_scale=CFG_SCALE,
                      cfg_interval=(0.0, 1.0))[-1]
      lat, _ = lat.chunk(2, dim=0)
      return rae.decode(lat)
  out["sample"] = median_time(sample, 1, warmup=False)  # eager PyTorch: nothing to warm up
  print(f"official: sampling + decode {out['sample']:.2f} s", flush=True)


def official_stage1(args, out):
  """One train_stage1.py iteration (all phases on, fp32, no clipping as the official recipe)."""
  import copy  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import disc as disc_mod  # pylint: disable=g-import-not-at-top
  from disc import lpips as lpips_mod  # pylint: disable=g-import-not-at-top
  from disc.dinodisc import FrozenDINONoDrop, recipes  # pylint: disable=g-import-not-at-top
  from stage1 import RAE  # pylint: disable=g-import-not-at-top
  from utils.optim_utils import build_optimizer, build_scheduler  # pylint: disable=g-import-not-at-top
  from utils.train_utils import update_ema  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  # No downloads: torchvision's VGG16 and the LPIPS lin layers stay random.
  lpips_mod.models = types.SimpleNamespace(
      vgg16=lambda pretrained=False, **kw: torchvision.models.vgg16(weights=None))
  lpips_mod.LPIPS._load_pretrained_weights = lambda self, name="vgg_lpips": None
  dino_path = os.path.join(args.work_dir, f"dino_{S1_LOSS['disc_recipe']}_random.pth")
  if not os.path.isfile(dino_path):
    torch.save(FrozenDINONoDrop(**recipes[S1_LOSS["disc_recipe"]]).state_dict(), dino_path)

  size, enc_in, b = args.s1_image_size, args.s1_encoder_input, args.s1_batch
  grid = enc_in // 14
  enc = encoder_dir(args)
  rae = RAE(encoder_cls="Dinov2withNorm", encoder_config_path=enc, encoder_input_size=enc_in,
            encoder_params={"dinov2_path": enc, "normalize": True},
            decoder_config_path=decoder_config_dir(args), decoder_patch_size=size // grid,
            noise_tau=S1_LOSS["noise_tau"], reshape_to_2d=True)
  rae.encoder.eval()
  rae.decoder.train()
  ema_model = copy.deepcopy(rae).eval()
  ema_model.requires_grad_(False)
  rae.encoder.requires_grad_(False)
  rae.decoder.requires_grad_(True)
  decoder = rae.decoder
  disc_cfg = dict(arch=dict(dino_ckpt_path=dino_path, ks=S1_LOSS["ks"], norm_type="bn",
                            using_spec_norm=True, recipe=S1_LOSS["disc_recipe"]),
                  augment=dict(prob=1.0, cutout=0.0), **copy.deepcopy(S1_OPTIM))
  discriminator, disc_aug = disc_mod.build_discriminator(disc_cfg, torch.device("cpu"))
  lpips = disc_mod.LPIPS().eval()
  training_cfg = copy.deepcopy(S1_OPTIM)
  optimizer, _ = build_optimizer(decoder.parameters(), training_cfg)
  disc_optimizer, _ = build_optimizer([p for p in discriminator.parameters() if p.requires_grad],
                                      disc_cfg)
  scheduler, _ = build_scheduler(optimizer, S1_STEPS_PER_EPOCH, training_cfg)
  disc_scheduler, _ = build_scheduler(disc_optimizer, S1_STEPS_PER_EPOCH, disc_cfg)
  last_layer = decoder.decoder_pred.weight
  images = torch.from_numpy(test_images(b, size)).permute(0, 3, 1, 2).float() / 255.0
  w_p, w_d, max_d = S1_LOSS["perceptual_weight"], S1_LOSS["disc_weight"], S1_LOSS["max_d_weight"]

  def step():
    real_normed = images * 2.0 - 1.0
    optimizer.zero_grad(set_to_none=True)
    discriminator.eval()
    recon = rae(images)
    recon_normed = recon * 2.0 - 1.0
    rec_loss = (recon - images).abs().mean()
    recon_total = rec_loss + w_p * lpips(real_normed, recon_normed)
    logits_fake, _ = discriminator(disc_aug.aug(recon_normed), None)
    gan_loss = disc_mod.vanilla_g_loss(logits_fake)
    recon_grads = torch.autograd.grad(recon_total, last_layer, retain_graph=True)[0]
    gan_grads = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.clamp(torch.norm(recon_grads) / (torch.norm(gan_grads) + 1e-6), 0.0, max_d)
    total_loss = recon_total + w_d * d_weight.detach() * gan_loss
    total_loss.backward()
    optimizer.step()
    scheduler.step()
    update_ema(ema_model, rae, S1_LOSS["ema_decay"])
    rae.eval()
    discriminator.train()
    disc_optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
      fake = (rae(images) * 2.0 - 1.0).clamp(-1.0, 1.0)
    fake = torch.round((fake + 1.0) * 127.5) / 127.5 - 1.0
    lf, lr = discriminator(disc_aug.aug(fake), disc_aug.aug(real_normed))
    d_loss = disc_mod.hinge_d_loss(lr, lf)
    d_loss.backward()
    disc_optimizer.step()
    disc_scheduler.step()
    discriminator.eval()
    rae.train()
    rae.encoder.eval()
  out["stage1"] = median_time(step, args.repeats)
  print(f"official: stage-1 step {out['stage1']:.2f} s", flush=True)


def official_inception(args, out):
  import torch  # pylint: disable=g-import-not-at-top
  import pytorch_fid.inception as pfi  # pylint: disable=g-import-not-at-top
  sd = {k: torch.from_numpy(v) for k, v in fid_inception_state_dict().items()}
  pfi.load_state_dict_from_url = lambda *a, **kw: sd  # no download: the seeded weights
  net = pfi.InceptionV3([3]).eval()
  x = torch.from_numpy(test_images(args.inception_batch, 256)).permute(0, 3, 1, 2).float() / 255

  def run():
    with torch.no_grad():
      return net(x)[0]
  out["inception"] = args.inception_batch / median_time(run, args.repeats)
  np.save(os.path.join(args.work_dir, "pool3_official.npy"), run().flatten(1).numpy())
  print(f"official: Inception pool3 {out['inception']:.1f} img/s", flush=True)


def official_worker(args):
  _import_official(args)
  import torch  # pylint: disable=g-import-not-at-top
  out = {"torch_threads": torch.get_num_threads()}
  official_stage2(args, out)
  if not args.skip_stage1:
    official_stage1(args, out)
  official_inception(args, out)
  with open(args.worker_out, "w") as f:
    json.dump(out, f)


# ----------------------------------------------------------------------------------------------
# rae-jax side

def jax_stage2(args, out):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from rae_jax import presets  # pylint: disable=g-import-not-at-top
  from rae_jax.models.ditdh import DiTDH  # pylint: disable=g-import-not-at-top
  from rae_jax.pipeline import builders, image_generator  # pylint: disable=g-import-not-at-top
  model = DiTDH(**COMMON, **S)
  b = args.batch
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (b, 16, 16, 768))
  y = jax.random.randint(k[1], (b,), 0, 1000)
  params = jax.jit(model.init)(k[2], x[:1], jnp.zeros((1,)), y[:1])["params"]
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(2e-4, 0.9, 0.95, weight_decay=0.0))
  opt = tx.init(params)

  @jax.jit
  def train_step(params, opt, key):
    kt, kn, kd = jax.random.split(key, 3)
    t = jax.nn.sigmoid(jax.random.normal(kt, (b,)))
    noise = jax.random.normal(kn, x.shape)
    te = t[:, None, None, None]

    def loss_fn(p):
      out = model.apply({"params": p}, te * x + (1 - te) * noise, t, y, train=True,
                        rngs={"label_dropout": kd})
      return jnp.mean((out - (x - noise)) ** 2)
    grads = jax.grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  fwd = jax.jit(lambda p: model.apply({"params": p}, x, jnp.full((b,), 0.5), y))
  state = [params, opt]

  def step():
    state[0], state[1] = train_step(state[0], state[1], k[0])
    jax.block_until_ready(state[0])
  out["train"] = median_time(step, args.repeats)
  out["forward"] = median_time(lambda: jax.block_until_ready(fwd(params)), args.repeats)
  print(f"rae-jax: train {out['train']:.2f} s, forward {out['forward']:.2f} s", flush=True)

  c = presets.base_config()
  c.encoder.path = encoder_dir(args)
  c.decoder.update(json_decoder_fields(args))
  c.decoder.patch_size = 16
  c.model = presets.ditdh_s()
  c.sampler.num_steps = args.steps
  c.guidance.update(method="cfg", scale=CFG_SCALE, t_min=0.0, t_max=1.0)
  rae, rae_vars = builders.build_rae(c, "", with_stats=False)
  n = args.num_images
  gen = jax.jit(image_generator.make_generate(c, model, rae, image_generator.transport_for(c, rae.latent_shape)))
  labels = jax.random.randint(k[1], (n,), 0, 1000)
  call = (params, None, rae_vars, labels, jnp.arange(n), k[3])
  compiled = gen.lower(*call).compile()  # compile outside the timed run
  out["sample"] = median_time(lambda: jax.block_until_ready(compiled(*call)), 1, warmup=False)
  print(f"rae-jax: sampling + decode {out['sample']:.2f} s", flush=True)


def json_decoder_fields(args) -> dict:
  with open(os.path.join(decoder_config_dir(args), "config.json")) as f:
    cfg = json.load(f)
  return {k: cfg[k] for k in VITB_DECODER}


def jax_stage1(args, out):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rae_jax import presets  # pylint: disable=g-import-not-at-top
  from rae_jax.interop.lpips_weights import lpips_params_from_state_dict  # pylint: disable=g-import-not-at-top
  from rae_jax.pipeline import builders, stage1  # pylint: disable=g-import-not-at-top
  from rae_jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from rae_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top

  size, enc_in, b = args.s1_image_size, args.s1_encoder_input, args.s1_batch
  c = presets.base_config()
  c.encoder.path = encoder_dir(args)
  c.encoder.input_size = enc_in
  c.decoder.update(json_decoder_fields(args))
  c.decoder.patch_size = size // (enc_in // 14)
  s1 = c.stage1
  s1.global_batch_size = b
  s1.noise_tau = S1_LOSS["noise_tau"]
  s1.ema_decay = S1_LOSS["ema_decay"]
  s1.loss.update(perceptual_weight=S1_LOSS["perceptual_weight"],
                 disc_weight=S1_LOSS["disc_weight"], max_d_weight=S1_LOSS["max_d_weight"],
                 lpips_start=0.0, disc_start=0.0, disc_upd_start=0.0,
                 lpips_weights="random (bench: passed as frozen params)")
  s1.disc.update(enabled=True, random_init=True, recipe=S1_LOSS["disc_recipe"], ks=S1_LOSS["ks"])
  parts = stage1.build_parts(c, S1_STEPS_PER_EPOCH * b)
  rae, rae_vars = builders.build_rae(c, "", with_stats=False)
  key = jax.random.key(0)
  with open(os.path.join(REFERENCE, "lpips.state_dict.json")) as f:
    lpips = lpips_params_from_state_dict(seeded_state_dict(json.load(f)))
  frozen = {"encoder": rae_vars["encoder"], "lpips": lpips,
            "dino": stage1.frozen_dino_params(parts.disc, s1.disc, key)}
  extra = jax.jit(stage1.disc_extra_init(parts.disc, parts.disc_sched.tx))(key)
  state = state_lib.create_train_state(rae_vars["decoder"], parts.sched.tx,
                                       jax.random.PRNGKey(0), extra)
  mesh = mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])
  rep = mesh_lib.replicated(mesh)
  frozen = jax.device_put(frozen, rep)
  shardings = state_lib.state_shardings(jax.eval_shape(lambda: state), mesh)
  step = stage1.make_step(c, rae, parts, shardings, mesh, jax.tree.map(lambda _: rep, frozen))
  assert parts.phases.at(0) == (True, True, True), parts.phases
  holder = [jax.device_put(state, shardings)]
  batch = jax.device_put({"image": jnp.asarray(test_images(b, size))},
                         mesh_lib.batch_sharding(mesh))

  def run():
    holder[0], metrics = step(holder[0], batch, frozen)
    jax.block_until_ready(metrics)
  out["stage1"] = median_time(run, args.repeats)
  print(f"rae-jax: stage-1 step {out['stage1']:.2f} s", flush=True)


def jax_inception(args, out):
  import jax  # pylint: disable=g-import-not-at-top
  from rae_jax.eval.inception import inception_features  # pylint: disable=g-import-not-at-top
  from rae_jax.interop.inception_weights import import_fid_inception  # pylint: disable=g-import-not-at-top
  params = import_fid_inception(fid_inception_state_dict(), source="seeded-rule weights")
  x = jax.numpy.asarray(test_images(args.inception_batch, 256))

  def run():
    return jax.block_until_ready(inception_features(params, x)["pool3"])
  out["inception"] = args.inception_batch / median_time(run, args.repeats)
  ref_path = os.path.join(args.work_dir, "pool3_official.npy")
  if os.path.isfile(ref_path):
    ref, ours = np.load(ref_path), np.asarray(run())
    out["inception_rel_err"] = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
  print(f"rae-jax: Inception pool3 {out['inception']:.1f} img/s", flush=True)


# ----------------------------------------------------------------------------------------------

def machine_line(load) -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  return (f"machine: {cpu}, {len(os.sched_getaffinity(0))} cores usable "
          f"({os.cpu_count()} online), load average at start {load[0]:.2f} / {load[1]:.2f} / "
          f"{load[2]:.2f} (1/5/15 min); torch {torch.__version__}, jax {jax.__version__}")


def ensure_official_env(args):
  marker = os.path.join(args.official_env, "pytorch_fid", "inception.py")
  if not os.path.isfile(marker):
    print(f"installing the official side's packages into {args.official_env} "
          "(bench/official_env.sh)", flush=True)
    subprocess.run(["bash", os.path.join(HERE, "official_env.sh"), args.official_env],
                   check=True, env={**os.environ, "PYTHON": sys.executable})


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--official_src", required=True, help="the official repo's src/ folder")
  ap.add_argument("--official_env", default=os.path.join(tempfile.gettempdir(),
                                                         "rae-official-env"),
                  help="package folder for the official side (bench/official_env.sh makes it)")
  ap.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "rae_bench_official"),
                  help="where the random encoder / DINO files are written once")
  ap.add_argument("--batch", type=int, default=4, help="DiTDH-S train / forward batch")
  ap.add_argument("--num_images", type=int, default=8)
  ap.add_argument("--steps", type=int, default=50, help="sampler num_steps (official meaning)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--s1_batch", type=int, default=2)
  ap.add_argument("--s1_image_size", type=int, default=256)
  ap.add_argument("--s1_encoder_input", type=int, default=224)
  ap.add_argument("--inception_batch", type=int, default=32)
  ap.add_argument("--data_workers", type=int, default=2)
  ap.add_argument("--skip_data", action="store_true")
  ap.add_argument("--skip_stage1", action="store_true")
  ap.add_argument("--worker_out", default="", help=argparse.SUPPRESS)  # the official child
  args = ap.parse_args()
  if not os.path.isfile(os.path.join(args.official_src, "stage2", "models", "DDT.py")):
    raise SystemExit(f"--official_src={args.official_src!r} has no stage2/models/DDT.py: pass the "
                     "official repo's src/ folder")
  if args.s1_encoder_input % 14 or args.s1_image_size % (args.s1_encoder_input // 14):
    raise SystemExit(f"--s1_encoder_input={args.s1_encoder_input} must be a multiple of 14 and "
                     f"--s1_image_size={args.s1_image_size} a multiple of its latent grid")
  os.makedirs(args.work_dir, exist_ok=True)
  if args.worker_out:
    official_worker(args)
    return
  load = os.getloadavg()
  ensure_official_env(args)
  encoder_dir(args)  # once, before either side reads it
  out_file = os.path.join(args.work_dir, "official_results.json")
  if os.path.exists(out_file):
    os.remove(out_file)
  subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:],
                  "--worker_out", out_file], check=True)
  with open(out_file) as f:
    ref = json.load(f)
  ours = {}
  jax_stage2(args, ours)
  if not args.skip_stage1:
    jax_stage1(args, ours)
  jax_inception(args, ours)

  print("\n" + machine_line(load) + f"; torch intra-op threads {ref['torch_threads']}")
  print("\n| benchmark (fp32, CPU, random weights) | official PyTorch | rae-jax | speed-up |\n"
        "|---|---|---|---|")
  rows = [(f"DiTDH-S train step, batch {args.batch}", "train"),
          (f"DiTDH-S forward, batch {args.batch}", "forward"),
          (f"Euler + CFG {CFG_SCALE} sampling ({args.steps} steps) of {args.num_images} images "
           "incl. ViT-B decode to 256 px", "sample")]
  if not args.skip_stage1:
    rows.append((f"stage-1 step: ViT-B decoder, L1 + LPIPS + GAN (DINO-{S1_LOSS['disc_recipe']}) "
                 f"+ D update, batch {args.s1_batch}, {args.s1_image_size} px", "stage1"))
  for name, key in rows:
    print(f"| {name} | {ref[key]:.2f} s | {ours[key]:.2f} s | {ref[key] / ours[key]:.2f}x |")
  err = ours.get("inception_rel_err")
  note = f"; pool3 max rel. diff {err:.1e}" if err is not None else ""
  print(f"| Inception pool3 (vs pytorch-fid), batch {args.inception_batch}, 256 px -> 299 "
        f"(img/s{note}) | {ref['inception']:.1f} | {ours['inception']:.1f} | "
        f"{ours['inception'] / ref['inception']:.2f}x |")
  if not args.skip_data:
    import data as data_bench  # pylint: disable=g-import-not-at-top  (bench/data.py)
    folder = os.path.join(tempfile.gettempdir(), "rae_bench_jpegs", "images")
    data_bench.make_jpegs(folder, 500)
    d_ours = data_bench.bench_ours(folder, args.data_workers, 64, 6, 256)
    d_ref = data_bench.bench_official(folder, args.data_workers, 64, 6, 256)
    print(f"| 256px JPEG loading, {args.data_workers} workers (img/s) | {d_ref:.0f} | "
          f"{d_ours:.0f} | {d_ours / d_ref:.2f}x |")


if __name__ == "__main__":
  main()
