"""Toy sharded eval generation, and a subprocess entry point for the multi-process eval test.

As a script (one per process) it runs generate_shards in three directories with a toy generator
whose noise is folded from the sample index, as the real one's is:
  full/     a straight run
  resumed/  a run preempted after PREEMPT_AFTER calls (every process at once), then resumed
  cut/      the same preempted run, left for the test to resume with one process
and writes <out>/process_<i>.json: per run, the local calls made, the rows asked for and the
files this process wrote. process_allgather raises for any array of rank >= 2 throughout: no
images may be gathered (barriers gather a name hash).

  python tests/eval_worker.py --out DIR --coordinator 127.0.0.1:PORT --num_processes 2
      --process_id I
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

NUM_SAMPLES, SHARD_SIZE, PER_DEVICE_BATCH, PREEMPT_AFTER = 30, 7, 1, 2
MANIFEST = {'toy': 1}


def toy_generate(params, guide_params, rae_vars, labels, indices, seed_key):
  """[0,1] images from per-index noise (fold_in of the sample index) and the label."""
  del params, guide_params, rae_vars
  noise = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(seed_key, i), (4, 4, 3)))(
      indices)
  return (noise + labels[:, None, None, None].astype(jnp.float32) * 0.1) % 1.0


def toy_labels() -> np.ndarray:
  return (np.arange(NUM_SAMPLES, dtype=np.int32) * 7) % 5


def bound_sampler(mesh):
  from rae_jax.eval import sample_shards
  sampler = sample_shards.ShardedSampler(toy_generate, mesh, PER_DEVICE_BATCH)
  return sample_shards.bind(sampler, {}, None, {}, jax.random.PRNGKey(3))


class Preempted(Exception):
  pass


class Counting:
  """The bound sampler's per-process path, counting calls and rows; optionally preempted."""

  def __init__(self, bound, stop_after: int = 0):
    self.bound, self.stop_after = bound, stop_after
    self.local_batch, self.global_batch = bound.local_batch, bound.global_batch
    self.calls, self.rows = 0, 0

  def local(self, labels, indices):
    if self.stop_after and self.calls == self.stop_after:
      raise Preempted
    self.calls += 1
    self.rows += len(indices)
    return self.bound.local(labels, indices)


def run(bound, directory: str, stop_after: int = 0) -> dict:
  from rae_jax.eval import sample_shards
  fn, wrote = Counting(bound, stop_after), []
  try:
    sample_shards.generate_shards(fn, toy_labels(), directory, SHARD_SIZE, manifest=MANIFEST,
                               on_shard=lambda i, p: wrote.append(os.path.basename(p)))
  except Preempted:
    # The whole job ends here: a restarted job only starts once every old process wrote its last
    # file (without this, process 0 could clean up before process 1's last write landed).
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('preempted')
  return {'calls': fn.calls, 'rows': fn.rows, 'wrote': wrote,
          'local_batch': fn.local_batch, 'global_batch': fn.global_batch}


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument('--out', required=True)
  p.add_argument('--coordinator', required=True)
  p.add_argument('--num_processes', type=int, required=True)
  p.add_argument('--process_id', type=int, required=True)
  # Where the shard folders go (default --out); with --shards_root=gs://..., only the straight
  # run and the preempted + resumed run (tests/test_gcs.py).
  p.add_argument('--shards_root', default=None)
  args = p.parse_args(argv)
  root = args.shards_root or args.out
  from rae_jax.train import mesh as mesh_lib
  mesh_lib.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  from jax.experimental import multihost_utils

  allgather = multihost_utils.process_allgather

  def no_image_gather(tree, *a, **k):  # barriers gather a name hash: that may pass
    if any(np.ndim(x) >= 2 for x in jax.tree.leaves(tree)):
      raise AssertionError('images gathered across processes during eval generation')
    return allgather(tree, *a, **k)
  multihost_utils.process_allgather = no_image_gather
  try:
    multihost_utils.process_allgather(np.zeros((2, 2)))
    raise RuntimeError('the image-gather guard is not active')
  except AssertionError:
    pass
  bound = bound_sampler(mesh_lib.make_mesh(1, -1))
  report = {'full': run(bound, os.path.join(root, 'full')),
            'preempted': run(bound, os.path.join(root, 'resumed'), PREEMPT_AFTER)}
  report['resumed'] = run(bound, os.path.join(root, 'resumed'))
  if not args.shards_root:
    report['cut'] = run(bound, os.path.join(root, 'cut'), PREEMPT_AFTER)
  with open(os.path.join(args.out, f'process_{jax.process_index()}.json'), 'w') as f:
    json.dump(report, f)
  print('finished', flush=True)


if __name__ == '__main__':
  sys.exit(main())
