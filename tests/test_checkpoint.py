"""Checkpoints: resume after SIGKILL (mid-save) and SIGTERM equals an uninterrupted run."""
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

import train_worker

WORKER = pathlib.Path(__file__).resolve().parent / 'train_worker.py'


def worker_env(tmp_path_factory):
  # Cache shared with test_multihost's 1-process reference (the same program).
  return train_worker.subprocess_env(tmp_path_factory.getbasetemp() / 'tiny_jax_cache',
                                     devices=4)


def _run(args, env, timeout=600):
  proc = subprocess.run([sys.executable, str(WORKER)] + args, env=env, capture_output=True,
                        text=True, timeout=timeout)
  return proc.returncode, proc.stdout + proc.stderr


def _load(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _assert_bitwise_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_resume_after_kill_mid_save_and_sigterm_is_bitwise_identical(tmp_path,
                                                                    tmp_path_factory):
  env = worker_env(tmp_path_factory)
  rc, log = _run(['--workdir', str(tmp_path / 'a'), '--steps', '6', '--out',
                  str(tmp_path / 'a.npz')], env)
  assert rc == 0, log

  # Killed (SIGKILL) while the step-4 checkpoint is written but not yet committed.
  rc, log = _run(['--workdir', str(tmp_path / 'b'), '--steps', '6', '--kill_mid_save_at', '4'],
                 env)
  assert rc == -signal.SIGKILL, log
  assert 'killing mid-save at step 4' in log
  ckpt_dir = tmp_path / 'b' / 'checkpoints'
  names = sorted(os.listdir(ckpt_dir))
  assert '2' in names and '4' not in names, names
  assert any(n.startswith('4.orbax-checkpoint-tmp') for n in names), names

  # Restart: ignores the half-written step 4, resumes from 2; SIGTERM after step 3 makes it
  # save synchronously and exit 0.
  proc = subprocess.Popen([sys.executable, str(WORKER), '--workdir', str(tmp_path / 'b'),
                           '--steps', '6', '--step_sleep', '1.0'],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith('done step 3'):
      proc.send_signal(signal.SIGTERM)
  rc = proc.wait(timeout=300)
  log = ''.join(lines)
  assert rc == 0, log
  assert 'Ignoring incomplete checkpoint' in log and '4.orbax-checkpoint-tmp' in log, log
  assert 'at step 2.' in log and 'done step 3' in log, log  # resumed from 2, redid step 3
  assert 'Preempted at step' in log and 'finished' not in log, log
  stopped = int(log.split('Preempted at step ')[1].split(':')[0])
  assert 3 <= stopped < 6, log
  names = os.listdir(ckpt_dir)
  assert not any('orbax-checkpoint-tmp' in n for n in names), names
  assert str(stopped) in names, names

  # Second restart runs to the end: bitwise equal to the uninterrupted run.
  rc, log = _run(['--workdir', str(tmp_path / 'b'), '--steps', '6', '--out',
                  str(tmp_path / 'b.npz')], env)
  assert rc == 0, log
  assert f'at step {stopped}.' in log, log
  _assert_bitwise_equal(_load(tmp_path / 'b.npz'), _load(tmp_path / 'a.npz'))
  # Keep the last 2 plus every 4th step.
  steps = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  assert steps == sorted({4, 6} | ({stopped} if stopped == 5 else set())), steps


def test_checkpointer_roundtrip_in_process(tmp_path):
  """Sharded state + JSON data state + config survive a save/restore (async, then wait)."""
  import jax
  import jax.numpy as jnp
  from rae_jax.train import checkpoint as ckpt_lib
  from rae_jax.train import mesh as mesh_lib
  from rae_jax.train import optim
  from rae_jax.train import state as state_lib

  mesh = mesh_lib.make_mesh(2, 4)
  tx = optim.make_optimizer(1e-3)
  params = {'w': jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8), 'b': jnp.ones(3)}
  state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(3))
  shardings = state_lib.state_shardings(jax.eval_shape(lambda: state), mesh, min_size=0)
  state = jax.device_put(state, shardings)
  ck = ckpt_lib.Checkpointer(tmp_path, save_every=5, keep=1)
  assert ck.latest_step() is None
  assert ck.save(5, state, {'epoch': 1, 'step': 9}, {'model': 'tiny'})
  ck.wait()
  zeros = jax.tree.map(jnp.zeros_like, state)
  restored, data_state, config = ck.restore(zeros)
  assert data_state == {'epoch': 1, 'step': 9} and config == {'model': 'tiny'}
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert restored.params['w'].sharding.spec == state.params['w'].sharding.spec
  ck.close()
  # Not a step multiple: should_save is False; a leftover temporary directory is reported.
  os.makedirs(tmp_path / 'checkpoints' / '10.orbax-checkpoint-tmp-123')
  ck2 = ckpt_lib.Checkpointer(tmp_path, save_every=5, keep=1)
  assert ck2.ignored == ['10.orbax-checkpoint-tmp-123']
  assert ck2.latest_step() == 5 and not ck2.should_save(7)
  ck2.close()
  with pytest.raises(FileNotFoundError, match='no complete checkpoint'):
    ckpt_lib.Checkpointer(tmp_path / 'empty', save_every=1).restore(zeros)


def test_metric_writer_tensorboard(tmp_path):
  from rae_jax.train.loop import MetricWriter, image_grid
  grid = image_grid(np.ones((5, 4, 6, 3)) * 0.5)
  assert grid.shape == (8, 18, 3) and grid.dtype == np.uint8 and grid.max() == 128
  writer = MetricWriter(str(tmp_path), wandb=None)
  writer.scalars(3, {'train/loss': 0.5, 'train/lr': 1e-4})
  writer.images(3, 'samples', np.random.default_rng(0).random((4, 8, 8, 3)))
  writer.close()
  events = list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
  assert len(events) == 1 and events[0].stat().st_size > 100
