"""Eval generation on 2 processes x 4 CPU devices (jax.distributed, gloo): every process writes
only what it generated, nothing is gathered, and the samples equal a 1-process run's."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import eval_worker
import train_worker
from rae_jax.eval import sample_shards
from rae_jax.train import mesh as mesh_lib

WORKER = pathlib.Path(__file__).resolve().parent / 'eval_worker.py'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _samples(paths):
  out = [np.load(p) for p in paths]
  try:
    return (np.concatenate([z['arr_0'] for z in out]), np.concatenate([z['arr_1'] for z in out]),
            np.concatenate([z['indices'] for z in out]))
  finally:
    for z in out:
      z.close()


def _part(i, a, b):
  return os.path.basename(sample_shards.part_path('', i, a, b))


@pytest.mark.slow
def test_two_process_eval_writes_per_process_and_matches_one_process(tmp_path):
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(WORKER), '--out', str(tmp_path), '--coordinator', f'127.0.0.1:{port}',
       '--num_processes', '2', '--process_id', str(pid)],
      env=train_worker.subprocess_env(devices=4), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for pid in range(2)]
  # Meanwhile: the 1-process reference on 8 devices (global batch 8 instead of 2 x 4).
  bound = eval_worker.bound_sampler(mesh_lib.make_mesh(1, 8))
  labels = eval_worker.toy_labels()
  single = sample_shards.generate_shards(bound, labels, str(tmp_path / 'single'),
                                      eval_worker.SHARD_SIZE, manifest=eval_worker.MANIFEST)
  ref = _samples(single)
  np.testing.assert_array_equal(ref[1], labels)
  np.testing.assert_array_equal(ref[2], np.arange(30))
  assert len(np.unique(ref[0].reshape(30, -1), axis=0)) == 30
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0 and 'finished' in out, out
  r = [json.load(open(tmp_path / f'process_{i}.json')) for i in range(2)]
  assert r[0]['full']['local_batch'] == 4 and r[0]['full']['global_batch'] == 8

  # 30 samples, shards of 7, 4 rows per process per call: chunks of ceil(30 / 8) * 4 = 16
  # samples, 4 calls each (32 rows of work = 30 rounded up to the global batch 8). Shard 2
  # (14..20) straddles the chunks: process 0 writes 14..15, process 1 16..20.
  full = [x['full'] for x in r]
  assert [x['calls'] for x in full] == [4, 4] and [x['rows'] for x in full] == [16, 14]
  assert full[0]['wrote'] == ['shard_00000.npz', 'shard_00001.npz', _part(2, 14, 16)]
  assert full[1]['wrote'] == [_part(2, 16, 21), 'shard_00003.npz', 'shard_00004.npz']
  files = sample_shards.shard_files(str(tmp_path / 'full'), 30, 7)
  assert [os.path.basename(f) for f in files] == (
      full[0]['wrote'] + full[1]['wrote'])
  for a, b in zip(_samples(files), ref):
    np.testing.assert_array_equal(a, b)

  # Preempted after 2 calls: shard 0 whole and process 1's part of shard 2 exist. The resume
  # removes that part (its shard is incomplete) and cuts the 23 missing samples into chunks of
  # 12: 3 calls each (24 rows), shard 2 now split at 19.
  assert [x['preempted']['wrote'] for x in r] == [['shard_00000.npz'], [_part(2, 16, 21)]]
  resumed = [x['resumed'] for x in r]
  assert [x['calls'] for x in resumed] == [3, 3] and [x['rows'] for x in resumed] == [12, 11]
  assert resumed[0]['wrote'] == ['shard_00001.npz', _part(2, 14, 19)]
  assert resumed[1]['wrote'] == [_part(2, 19, 21), 'shard_00003.npz', 'shard_00004.npz']
  assert sorted(os.listdir(tmp_path / 'resumed')) == sorted(
      ['manifest.json', 'shard_00000.npz'] + resumed[0]['wrote'] + resumed[1]['wrote'])
  got = _samples(sample_shards.shard_files(str(tmp_path / 'resumed'), 30, 7))
  for a, b in zip(got, ref):
    np.testing.assert_array_equal(a, b)

  # The same preempted run resumed by 1 process on 8 devices: shards 1..4 whole, 3 calls.
  calls = []

  class Counting:
    local_batch, global_batch = bound.local_batch, bound.global_batch

    def local(self, y, i):
      calls.append(len(i))
      return bound.local(y, i)
  cut = str(tmp_path / 'cut')
  assert sorted(os.listdir(cut)) == ['manifest.json', 'shard_00000.npz', _part(2, 16, 21)]
  paths = sample_shards.generate_shards(Counting(), labels, cut, 7, manifest=eval_worker.MANIFEST)
  assert calls == [8, 8, 7]
  assert [os.path.basename(p) for p in paths] == [f'shard_{i:05d}.npz' for i in range(5)]
  assert sorted(os.listdir(cut)) == ['manifest.json'] + [f'shard_{i:05d}.npz' for i in range(5)]
  for a, b in zip(_samples(paths), ref):
    np.testing.assert_array_equal(a, b)


def test_parts_tile_shards_and_stale_parts_are_removed(tmp_path, monkeypatch):
  """One process: complete parts count as a done shard (kept, not regenerated); partial parts,
  parts next to a whole file and temp files are removed; holes are named."""
  bound = eval_worker.bound_sampler(mesh_lib.make_mesh(1, 8))
  labels = eval_worker.toy_labels()
  ref_paths = sample_shards.generate_shards(bound, labels, str(tmp_path / 'ref'), 7)
  ref = _samples(ref_paths)
  d = tmp_path / 'd'
  d.mkdir()

  def put(path, a, b):
    np.savez(path, arr_0=ref[0][a:b], arr_1=labels[a:b], indices=np.arange(a, b))
  put(sample_shards.part_path(str(d), 1, 7, 10), 7, 10)     # shard 1 complete as two parts
  put(sample_shards.part_path(str(d), 1, 10, 14), 10, 14)
  put(sample_shards.part_path(str(d), 2, 14, 17), 14, 17)   # shard 2: a hole at 17..20
  put(sample_shards.shard_path(str(d), 3), 21, 28)          # shard 3 whole, plus a stale part
  put(sample_shards.part_path(str(d), 3, 21, 25), 21, 25)
  put(sample_shards.part_path(str(d), 4, 28, 30), 26, 28)   # wrong labels: regenerated
  (d / 'shard_00000.npz.tmp.npz').write_bytes(b'half a zip')
  with pytest.raises(FileNotFoundError, match='shard 0 .samples 0..6. has no file'):
    sample_shards.shard_files(str(d), 30, 7)
  calls = []

  class Counting:
    local_batch = bound.local_batch

    def local(self, y, i):
      calls.append([int(i[0]), len(i)])
      return bound.local(y, i)
  paths = sample_shards.generate_shards(Counting(), labels, str(d), 7)
  assert calls == [[0, 8], [15, 8]]  # shards 0, 2, 4 only (16 samples)
  assert [os.path.basename(p) for p in paths] == [
      'shard_00000.npz', _part(1, 7, 10), _part(1, 10, 14), 'shard_00002.npz', 'shard_00003.npz',
      'shard_00004.npz']
  assert sorted(os.listdir(d)) == sorted(['manifest.json'] + [os.path.basename(p) for p in paths])
  for a, b in zip(_samples(paths), ref):
    np.testing.assert_array_equal(a, b)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(ValueError, match='needs a sample_fn with a per-process'):
    sample_shards.generate_shards(lambda y, i: None, labels, str(tmp_path / 'x'), 7)


def test_sampler_batches_are_the_scorers_batches():
  """The online eval hook feeds Inception the sampler's batch-sharded images: they must be the
  very batches (rows, padding, sharding) the scorer builds from the same images on the host."""
  from rae_jax.eval import scoring
  mesh = mesh_lib.make_mesh(1, 8)
  sampler = sample_shards.ShardedSampler(eval_worker.toy_generate, mesh, per_device_batch=1)
  scorer = scoring.Scorer(mesh, None, True, 1)
  labels, key = eval_worker.toy_labels()[:19], jax.random.PRNGKey(3)
  host = sampler({}, None, {}, labels, np.arange(19), key)
  ours = list(sampler.batches({}, None, {}, labels, np.arange(19), key))
  theirs = list(scorer.global_batches(scoring.array_reader(host), 19))
  assert [k for _, k in ours] == [k for _, k in theirs] == [8, 8, 3]
  for (x, _), (y, _) in zip(ours, theirs):
    assert x.sharding.is_equivalent_to(y.sharding, 4) and x.dtype == y.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
