"""Stage-2 train-step benchmarks, printed as a table. Run by hand, e.g.

  python bench/train_step.py                        # all rows, defaults below
  python bench/train_step.py --rows=s_step --steps=3
  python bench/train_step.py --rows=xl_memory --mem_devices=64 --per_device_batch=16
  python bench/train_step.py --rows=s_step --torch_ref_src=/path/to/official/RAE/src

Rows:
  s_step     DiTDH-S (official S config, 16x16x768 latents) train step on one device:
             compile time, step time, images/s (float32 by default).
  xl_compile DiTDH-XL train-step compile time with and without scan-over-layers.
  xl_memory  compiled.memory_analysis() per device for DiTDH-XL on a mesh of --mem_devices
             forced host devices at --per_device_batch images per device (remat on/off).
  encoder    steps/s from cached latents vs. with the frozen RAE encoder (DINOv2-B, random
             weights: speed only) inside the step, on 256px images.
  xl_step    DiTDH-XL (256 tokens) train step at --xl_batch: step time, images/s, FLOPs, MFU.
             bf16 on accelerators, float32 on CPU (--dtype overrides).
  scale      Pod-scale check of DiTDH-XL and the ViT-XL decoder at --scale_devices forced host
             devices (default mesh): replicated parameter bytes (default mesh vs all devices on
             fsdp), per-device memory per remat policy (state + saved activations from an
             abstract trace), and, for --scale_compile policies, compiled memory_analysis() and
             the largest collectives of the compiled DiTDH-XL step.
  memory_plan  Per-chip memory plan of the pod recipes (configs/stage2_ditdh_xl_256.py, _512.py,
             stage1_dinov2b_decxl_256.py) at --plan_chips chips (default mesh, recipe global
             batch, bf16 compute as on TPU) for every remat policy, from the shape-only estimator
             (train/memory.py) and the compiled step's memory_analysis() on 256 forced host
             devices (bench_memory_plan says how they combine), marked against 16 GiB (v5e),
             32 GiB (v4) and 95 GiB (v5p) at 90% headroom; then the least-recompute policy that
             fits each chip. ~20 min on 2 CPUs (--plan_compile='' : estimates only, ~1 min).
  stage1_step  Stage-1 step of the ViT-XL decoder with L1 + LPIPS (VGG16) + DINO-S/8 GAN and a
             D update at 256px, DINOv2-B-sized frozen encoder (random weights), --s1_batch.
  s_step, xl_step and stage1_step print model FLOPs per step from compiled.cost_analysis() next
  to the analytic count (bench/flops.py) and MFU against the device's peak (a table for TPU
  v4/v5e/v5p/v6e, A100/H100/H200; a measured matmul peak on CPU).
  --torch_ref_src adds the official PyTorch DiTwDDTHead train step (same config, batch, AdamW)
  on this machine for comparison; nothing from it is imported unless the flag is given.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--rows', default='s_step,xl_compile,xl_memory,encoder',
                 help='comma-separated subset of: s_step, xl_compile, xl_memory, encoder, '
                      'xl_step, stage1_step, scale, memory_plan')
  p.add_argument('--xl_batch', type=int, default=0, help='xl_step batch (0: 2 on CPU, 64 else)')
  p.add_argument('--s1_batch', type=int, default=2, help='stage1_step batch')
  p.add_argument('--s1_decoder', default='XL', help='stage1_step decoder size (B, L, XL)')
  p.add_argument('--attention_impl', default='auto', help='xla | cudnn | splash | auto')
  p.add_argument('--batch', type=int, default=4, help='batch for s_step and encoder rows')
  p.add_argument('--steps', type=int, default=3, help='timed steps per row (after 1 warmup)')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--mem_devices', type=int, default=64)
  p.add_argument('--per_device_batch', type=int, default=16)
  p.add_argument('--mem_remat', default='1,0', help='remat settings for xl_memory (1,0)')
  p.add_argument('--xl_scan', default='1,0', help='scan_layers settings for xl_compile')
  p.add_argument('--image_size', type=int, default=256)
  p.add_argument('--scale_devices', default='64,256', help='device counts for the scale row')
  p.add_argument('--scale_compile', default='nothing_saveable',
                 help='remat policies whose DiTDH-XL step the scale row compiles ("" for none)')
  p.add_argument('--plan_margin_gib', type=float, default=1.7,
                 help='memory_plan: added to the estimate of cells that are not compiled '
                      '(compiled minus estimated, DiTDH-XL 256px nothing_saveable at 64 x 16 img)')
  p.add_argument('--plan_chips', default='64,256', help='chip counts for memory_plan')
  p.add_argument('--plan_compile', default='all',
                 help='memory_plan: remat policies (off, dots_saveable, ...) whose cells are '
                      'compiled (memory_analysis); all (default) or "" (estimates only)')
  p.add_argument('--torch_ref_src', default=None,
                 help='official RAE src/ folder: also time its train step (PyTorch, CPU)')
  p.add_argument('--torch_threads', type=int, default=0, help='torch.set_num_threads (0: default)')
  return p.parse_args(argv)


ARGS = parse_args()
if any(r in ARGS.rows for r in ('xl_memory', 'scale', 'memory_plan')):
  # Forced host devices must be configured before JAX initialises its CPU backend.
  _forced = max([ARGS.mem_devices] * ('xl_memory' in ARGS.rows) +
                [int(n) for n in ARGS.scale_devices.split(',')] * ('scale' in ARGS.rows) +
                [int(n) for n in ARGS.plan_chips.split(',')] * ('memory_plan' in ARGS.rows))
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={_forced}')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flops  # noqa: E402  (bench/flops.py)

from rae_jax.diffusion.transport import create_transport  # noqa: E402
from rae_jax.models.ditdh import DiTDH  # noqa: E402
from rae_jax.train import mesh as mesh_lib  # noqa: E402
from rae_jax.train import optim  # noqa: E402
from rae_jax.train import state as state_lib  # noqa: E402
from rae_jax.train import step as step_lib  # noqa: E402

LATENT = (16, 16, 768)
S = dict(hidden_size=(384, 2048), depth=(12, 2), num_heads=(6, 16))
XL = dict(hidden_size=(1152, 2048), depth=(28, 2), num_heads=(16, 16))
ROWS: list[tuple[str, str, str]] = []


def row(name, metric, value):
  ROWS.append((name, metric, value))
  print(f'  {name:<44} {metric:<26} {value}', flush=True)


def ditdh(size: dict, dtype=jnp.float32, **kw):
  kw.setdefault('attention_impl', ARGS.attention_impl)
  return DiTDH(input_size=16, patch_size=1, in_channels=768, mlp_ratio=4.0,
               class_dropout_prob=0.1, num_classes=1000, use_qknorm=False, use_swiglu=True,
               use_rope=True, use_rmsnorm=True, wo_shift=False, use_pos_embed=True, dtype=dtype,
               **size, **kw)


def stage2_loss(model, encode=None):
  """Official stage-2 loss: logit-normal(0,1) times shifted by sqrt(16*16*768/4096)."""
  transport = create_transport(time_dist_type='logit-normal_0_1',
                               time_dist_shift=float(np.sqrt(np.prod(LATENT) / 4096)))

  def loss_fn(params, batch, key, frozen=None):
    k_loss, k_drop = jax.random.split(key)
    x = batch['latent'] if encode is None else encode(frozen, batch['image'])

    def apply_fn(p, x_t, t, y):
      return model.apply({'params': p}, x_t, t, y, train=True, rngs={'label_dropout': k_drop})
    return transport.training_loss(params, apply_fn, x, k_loss, y=batch['label']), {}
  return loss_fn


def setup(model, mesh, batch_size, *, encode=None, frozen_shardings=None, abstract=False):
  tx = optim.make_optimizer(optim.lr_schedule(2e-4, 2e-5, 40, 800), clip_grad=1.0)

  def init(key):
    x = jnp.zeros((1,) + LATENT)
    params = model.init(key, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))['params']
    return state_lib.create_train_state(params, tx, jax.random.PRNGKey(1))
  abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = state_lib.state_shardings(abstract_state, mesh)
  step = step_lib.make_train_step(stage2_loss(model, encode), tx, 0.9995, shardings,
                                  mesh_lib.batch_sharding(mesh), frozen_shardings=frozen_shardings)
  if abstract:
    return step, state_lib.abstract_state(abstract_state, shardings), shardings
  return step, jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0)), shardings


def latent_batch(mesh, b, abstract=False):
  bs = mesh_lib.batch_sharding(mesh)
  if abstract:
    return {'latent': jax.ShapeDtypeStruct((b,) + LATENT, jnp.float32, sharding=bs),
            'label': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=bs)}
  rng = np.random.default_rng(0)
  return jax.device_put({'latent': rng.standard_normal((b,) + LATENT).astype(np.float32),
                         'label': rng.integers(0, 1000, b).astype(np.int32)}, bs)


def run_compiled(compiled):
  """A compiled TrainStep executable takes (state, batch, frozen, draws) positionally."""
  return lambda state, batch, *extra: compiled(state, batch, extra[0] if extra else None, None)


def timed_steps(step, state, batch, n, *extra):
  state, m = step(state, batch, *extra)  # warmup (also finishes async compile work)
  jax.block_until_ready(m)
  times = []
  for _ in range(n):
    t = time.perf_counter()
    state, m = step(state, batch, *extra)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return state, float(np.median(times))


def bench_s_step(args):
  mesh = mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])
  dtype = jnp.dtype(args.dtype)
  model = ditdh(S, dtype)
  step, state, _ = setup(model, mesh, args.batch)
  batch = latent_batch(mesh, args.batch)
  t = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  row(f'DiTDH-S step, batch {args.batch}, {args.dtype}', 'compile', f'{time.perf_counter() - t:.1f} s')
  _, dt = timed_steps(run_compiled(compiled), state, batch, args.steps)
  row(f'DiTDH-S step, batch {args.batch}, {args.dtype}', 'step time (median)', f'{dt:.2f} s')
  row(f'DiTDH-S step, batch {args.batch}, {args.dtype}', 'images/s', f'{args.batch / dt:.3f}')
  flops.flops_rows(row, f'DiTDH-S step, batch {args.batch}, {args.dtype}', compiled,
                   ditdh_train_flops(S, state.params, args.batch), dt, args.dtype)
  return dt


def ditdh_train_flops(size: dict, params, batch: int) -> float:
  """Analytic train-step FLOPs: per-token matmuls, per-sample ones (embedders, encoder adaLN
  on the (B, D) condition), attention of every layer over the 256 tokens."""
  enc_d, dec_d = size['depth']
  per_sample = ['t_embedder', 'y_embedder'] + [f'blocks_{i}/adaLN' for i in range(enc_d)]
  tok, smp = flops.matmul_params(params, per_sample)
  tokens = LATENT[0] * LATENT[1]
  attn = [(tokens, size['hidden_size'][0])] * enc_d + [(tokens, size['hidden_size'][1])] * dec_d
  return flops.analytic_flops(batch, tokens, tok, smp, attn, train=True)


def bench_xl_step(args):
  """DiTDH-XL train step on one device: the MFU target row (bf16 on accelerators)."""
  on_cpu = jax.devices()[0].platform == 'cpu'
  dtype = args.dtype if (on_cpu or args.dtype != 'float32') else 'bfloat16'
  b = args.xl_batch or (2 if on_cpu else 64)
  mesh = mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])
  model = ditdh(XL, jnp.dtype(dtype))
  step, state, _ = setup(model, mesh, b)
  batch = latent_batch(mesh, b)
  name = f'DiTDH-XL step, batch {b}, {dtype}, attn {args.attention_impl}'
  t = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  row(name, 'compile', f'{time.perf_counter() - t:.1f} s')
  _, dt = timed_steps(run_compiled(compiled), state, batch, args.steps)
  row(name, 'step time (median)', f'{dt * 1e3:.1f} ms')
  row(name, 'images/s', f'{b / dt:.2f}')
  flops.flops_rows(row, name, compiled, ditdh_train_flops(XL, state.params, b), dt, dtype)
  return b / dt


def bench_stage1_step(args):
  """The stage-1 step main.py runs, every loss term on (phase (lpips, gan, D update) all on)."""
  from rae_jax import presets  # pylint: disable=g-import-not-at-top
  from rae_jax.losses.lpips import LPIPS  # pylint: disable=g-import-not-at-top
  from rae_jax.interop.rae_loader import load_rae  # pylint: disable=g-import-not-at-top
  from rae_jax.pipeline import builders, common, stage1  # pylint: disable=g-import-not-at-top
  on_cpu = jax.devices()[0].platform == 'cpu'
  dtype = args.dtype if (on_cpu or args.dtype != 'float32') else 'bfloat16'
  c = presets.base_config()
  c.compute_dtype = dtype
  c.model.attention_impl = args.attention_impl
  c.decoder = presets.vit_decoder(args.s1_decoder)
  b = c.stage1.global_batch_size = args.s1_batch
  c.stage1.loss.lpips_start = c.stage1.loss.disc_start = c.stage1.loss.disc_upd_start = 0.0
  c.stage1.disc.enabled = True
  c.stage1.disc.random_init = True
  mesh = mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])
  # DINOv2-B/14-sized frozen encoder (MAE layout, no registers: the same FLOPs), random weights.
  enc = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, patch_size=14, image_size=224)
  rae, rae_vars = load_rae('toy_vit', None, builders.decoder_config_dict(c),
                           decoder_patch_size=16, encoder_input_size=224, noise_tau=0.8,
                           encoder_overrides=enc, dtype=jnp.dtype(dtype))
  # build_parts without its LPIPS-file check: LPIPS runs on random VGG weights here.
  settings = stage1.loss_settings(c)
  sched = common.optimizer(c.stage1.optim, 1000 * b, b)
  disc = stage1.build_discriminator(c.stage1.disc, jnp.dtype(dtype), args.attention_impl)
  parts = stage1.Stage1Parts(settings, stage1.Phases.from_config(c.stage1, settings, 1000),
                             sched, disc, common.optimizer(c.stage1.disc.optim, 1000 * b, b))
  key = jax.random.PRNGKey(0)
  img = jnp.zeros((1, 256, 256, 3))
  frozen = {'encoder': rae_vars['encoder'],
            'lpips': jax.jit(LPIPS().init)(key, img, img)['params'],
            'dino': stage1.frozen_dino_params(disc, c.stage1.disc, key)}
  state, shardings = state_lib.init_train_state(
      rae.init_decoder, parts.sched.tx, key, jax.random.PRNGKey(1), mesh,
      init_extra=stage1.disc_extra_init(disc, parts.disc_sched.tx))
  frozen = jax.device_put(frozen, mesh_lib.replicated(mesh))
  step = stage1.make_step(c, rae, parts, shardings, mesh,
                          jax.tree.map(lambda a: a.sharding, frozen))
  rng = np.random.default_rng(0)
  batch = jax.device_put({'image': rng.random((b, 256, 256, 3), np.float32)},
                         mesh_lib.batch_sharding(mesh))
  name = f'stage-1 ViT-{args.s1_decoder} dec + LPIPS + DINO GAN, batch {b}, {dtype}'
  t = time.perf_counter()
  state, m = step(state, batch, frozen)
  jax.block_until_ready(m)
  row(name, 'compile + first step', f'{time.perf_counter() - t:.1f} s')
  _, dt = timed_steps(step, state, batch, args.steps, frozen)
  row(name, 'step time (median)', f'{dt:.2f} s')
  row(name, 'images/s', f'{b / dt:.3f}')
  fn = next(iter(step.variants.values()))
  try:
    compiled = fn.lower(state, batch, frozen, None).compile()
    xf = flops.xla_flops(compiled)
    row(name, 'GFLOPs/step (XLA)', f'{xf / 1e9:.1f}')
    util, source = flops.mfu(xf, dt, dtype)
    row(name, 'MFU', f'{100 * util:.1f} % of {source} ({dtype})')
  except Exception as e:  # pylint: disable=broad-except
    row(name, 'GFLOPs/step (XLA)', f'n/a ({type(e).__name__})')


def bench_torch_reference(args):
  """The official DiTwDDTHead train step: forward, flow-matching loss, backward, clip, AdamW."""
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.abspath(args.torch_ref_src))
  from stage2.models.DDT import DiTwDDTHead  # pylint: disable=g-import-not-at-top
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  torch.manual_seed(0)
  model = DiTwDDTHead(input_size=16, patch_size=1, in_channels=768, mlp_ratio=4.0,
                      class_dropout_prob=0.1, num_classes=1000, use_qknorm=False,
                      use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False,
                      use_pos_embed=True, **{k: list(v) for k, v in S.items()})
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0)
  b = args.batch
  x = torch.randn(b, 768, 16, 16)
  y = torch.randint(0, 1000, (b,))

  def one():
    t = torch.sigmoid(torch.randn(b))
    noise = torch.randn_like(x)
    te = t.view(-1, 1, 1, 1)
    xt = te * x + (1 - te) * noise
    loss = ((model(xt, t, y) - (x - noise)) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
  one()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    one()
    times.append(time.perf_counter() - t0)
  dt = float(np.median(times))
  row(f'official PyTorch DiTDH-S step, batch {b}, fp32', 'step time (median)', f'{dt:.2f} s')
  row(f'official PyTorch DiTDH-S step, batch {b}, fp32', 'images/s', f'{b / dt:.3f}')
  return dt


def bench_xl_compile(args):
  mesh = mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])
  for scan in [s == '1' for s in args.xl_scan.split(',')]:
    model = ditdh(XL, jnp.dtype(args.dtype), scan_layers=scan, remat=True)
    step, state, _ = setup(model, mesh, 2, abstract=True)
    t = time.perf_counter()
    lowered = step.lower(state, latent_batch(mesh, 2, abstract=True))
    t_lower = time.perf_counter() - t
    lowered.compile()
    t_all = time.perf_counter() - t
    row(f'DiTDH-XL step compile, scan_layers={scan}', 'trace+lower / total',
        f'{t_lower:.1f} s / {t_all:.1f} s')


def bench_xl_memory(args):
  n = args.mem_devices
  if jax.device_count() < n:
    raise SystemExit(f'xl_memory needs {n} devices, found {jax.device_count()} '
                     '(run with JAX_PLATFORMS=cpu so the forced host devices are used).')
  mesh = mesh_lib.make_mesh(1, -1, devices=jax.devices()[:n])
  b = args.per_device_batch * n
  for remat in [s == '1' for s in args.mem_remat.split(',')]:
    model = ditdh(XL, jnp.dtype(args.dtype), scan_layers=True, remat=remat)
    step, state, _ = setup(model, mesh, b, abstract=True)
    t = time.perf_counter()
    compiled = step.lower(state, latent_batch(mesh, b, abstract=True)).compile()
    mem = compiled.memory_analysis()
    gib = 1024 ** 3
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes +
             mem.temp_size_in_bytes)
    name = (f'DiTDH-XL, {n} devices x {args.per_device_batch} img, remat={remat}')
    row(name, 'args / temp (GiB/device)',
        f'{mem.argument_size_in_bytes / gib:.2f} / {mem.temp_size_in_bytes / gib:.2f}')
    row(name, 'peak estimate (GiB/device)',
        f'{total / gib:.2f} ({"fits" if total <= 14 * gib else "EXCEEDS"} 14 GiB)')
    row(name, 'compile', f'{time.perf_counter() - t:.1f} s')


def _collectives(hlo: str, top: int = 3) -> list[str]:
  """The `top` largest collectives of an HLO module by result bytes, e.g. 'all-gather 1.2 GiB'."""
  import re  # pylint: disable=g-import-not-at-top
  sizes = {'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'u8': 1, 'pred': 1, 's8': 1}
  found = []
  kinds = r'(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?'
  for m in re.finditer(r'= \(?(\w+)\[([\d,]*)\][^ ]* ' + kinds + r'\(', hlo):
    dims = [int(d) for d in m.group(2).split(',') if d]
    nbytes = int(np.prod(dims)) * sizes.get(m.group(1), 4)
    found.append((nbytes, f'{m.group(3)} {m.group(1)}[{m.group(2)}]'))
  found.sort(reverse=True)
  return [f'{name} ({b / 2**20:.0f} MiB)' for b, name in found[:top]]


def bench_scale(args):
  """Replicated bytes, per-device memory per remat policy, largest collectives at pod scale."""
  from rae_jax.models import layers  # pylint: disable=g-import-not-at-top
  from rae_jax.models.decoder import ViTDecoder  # pylint: disable=g-import-not-at-top
  from rae_jax.train import memory  # pylint: disable=g-import-not-at-top
  from rae_jax.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  gib = 2 ** 30
  decoder = ViTDecoder(hidden_size=768, decoder_hidden_size=1152, decoder_num_hidden_layers=28,
                       decoder_num_attention_heads=16, decoder_intermediate_size=4096,
                       patch_size=16, num_patches=256, dtype=jnp.dtype(args.dtype))
  dec_params = jax.eval_shape(lambda k: decoder.init(k, jnp.zeros((1, 256, 768)))['params'],
                              jax.random.PRNGKey(0))
  for n in [int(v) for v in args.scale_devices.split(',')]:
    devices = jax.devices()[:n]
    mesh = mesh_lib.make_mesh(-1, -1, devices=devices)
    flat = mesh_lib.make_mesh(1, n, devices=devices)
    b = args.per_device_batch * n
    shape = f'{n} dev, mesh {tuple(mesh.devices.shape)}'
    model = ditdh(XL, jnp.dtype(args.dtype), scan_layers=True)
    step, state, shardings = setup(model, mesh, b, abstract=True)
    for name, params in (('DiTDH-XL', state.params), ('ViT-XL decoder', dec_params)):
      for label, m in (('default mesh', mesh), (f'all {n} on fsdp', flat)):
        r = sharding_lib.replication_report(params, sharding_lib.fsdp_shardings(params, m,
                                                                               min_size=1024))
        row(f'{name}, {n} dev, {label}', 'replicated params',
            f'{r["replicated_bytes"] / 2**20:.1f} MiB ({100 * r["replicated_fraction"]:.2f}%)')
    per_shard = args.per_device_batch
    x = jax.ShapeDtypeStruct((per_shard,) + LATENT, jnp.float32)
    t = jax.ShapeDtypeStruct((per_shard,), jnp.float32)
    y = jax.ShapeDtypeStruct((per_shard,), jnp.int32)
    tokens = jax.ShapeDtypeStruct((per_shard, 256, 768), jnp.float32)
    dec_state = jax.eval_shape(lambda p: state_lib.create_train_state(
        p, optim.make_optimizer(1e-4), jax.random.PRNGKey(0)), dec_params)
    dec_shardings = state_lib.state_shardings(dec_state, mesh)
    for policy in [None] + sorted(layers.REMAT_POLICIES):
      kw = {} if policy is None else dict(remat=True, remat_policy=policy)
      m = model.clone(**kw)
      acts = memory.residual_bytes(
          lambda p, x, t, y: jnp.sum(m.apply({'params': p}, x, t, y)), state.params, x, t, y)
      est = memory.estimate(state, shardings, acts, 1)
      row(f'DiTDH-XL, {shape}, {per_shard}/dev', f'remat={policy}',
          f'{est["total"] / gib:.2f} GiB (state {est["state"] / gib:.2f}, act '
          f'{est["activations"] / gib:.2f})')
      d = decoder.clone(**kw)
      acts = memory.residual_bytes(lambda p, z: jnp.sum(d.apply({'params': p}, z)),
                                   dec_params, tokens)
      est = memory.estimate(dec_state, dec_shardings, acts, 1)
      row(f'ViT-XL decoder fwd/bwd, {shape}, {per_shard}/dev', f'remat={policy}',
          f'{est["total"] / gib:.2f} GiB (state {est["state"] / gib:.2f}, act '
          f'{est["activations"] / gib:.2f})')
    for policy in [p for p in args.scale_compile.split(',') if p]:
      m = model.clone(remat=True, remat_policy=policy)
      step, state, shardings = setup(m, mesh, b, abstract=True)
      t0 = time.perf_counter()
      compiled = step.lower(state, latent_batch(mesh, b, abstract=True)).compile()
      mem = compiled.memory_analysis()
      total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes +
               mem.temp_size_in_bytes)
      name = f'DiTDH-XL step compiled, {shape}, {per_shard}/dev, remat={policy}'
      row(name, 'memory_analysis (GiB/dev)',
          f'{total / gib:.2f} (args {mem.argument_size_in_bytes / gib:.2f}, temp '
          f'{mem.temp_size_in_bytes / gib:.2f}); compile {time.perf_counter() - t0:.0f} s')
      row(name, 'largest collectives', '; '.join(_collectives(compiled.as_text())))


IMAGENET_SIZE = 1_281_167  # training images: sets the recipes' schedules, not memory
PLAN_RECIPES = ('stage2_ditdh_xl_256', 'stage2_ditdh_xl_512', 'stage1_dinov2b_decxl_256')


def _recipe(name: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                      name + '.py')
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _compiled_bytes(lowered) -> int:
  """Per-device bytes of a compiled program (memory_analysis: arguments + outputs - donated
  aliases + temporaries)."""
  m = lowered.compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
             m.temp_size_in_bytes)


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def _stage2_plan_parts(c, dtype):
  """(abstract state, residual-bytes fn(policy, per-device batch), frozen bytes, compiled-bytes
  fn(policy, mesh)) of a stage-2 recipe; the compiled step is the one main.py runs on cached
  latents (stage2.make_step), float32."""
  from rae_jax.pipeline import builders, common, image_generator, stage2  # pylint: disable=g-import-not-at-top
  from rae_jax.train import memory  # pylint: disable=g-import-not-at-top
  model = builders.build_stage2_model(c.model, dtype)
  latent = builders.stage2_latent_shape(c)
  tx = optim.make_optimizer(1e-4, clip_grad=1.0)
  state = jax.eval_shape(lambda k: state_lib.create_train_state(
      builders.init_stage2_params(model, latent, k), tx, k), jax.random.PRNGKey(0))

  def remat(m, policy):
    return m.clone(remat=policy is not None, remat_policy=policy or 'nothing_saveable')

  def acts(policy, b):
    m = remat(model, policy)
    x = jax.ShapeDtypeStruct((b,) + latent, jnp.float32)
    t = jax.ShapeDtypeStruct((b,), jnp.float32)
    y = jax.ShapeDtypeStruct((b,), jnp.int32)
    return memory.residual_bytes(
        lambda p, x, t, y: jnp.sum(m.apply({'params': p}, x, t, y).astype(jnp.float32)),
        state.params, x, t, y)

  def compiled(policy, mesh):
    m = remat(builders.build_stage2_model(c.model, jnp.float32), policy)
    gb = c.stage2.global_batch_size
    sched = common.optimizer(c.stage2.optim, IMAGENET_SIZE, gb)
    abstract = jax.eval_shape(lambda k: state_lib.create_train_state(
        builders.init_stage2_params(m, latent, k), sched.tx, k), jax.random.PRNGKey(0))
    shardings = state_lib.state_shardings(abstract, mesh)
    step = stage2.make_step(c, m, None, image_generator.transport_for(c, latent), sched, shardings,
                            mesh, from_cache=True, frozen_shardings={'stats': {}},
                            latent_shape=latent)
    bs = mesh_lib.batch_sharding(mesh)
    batch = {'latent': jax.ShapeDtypeStruct((gb,) + latent, jnp.float32, sharding=bs),
             'label': jax.ShapeDtypeStruct((gb,), jnp.int32, sharding=bs)}
    return _compiled_bytes(step.lower(state_lib.abstract_state(abstract, shardings), batch,
                                      {'stats': {}}))
  return state, acts, 0, compiled


def _stage1_plan_parts(c, dtype):
  """The same for stage 1. The estimate counts the generator half of the step (decoder fwd/bwd
  through L1 + LPIPS + DINO GAN, the peak; the D update runs after the decoder's residuals are
  freed), frozen weights replicated; the compiled program is the whole step main.py runs
  (stage1.make_step, every loss term and the D update on), float32, random weights."""
  from rae_jax.interop.rae_loader import read_decoder_config  # pylint: disable=g-import-not-at-top
  from rae_jax.losses import decoder_loss  # pylint: disable=g-import-not-at-top
  from rae_jax.losses.diffaug import diffaug_draws  # pylint: disable=g-import-not-at-top
  from rae_jax.losses.lpips import LPIPS  # pylint: disable=g-import-not-at-top
  from rae_jax.models.decoder import decoder_from_hf_config  # pylint: disable=g-import-not-at-top
  from rae_jax.models.rae import RAE  # pylint: disable=g-import-not-at-top
  from rae_jax.models.vit_encoders import build_encoder  # pylint: disable=g-import-not-at-top
  from rae_jax.pipeline import builders, stage1  # pylint: disable=g-import-not-at-top
  from rae_jax.train import memory  # pylint: disable=g-import-not-at-top
  c = c.copy_and_resolve_references()
  c.stage1.disc.random_init = True  # shapes only: no DINO / VGG / DINOv2 files are read
  c.stage1.loss.lpips_weights = 'not read (shapes only)'
  key = jax.random.PRNGKey(0)
  size = c.encoder.input_size

  def build(policy, dt):
    enc = build_encoder('dinov2_reg', patch_size=c.encoder.patch_size, image_size=518, dtype=dt)
    grid = size // enc.patch_size
    dec = decoder_from_hf_config(read_decoder_config(builders.decoder_config_dict(c)),
                                 hidden_size=enc.hidden_size, patch_size=c.decoder.patch_size,
                                 num_patches=grid * grid, dtype=dt)
    dec = dec.clone(remat=policy is not None, remat_policy=policy or 'nothing_saveable',
                    scan_layers=bool(c.decoder.get('scan_layers', False)))
    return RAE(enc, dec, size)

  rae = build(None, dtype)
  parts = stage1.build_parts(c, IMAGENET_SIZE)
  image = jnp.zeros((1, rae.image_size, rae.image_size, 3))
  frozen_tree = {
      'encoder': jax.eval_shape(lambda k: rae.encoder.init(k, jnp.zeros((1, size, size, 3))),
                                key)['params'],
      'lpips': jax.eval_shape(lambda k: LPIPS().init(k, image, image)['params'], key),
      'dino': jax.eval_shape(lambda k: parts.disc.init(k, image)['params']['dino'], key)}
  params = jax.eval_shape(rae.init_decoder, key)
  tx = optim.make_optimizer(1e-4, clip_grad=0.0)
  state = jax.eval_shape(lambda p: state_lib.create_train_state(p, tx, key), params)
  frozen = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(frozen_tree))
  lpips = LPIPS()
  tokens = (rae.latent_grid ** 2, rae.encoder.hidden_size)
  img = rae.image_size

  disc = stage1.build_discriminator(c.stage1.disc, dtype, c.model.attention_impl)
  dv = jax.eval_shape(lambda k: disc.init(k, image), key)
  settings = parts.settings  # the recipe's weights: every term on

  def acts(policy, b):
    dm = build(policy, dtype).decoder
    z = jax.ShapeDtypeStruct((b,) + tokens, jnp.float32)
    x = jax.ShapeDtypeStruct((b, img, img, 3), jnp.float32)

    def gen_loss(p, z, x, lp, dv):  # the step's generator objective, every term on
      xh = dm.apply({'params': p}, z).astype(jnp.float32)
      g_aug = diffaug_draws(key, xh.shape[0])
      return decoder_loss.generator_objective(
          settings, xh, x, lpips=lambda a, b: lpips.apply({'params': lp}, a, b),
          gan_loss=lambda r: decoder_loss.gan_generator_loss(settings, r, disc, dv, g_aug))
    return memory.residual_bytes(gen_loss, params, z, x, frozen_tree['lpips'], dv,
                                 exclude=(frozen_tree['lpips'], dv))

  def compiled(policy, mesh):
    r = build(policy, jnp.float32)
    p32 = stage1.build_parts(c, IMAGENET_SIZE)  # float32 discriminator (compute_dtype auto)

    def init(k):
      extra = stage1.disc_extra_init(p32.disc, p32.disc_sched.tx)(k)
      return state_lib.create_train_state(r.init_decoder(k), p32.sched.tx, k, extra)
    abstract = jax.eval_shape(init, key)
    shardings = state_lib.state_shardings(abstract, mesh)
    rep = mesh_lib.replicated(mesh)
    frozen_sh = jax.tree.map(lambda _: rep, frozen_tree)
    step = stage1.make_step(c, r, p32, shardings, mesh, frozen_sh)
    gb = c.stage1.global_batch_size
    batch = {'image': jax.ShapeDtypeStruct((gb, img, img, 3), jnp.uint8,
                                           sharding=mesh_lib.batch_sharding(mesh))}
    s = p32.settings
    return _compiled_bytes(step.for_phase((s.lpips_on, s.gan_on, s.gan_on)).lower(
        state_lib.abstract_state(abstract, shardings), batch,
        _with_shardings(frozen_tree, frozen_sh), None))
  return state, acts, frozen, compiled


def bench_memory_plan(args):
  """Per-chip memory of the pod recipes per remat policy, and the least-recompute one that fits.

  The tables in the recipe docstrings come from here. For every cell (recipe, chips, policy):
    estimate   train/memory.py, shape-only: float32 params + EMA + Adam sharded on the default
               mesh, gradients, saved residuals of one per-chip batch, frozen weights; at bf16
               compute (as on TPU) and at float32.
    compiled   memory_analysis() of the step main.py runs, compiled for the recipe's mesh on
               forced host devices. The CPU compiler computes bf16 in float32, so this is the
               float32 program.
    planned    bf16 estimate + what the compiler adds beyond the float32 estimate in this very
               cell (gathered weights, one rematerialised layer, collective buffers: compiled -
               float32 estimate, never less than 0). Transients of the bf16 program are at most
               those of the float32 one, so this errs on the safe side.
  "ok": planned <= 90% of the chip. Without --plan_compile cells the planned value uses
  --plan_margin_gib instead. Remat never changes results; where "remat off" fits,
  --config.<section>.remat=False is faster.
  """
  from rae_jax.train import memory  # pylint: disable=g-import-not-at-top
  gib = 2 ** 30
  chips = [int(v) for v in args.plan_chips.split(',')]
  names = [None if p == 'off' else p for p in args.plan_compile.split(',') if p]
  to_compile = memory.RECOMPUTE_ORDER if args.plan_compile == 'all' else tuple(names)
  choices = []
  for name in PLAN_RECIPES:
    c = _recipe(name)
    s1 = name.startswith('stage1')
    gb = (c.stage1 if s1 else c.stage2).global_batch_size
    plan_parts = _stage1_plan_parts if s1 else _stage2_plan_parts
    state, acts, frozen, compiled = plan_parts(c, jnp.bfloat16)  # compute_dtype='auto' on TPU
    _, acts32, _, _ = plan_parts(c, jnp.float32)
    for n in chips:
      mesh = mesh_lib.make_mesh(-1, -1, devices=jax.devices()[:n], max_fsdp=c.mesh.max_fsdp)
      shardings = state_lib.state_shardings(state, mesh)
      per = gb // n
      where = f'{name}, {n} chips, mesh {tuple(mesh.devices.shape)}, {per} img/chip'
      planned = {}
      for policy in memory.RECOMPUTE_ORDER:
        est = memory.estimate(state, shardings, acts(policy, per), 1)
        est_bf16 = est['total'] + frozen
        detail = (f'estimate bf16 {est_bf16 / gib:.2f} (state+grads '
                  f'{(est["state"] + est["grads"]) / gib:.2f}, act {est["activations"] / gib:.2f}'
                  + (f', frozen {frozen / gib:.2f}' if frozen else '') + ')')
        if policy in to_compile:
          t0 = time.perf_counter()
          comp = compiled(policy, mesh)
          est32 = memory.estimate(state, shardings, acts32(policy, per), 1)['total'] + frozen
          extra = max(0, comp - est32)
          detail += (f', compiled f32 {comp / gib:.2f} (f32 estimate {est32 / gib:.2f}, '
                     f'compile {time.perf_counter() - t0:.0f} s)')
        else:
          extra = int(args.plan_margin_gib * gib)
          detail += f', + margin {args.plan_margin_gib}'
        planned[policy] = est_bf16 + extra
        fits = ' '.join(f'{chip}:{"ok" if planned[policy] <= 0.9 * g * gib else "NO"}'
                        for chip, g in memory.CHIP_GIB.items())
        row(where, f'remat={policy or "off"}',
            f'planned {planned[policy] / gib:.2f} GiB [{detail}] {fits}')
      for chip, g in memory.CHIP_GIB.items():
        choices.append((name, n, chip, memory.least_recompute(planned, g * gib)))
  for name, n, chip, policy in choices:
    row(f'{name}, {n} chips', f'least recompute on {chip} ({memory.CHIP_GIB[chip]} GiB)', policy)


def bench_encoder(args):
  """Steps/s from cached latents vs. encoding 256px images with DINOv2-B inside the step."""
  from rae_jax.models.resize import resize_bicubic  # pylint: disable=g-import-not-at-top
  from rae_jax.models.vit_encoders import build_encoder  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])
  dtype = jnp.dtype(args.dtype)
  encoder = build_encoder('dinov2_reg', patch_size=14, image_size=518, dtype=dtype)  # DINOv2-B/14
  enc_params = jax.jit(encoder.init)(jax.random.PRNGKey(2),
                                     jnp.zeros((1, 224, 224, 3)))['params']

  def encode(frozen, images):
    # What RAE.encode does at tau = 0 (no stats): resize to 224, normalise, encode, reshape.
    mean = jnp.asarray((0.485, 0.456, 0.406))
    std = jnp.asarray((0.229, 0.224, 0.225))
    x = resize_bicubic(images, (224, 224))
    z = jax.lax.stop_gradient(encoder.apply({'params': frozen}, (x - mean) / std))
    return z.reshape(z.shape[0], 16, 16, z.shape[-1])
  model = ditdh(S, dtype)
  rep = jax.tree.map(lambda _: mesh_lib.replicated(mesh), enc_params)
  step_img, state, _ = setup(model, mesh, args.batch, encode=encode, frozen_shardings=rep)
  rng = np.random.default_rng(0)
  s = args.image_size
  images = jax.device_put({'image': rng.random((args.batch, s, s, 3), np.float32),
                           'label': rng.integers(0, 1000, args.batch).astype(np.int32)},
                          mesh_lib.batch_sharding(mesh))
  enc_params = jax.device_put(enc_params, rep)
  _, dt_img = timed_steps(step_img, state, images, args.steps, enc_params)
  step_lat, state, _ = setup(model, mesh, args.batch)
  _, dt_lat = timed_steps(step_lat, state, latent_batch(mesh, args.batch), args.steps)
  name = f'DiTDH-S batch {args.batch}: encoder in step vs cached'
  row(name, 'steps/s (encoder in step)', f'{1 / dt_img:.3f}')
  row(name, 'steps/s (cached latents)', f'{1 / dt_lat:.3f} ({dt_img / dt_lat:.2f}x)')


def main():
  args = ARGS
  rows = [r.strip() for r in args.rows.split(',') if r.strip()]
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind}; jax {jax.__version__}')
  table = {'xl_compile': bench_xl_compile, 'xl_memory': bench_xl_memory,
           'encoder': bench_encoder, 'xl_step': bench_xl_step, 'stage1_step': bench_stage1_step,
           'scale': bench_scale, 'memory_plan': bench_memory_plan}
  unknown = [r for r in rows if r != 's_step' and r not in table]
  if unknown:
    raise SystemExit(f'unknown row(s) {unknown}; valid: s_step, {", ".join(table)}')
  for r in rows:
    print(f'== {r}', flush=True)
    if r == 's_step':
      dt = bench_s_step(args)
      if args.torch_ref_src:
        dt_ref = bench_torch_reference(args)
        row('JAX / PyTorch throughput', 'ratio', f'{dt_ref / dt:.2f}x')
    else:
      table[r](args)
  print('\n| benchmark | metric | value |\n|---|---|---|')
  for name, metric, value in ROWS:
    print(f'| {name} | {metric} | {value} |')


if __name__ == '__main__':
  main()
