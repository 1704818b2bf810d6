"""Tiny stage-2 training setup shared by the training tests, and a subprocess entry point.

As a script it trains a tiny DiTDH with the real loop/checkpointer, in modes used by the
resume, SIGTERM and multi-host tests:

  python tests/train_worker.py --workdir W --steps 6 [--kill_mid_save_at S] [--step_sleep T]
      [--coordinator 127.0.0.1:PORT --num_processes 2 --process_id I] [--out params.npz]
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

LATENT = (4, 4, 8)
NUM_CLASSES = 10
GLOBAL_BATCH = 8


def tiny_model(**kw):
  from rae_jax.models.ditdh import DiTDH
  cfg = dict(input_size=4, patch_size=1, in_channels=8, hidden_size=(32, 64), depth=(2, 1),
             num_heads=(2, 4), mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=NUM_CLASSES)
  cfg.update(kw)
  return DiTDH(**cfg)


def make_loss_fn(model):
  """Stage-2 loss on cached latents: logit-normal, shifted flow matching + label dropout."""
  from rae_jax.diffusion.transport import create_transport
  transport = create_transport(time_dist_type='logit-normal_0_1',
                               time_dist_shift=float(np.sqrt(np.prod(LATENT) / 64)))

  def loss_fn(params, batch, key):
    k_loss, k_drop = jax.random.split(key)

    def apply_fn(p, x_t, t, y):
      return model.apply({'params': p}, x_t, t, y, train=True, rngs={'label_dropout': k_drop})
    per_example = transport.training_loss(params, apply_fn, batch['latent'], k_loss,
                                          y=batch['label'])
    return per_example, {'latent_std': jnp.std(batch['latent'], axis=(1, 2, 3))}
  return loss_fn


def init_params_fn(model):
  def init(key):
    x = jnp.zeros((1,) + LATENT, jnp.float32)
    return model.init(key, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))['params']
  return init


def global_batch_np(seed: int, step: int, size: int = GLOBAL_BATCH) -> dict:
  """The global batch of `step`: a pure function of (seed, step)."""
  rng = np.random.default_rng([seed, step])
  return {'latent': rng.standard_normal((size,) + LATENT).astype(np.float32),
          'label': rng.integers(0, NUM_CLASSES, size).astype(np.int32)}


class LatentIterator:
  """Deterministic, resumable iterator over this process's rows of each global batch."""

  def __init__(self, seed: int, rows: slice, size: int = GLOBAL_BATCH):
    self.seed, self.rows, self.size, self.step = seed, rows, size, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = global_batch_np(self.seed, self.step, self.size)
    self.step += 1
    return {k: v[self.rows] for k, v in batch.items()}

  def get_state(self):
    return {'step': self.step, 'seed': self.seed}

  def set_state(self, state):
    if state['seed'] != self.seed:
      raise ValueError(f"data state seed {state['seed']} != iterator seed {self.seed}")
    self.step = int(state['step'])


def imported_params(model, mesh):
  """Stand-in for imported weights: global arrays in FSDP shardings (spanning every process)."""
  from rae_jax.train import sharding as sharding_lib
  init = init_params_fn(model)
  shardings = sharding_lib.fsdp_shardings(jax.eval_shape(init, jax.random.PRNGKey(5)), mesh,
                                          min_size=256)
  return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(5))


def build(mesh, *, lr_warmup=2, lr_end=6, accum_steps=1, model_kw=None, imported=False):
  """(model, tx, schedule, state, shardings, step_fn) for the tiny stage-2 run on `mesh`.

  imported=True starts from given weights (as stage 2 from imported weights does)."""
  from rae_jax.train import mesh as mesh_lib, optim, state as state_lib, step as step_lib
  model = tiny_model(**(model_kw or {}))
  schedule = optim.lr_schedule(1e-3, 1e-4, lr_warmup, lr_end, 'linear')
  tx = optim.make_optimizer(schedule, clip_grad=1.0)
  params = imported_params(model, mesh) if imported else None
  state, shardings = state_lib.init_train_state(
      None if imported else init_params_fn(model), tx, jax.random.PRNGKey(0),
      jax.random.PRNGKey(1), mesh, params=params, min_size=256)
  step_fn = step_lib.make_train_step(make_loss_fn(model), tx, 0.9, shardings,
                                     mesh_lib.batch_sharding(mesh), accum_steps,
                                     lr_schedule=schedule)
  return model, tx, schedule, state, shardings, step_fn


def xla_flags(devices: int, *extra: str) -> str:
  """XLA_FLAGS for a subprocess: `devices` host devices plus every flag this run was given
  (e.g. `--xla_cpu_max_isa=AVX2` forced on the whole suite), so a forced ISA reaches every
  process the tests start."""
  inherited = [f for f in os.environ.get('XLA_FLAGS', '').split()
               if not f.startswith('--xla_force_host_platform_device_count')]
  return ' '.join(inherited + [f'--xla_force_host_platform_device_count={devices}', *extra])


def subprocess_env(cache_dir=None, devices: int = 4) -> dict:
  """Environment for worker subprocesses: `devices` CPU devices, the same XLA flags in every
  run (bitwise comparisons), a low backend optimisation level (the tiny step compiles ~3x
  faster) and optionally a persistent compilation cache so that only the first run compiles."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = xla_flags(devices, '--xla_backend_optimization_level=0')
  env['JAX_PLATFORMS'] = 'cpu'
  if cache_dir is not None:
    env['JAX_COMPILATION_CACHE_DIR'] = str(cache_dir)
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  return env


def _block_checkpoint_commits():
  """Simulates a kill in the middle of a save: the commit (atomic rename) never happens."""
  from orbax.checkpoint._src.path import atomicity
  never = threading.Event()

  async def finalize(self, *args, **kwargs):
    del self, args, kwargs
    while not never.is_set():
      time.sleep(0.05)
  atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument('--workdir', required=True)
  p.add_argument('--steps', type=int, default=6)
  p.add_argument('--save_every', type=int, default=2)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--kill_mid_save_at', type=int, default=0)
  p.add_argument('--step_sleep', type=float, default=0.0)
  p.add_argument('--mesh', default='1,-1')
  p.add_argument('--coordinator', default=None)
  p.add_argument('--num_processes', type=int, default=None)
  p.add_argument('--process_id', type=int, default=None)
  p.add_argument('--out', default=None)
  p.add_argument('--imported', action='store_true', help='start from imported weights')
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                      format='%(levelname)s %(message)s', force=True)
  logging.getLogger('absl').setLevel(logging.WARNING)  # orbax's per-save chatter

  from rae_jax.train import mesh as mesh_lib
  mesh_lib.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  from rae_jax.train import checkpoint as ckpt_lib, loop as loop_lib
  data, fsdp = (int(v) for v in args.mesh.split(','))
  mesh = mesh_lib.make_mesh(data, fsdp)
  _, _, _, state, _, step_fn = build(mesh, imported=args.imported)
  rows = mesh_lib.process_batch_slice(mesh, GLOBAL_BATCH)
  data_iter = LatentIterator(args.seed, rows)
  ckpt = ckpt_lib.Checkpointer(args.workdir, save_every=args.save_every, keep=2, keep_every=4)
  hooks = []
  if args.step_sleep:
    hooks.append(lambda step, *_: time.sleep(args.step_sleep))
  hooks.append(lambda step, *_: print(f'done step {step}', flush=True))
  if args.kill_mid_save_at:
    kill_at = args.kill_mid_save_at

    def kill_after_save_started(step, *_):
      if step != kill_at:
        return
      ckpt.wait()
      _block_checkpoint_commits()
      ckpt.save(step, state_box[0], data_iter.get_state(), {'seed': args.seed}, force=True)
      tmp = ckpt_lib.incomplete_checkpoints(ckpt.directory)
      print(f'killing mid-save at step {step}; on disk: {sorted(os.listdir(ckpt.directory))}'
            f' incomplete: {tmp}', flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    state_box = [None]
    hooks.insert(0, lambda step, st, _: state_box.__setitem__(0, st))
    hooks.append(kill_after_save_started)

  def prepare(batch):
    return mesh_lib.global_batch(mesh, batch, GLOBAL_BATCH)
  state = loop_lib.train_loop(step_fn, state, data_iter, num_steps=args.steps,
                              global_batch_size=GLOBAL_BATCH, checkpointer=ckpt,
                              config={'seed': args.seed}, log_every=2, hooks=hooks,
                              prepare_batch=prepare, name='tiny')
  ckpt.close()
  if args.out:
    from jax.experimental import multihost_utils
    host = multihost_utils.process_allgather({'params': state.params, 'ema': state.ema_params},
                                             tiled=True)
    if jax.process_index() == 0:
      flat = {jax.tree_util.keystr(k): np.asarray(v)
              for k, v in jax.tree_util.tree_leaves_with_path(host)}
      np.savez(args.out, **flat)
  print('finished', flush=True)


if __name__ == '__main__':
  main()
