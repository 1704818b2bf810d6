"""Train loop under faults: failed async save, config drift, damaged latest step, skip metrics."""
import errno
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rae_jax import config_checks
from rae_jax.train import checkpoint as ckpt_lib
from rae_jax.train import loop as loop_lib
from rae_jax.train import optim
from rae_jax.train import state as state_lib


class Counter:
  """Resumable iterator of scalar batches, with a data/num_skipped metric."""

  def __init__(self):
    self.i = 0

  def __next__(self):
    self.i += 1
    return jnp.float32(self.i)

  def get_state(self):
    return {'i': self.i}

  def set_state(self, s):
    self.i = s['i']

  def metrics(self):
    return {'data/num_skipped': 3}


@jax.jit
def _step(state, x):
  params = jax.tree.map(lambda p: p * 0.5 + x, state.params)
  return state.replace(step=state.step + 1, params=params, ema_params=params), {'loss': x}


def _fresh():
  params = {'w': jnp.zeros((8,), jnp.float32)}
  return state_lib.create_train_state(params, optim.make_optimizer(1e-3), jax.random.PRNGKey(0))


class Recorder:
  def __init__(self):
    self.rows = []

  def start_at(self, step):  # the writer protocol: first step this run logs (purge on resume)
    self.first_step = step

  def scalars(self, step, values):
    self.rows.append((step, dict(values)))

  def flush(self):
    pass


def _run(workdir, num_steps, config=None, **kw):
  ck = ckpt_lib.Checkpointer(workdir, save_every=2, keep=5)
  try:
    return loop_lib.train_loop(_step, _fresh(), Counter(), num_steps=num_steps,
                               global_batch_size=1, checkpointer=ck, config=config or {},
                               log_every=2, name='stage2', **kw)
  finally:
    ck.close()


def test_skip_count_reaches_training_metrics(tmp_path):
  rec = Recorder()
  _run(tmp_path, 2, writer=rec)
  assert rec.rows and rec.rows[-1][1]['stage2/data/num_skipped'] == 3


def test_failed_async_save_stops_at_the_next_step(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity
  original = atomicity.AtomicRenameTemporaryPath.finalize
  async def finalize(self, *args, **kwargs):
    if '4.orbax-checkpoint-tmp' in str(vars(self)):  # the step-4 save
      raise OSError(errno.ENOSPC, 'No space left on device (injected)')
    return await original(self, *args, **kwargs)
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', finalize)
  seen = []

  def hook(step, state, metrics):
    del state, metrics
    seen.append(step)
    if step == 5:  # let the background save finish before step 5's boundary check
      import time
      time.sleep(1.0)
  with pytest.raises(ckpt_lib.SaveFailed, match=r'save of step 4 .*No space left'):
    _run(tmp_path, 20, hooks=[hook])
  assert max(seen) <= 6, seen  # not one interval (or the whole run) later
  monkeypatch.undo()
  names = sorted(os.listdir(tmp_path / 'checkpoints'))
  assert '2' in names and '4' not in names, names
  # The next start cleans the partial save and resumes from step 2.
  ck = ckpt_lib.Checkpointer(tmp_path, save_every=2, keep=5)
  state, _ = loop_lib.resume(ck, _fresh())
  ck.close()
  assert int(state.step) == 2
  assert not ckpt_lib.incomplete_checkpoints(tmp_path / 'checkpoints')


def test_config_drift_refused_then_allowed(tmp_path):
  cfg = {'stage2': {'optim': {'lr': 1e-3}, 'ema_decay': 0.9}, 'log': {'every_steps': 2},
         'resume': {'allow_changes': ''}}
  _run(tmp_path, 2, config=cfg)
  drift = {**cfg, 'stage2': {'optim': {'lr': 2e-3}, 'ema_decay': 0.9}, 'log': {'every_steps': 9}}
  with pytest.raises(config_checks.ConfigError, match=r'config\.stage2\.optim\.lr: 0\.001 -> 0\.002'):
    _run(tmp_path, 4, config=drift)
  drift['resume'] = {'allow_changes': 'stage2.optim.lr'}
  state = _run(tmp_path, 4, config=drift)
  assert int(state.step) == 4


def test_damaged_latest_resume_is_bitwise_equal(tmp_path):
  want = _run(tmp_path / 'a', 6)
  _run(tmp_path / 'b', 6)
  d = tmp_path / 'b' / 'checkpoints'
  shutil.rmtree(d / '6' / 'state')
  os.makedirs(d / '6' / 'state')
  os.remove(d / '4' / '_CHECKPOINT_METADATA')
  got = _run(tmp_path / 'b', 6)  # resumes from 2, redoes 3..6
  assert sorted(os.listdir(d)) == ['2', '4', '4.corrupt', '6', '6.corrupt'], sorted(os.listdir(d))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
