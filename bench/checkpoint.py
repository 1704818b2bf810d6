"""Checkpoint integrity overhead on the DiTDH-S train state (params, EMA, Adam moments).

  python bench/checkpoint.py [--repeats 3] [--dir /tmp/rae_ckpt_bench]

Prints one table: synchronous save time, checksum time (the extra work at save), restore time
and verification time (the extra work at restore), and the overhead in percent.
"""
import argparse
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def ditdh_s_state():
  from rae_jax import presets
  from rae_jax.pipeline import builders
  from rae_jax.train import mesh as mesh_lib, optim, state as state_lib
  cfg = presets.ditdh_s()
  model = builders.build_stage2_model(cfg, jnp.float32)
  x = jnp.zeros((1, cfg.input_size, cfg.input_size, cfg.in_channels))

  def init(key):
    return model.init(key, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))['params']
  state, _ = state_lib.init_train_state(init, optim.make_optimizer(1e-4), jax.random.PRNGKey(0),
                                        jax.random.PRNGKey(1), mesh_lib.make_mesh())
  return state


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--dir', default=None)
  args = p.parse_args()
  from rae_jax.train import checkpoint as ckpt_lib
  state = ditdh_s_state()
  n = sum(x.size for x in jax.tree.leaves(state))
  ckpt_lib.checksums(state)  # compile
  root = args.dir or tempfile.mkdtemp(prefix='rae_ckpt_bench')
  rows = []
  for r in range(args.repeats):
    work = os.path.join(root, str(r))
    shutil.rmtree(work, ignore_errors=True)
    ck = ckpt_lib.Checkpointer(work, save_every=1, async_save=False)
    t0 = time.perf_counter()
    sums = ckpt_lib.checksums(state)
    t_sum = time.perf_counter() - t0
    t0 = time.perf_counter()
    ck.save(1, state, {}, {}, force=True)
    ck.wait()
    t_save = time.perf_counter() - t0 - t_sum  # save() computes the checksums itself
    t0 = time.perf_counter()
    restored, _, _ = ck.restore(state)
    jax.block_until_ready(restored)
    t_restore = time.perf_counter() - t0
    t0 = time.perf_counter()
    ckpt_lib.verify(restored, sums, 'bench')
    t_verify = time.perf_counter() - t0
    ck.close()
    rows.append((t_save, t_sum, t_restore, t_verify))
  save, summ, rest, ver = np.median(np.asarray(rows), axis=0)
  print(f'DiTDH-S train state: {n / 1e6:.1f} M values ({n * 4 / 2**20:.0f} MiB), '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s), median of {args.repeats}')
  print('| phase   | write/read (s) | checksum (s) | overhead |')
  print('|---------|----------------|--------------|----------|')
  print(f'| save    | {save:14.3f} | {summ:12.3f} | {100 * summ / save:7.1f}% |')
  print(f'| restore | {rest - ver:14.3f} | {ver:12.3f} | {100 * ver / (rest - ver):7.1f}% |')
  if not args.dir:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  main()
