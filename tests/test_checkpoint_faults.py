"""Damaged, bit-flipped and failed checkpoints: one clear line, moved aside, previous step used."""
import errno
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rae_jax.train import checkpoint as ckpt_lib
from rae_jax.train import mesh as mesh_lib
from rae_jax.train import optim
from rae_jax.train import state as state_lib


def _state(scale):
  mesh = mesh_lib.make_mesh(2, 4)
  tx = optim.make_optimizer(1e-3)
  params = {'w': jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64) * scale,
            'b': jnp.ones(3) * scale}
  state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(3))
  state = state.replace(ema_params=jax.tree.map(lambda x: x + 0.5, state.params))
  shardings = state_lib.state_shardings(jax.eval_shape(lambda: state), mesh, min_size=0)
  return jax.device_put(state, shardings)


def _save_steps(tmp_path, steps=(10, 15, 20)):
  ck = ckpt_lib.Checkpointer(tmp_path, save_every=5, keep=5)
  for s in steps:
    ck.save(s, _state(float(s)), {'step': s}, {'lr': 1.0})
  ck.close()
  return os.path.join(tmp_path, 'checkpoints')


def _largest_data_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, 'state'))
           for f in fs if os.sep + 'd' + os.sep in os.path.join(r, f)]
  return max(files, key=os.path.getsize)


def _truncate(d):
  f = _largest_data_file(d)
  with open(f, 'r+b') as fh:
    fh.truncate(os.path.getsize(f) // 2)


def _flip_4k(d):
  _flip_4k_file(_largest_data_file(d))


def _flip_4k_file(f):
  with open(f, 'r+b') as fh:
    data = bytearray(fh.read())
    start = max(0, len(data) // 2 - 2048)
    for i in range(start, min(len(data), start + 4096)):
      data[i] ^= 0x10
    fh.seek(0)
    fh.write(data)


def _empty(d):
  shutil.rmtree(d)
  os.makedirs(d)


DAMAGE = {
    'truncated_data_file': _truncate,
    'bit_flip_4k': _flip_4k,
    'no_manifest': lambda d: os.remove(os.path.join(d, 'state', 'manifest.ocdbt')),
    'no_metadata': lambda d: os.remove(os.path.join(d, 'state', '_METADATA')),
    'no_state_dir': lambda d: shutil.rmtree(os.path.join(d, 'state')),
    'no_data_metadata': lambda d: os.remove(os.path.join(d, 'data', 'metadata')),
    'emptied_step_dir': _empty,
}


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_damaged_latest_falls_back_to_previous_step(tmp_path, damage, caplog):
  directory = _save_steps(tmp_path)
  DAMAGE[damage](os.path.join(directory, '20'))
  ck = ckpt_lib.Checkpointer(tmp_path, save_every=5, keep=5)
  with caplog.at_level(logging.ERROR):
    state, data_state, _ = ck.restore(_state(0.0))
  ck.close()
  assert ck.restored_step == 15 and data_state == {'step': 15}
  want = _state(15.0)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert state.params['w'].sharding == want.params['w'].sharding
  names = sorted(os.listdir(directory))
  assert '20.corrupt' in names and '20' not in names and '15' in names, names
  lines = [r.getMessage() for r in caplog.records if 'is damaged' in r.getMessage()]
  assert len(lines) == 1 and 'step 20' in lines[0] and '20.corrupt' in lines[0], lines
  assert '\n' not in lines[0]


def test_bit_flip_is_caught_by_checksum_not_only_by_decode(tmp_path):
  """Checksums catch a changed value even when the file still decodes."""
  directory = _save_steps(tmp_path, steps=(10,))
  ck = ckpt_lib.Checkpointer(tmp_path, save_every=5, keep=5)
  state, _, _ = ck.restore(_state(0.0))
  sums = ckpt_lib.checksums(state)
  assert set(sums) >= {'params/w', 'ema_params/b', 'opt_state/1/0/mu/w', 'step', 'rng'}
  w = state.params['w']
  w = w.at[3, 5].set(jnp.nextafter(w[3, 5], jnp.inf))  # one flipped low bit
  bad = state.replace(params={**state.params, 'w': w})
  with pytest.raises(ckpt_lib.DamagedCheckpoint, match="'params/w' fails its checksum"):
    ckpt_lib.verify(bad, sums, 'test')
  ck.close()
  del directory


def test_model_change_is_not_treated_as_damage(tmp_path):
  directory = _save_steps(tmp_path, steps=(10,))
  other = _state(0.0)
  other = other.replace(params={**other.params, 'b': jnp.ones(4)})
  ck = ckpt_lib.Checkpointer(tmp_path, save_every=5, keep=5)
  with pytest.raises(ckpt_lib.StructureMismatch, match=r'params/b: saved \(3,\), model \(4,\)'):
    ck.restore(other)
  ck.close()
  assert sorted(os.listdir(directory)) == ['10']


def test_all_damaged_raises_clear_error(tmp_path):
  directory = _save_steps(tmp_path, steps=(10,))
  _empty(os.path.join(directory, '10'))
  ck = ckpt_lib.Checkpointer(tmp_path, save_every=5, keep=5)
  with pytest.raises(FileNotFoundError, match='no intact checkpoint'):
    ck.restore(_state(0.0))
  ck.close()


def _fail_commit(monkeypatch):
  from orbax.checkpoint._src.path import atomicity

  async def finalize(self, *args, **kwargs):
    del self, args, kwargs
    raise OSError(errno.ENOSPC, 'No space left on device (injected)')
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', finalize)


def test_failed_async_save_is_reported_at_next_step_boundary(tmp_path, monkeypatch):
  directory = _save_steps(tmp_path, steps=(10,))
  ck = ckpt_lib.Checkpointer(tmp_path, save_every=5, keep=1)
  _fail_commit(monkeypatch)
  assert ck.save(15, _state(15.0), {'step': 15}, {})
  while ck.manager.is_saving_in_progress():  # the background write fails ...
    pass
  with pytest.raises(ckpt_lib.SaveFailed, match=r'save of step 15 .*No space left'):
    ck.check()  # ... and the next step boundary reports it
  monkeypatch.undo()
  try:
    ck.close()
  except ckpt_lib.SaveFailed:
    pass
  names = sorted(os.listdir(directory))
  assert '10' in names and '15' not in names, names  # the earlier checkpoint is intact
  ck2 = ckpt_lib.Checkpointer(tmp_path, save_every=5, keep=1)
  state, _, _ = ck2.restore(_state(0.0))
  assert ck2.restored_step == 10
  ck2.close()
  assert not ckpt_lib.incomplete_checkpoints(directory)  # the partial save was cleaned up


def test_load_params_restores_only_the_ema_subtree_into_fsdp_shardings(tmp_path):
  """Inference reads just the EMA (no params/Adam moments), FSDP-sharded on the given mesh, and
  falls back past a damaged newest step."""
  from rae_jax.pipeline import snapshots
  from rae_jax.train import sharding as sharding_lib
  _save_steps(tmp_path / 'stage2', steps=(10, 15, 20))
  # Every data file of step 20, so the EMA's bytes are hit whichever file the async writer put
  # them in (a partial restore never reads the others).
  step_dir = str(tmp_path / 'stage2' / 'checkpoints' / '20')
  for r, _, fs in os.walk(os.path.join(step_dir, 'state')):
    for f in fs:
      if os.sep + 'd' + os.sep in os.path.join(r, f):
        _flip_4k_file(os.path.join(r, f))
  mesh = mesh_lib.make_mesh(1, 8)
  ema, desc = snapshots.load_params(str(tmp_path), 'stage2', mesh, 'ema')
  assert set(ema) == {'w', 'b'} and 'step 15 (ema_params)' in desc, (ema.keys(), desc)
  np.testing.assert_array_equal(np.asarray(ema['w']), np.asarray(_state(15.0).ema_params['w']))
  want = sharding_lib.fsdp_shardings(jax.eval_shape(lambda: ema), mesh)
  for a, s in zip(jax.tree.leaves(ema), jax.tree.leaves(want)):
    assert a.sharding.is_equivalent_to(s, a.ndim), (a.sharding, s)
  assert os.path.isdir(tmp_path / 'stage2' / 'checkpoints' / '20.corrupt')
