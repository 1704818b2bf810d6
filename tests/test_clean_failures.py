"""A run that fails, fails cleanly, each fault injected for real: a full tmpfs, two
real processes on one workdir, a read-only export/, a truncated .pt, a 16-bit PNG, a resume with
a changed model, a negative num_steps."""
import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from rae_jax import config_checks
from test_config_checks import load_config

FAULT_MAIN = pathlib.Path(__file__).resolve().parent / 'fault_main.py'
MAIN = REPO / 'main.py'


def _env(cache, **extra):
  return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
              JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', **extra)


def _train_cmd(script, workdir, steps=3):
  return [sys.executable, str(script), '--config=configs/demo.py', f'--workdir={workdir}',
          '--mode=train_stage1', f'--config.stage1.optim.num_steps={steps}',
          '--config.checkpoint.every_steps=1', '--config.checkpoint.keep=10',
          '--config.log.every_steps=1', '--config.data.synthetic_size=200',
          '--config.log.sample_every_steps=0']


@contextlib.contextmanager
def _tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  try:
    subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)], check=True,
                   capture_output=True)
  except (OSError, subprocess.CalledProcessError) as e:
    pytest.skip(f'cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {e}')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', str(path)], check=False)


def _tree(root):
  """{relative path: (size, mtime_ns)} of everything under root."""
  out = {}
  for d, dirs, files in os.walk(root):
    for n in dirs + files:
      p = os.path.join(d, n)
      st = os.lstat(p)
      out[os.path.relpath(p, root)] = (st.st_size if n in files else 0, st.st_mtime_ns)
  return out


# --- items 1, 2: disk full: the cause in the last line, the process ends at once -------------


def test_disk_full_names_the_cause_last_and_exits_promptly(tmp_path):
  """A real ENOSPC (a 6 MiB tmpfs; one demo checkpoint needs ~7 MiB) while a library thread
  never ends: rc 1 within seconds, the last line names ENOSPC, the file and the bytes; the
  asyncio noise of orbax's closed save loops (hundreds of `Event loop is closed` tracebacks
  before main.py held them back) is at most one counted line."""
  with _tmpfs(tmp_path / 'disk', '6m') as disk:
    work = disk / 'w'
    t0 = time.monotonic()
    proc = subprocess.run(_train_cmd(FAULT_MAIN, work), cwd=REPO, capture_output=True, text=True,
                          timeout=150, env=_env(tmp_path / 'cache', RAE_STUCK_LIBRARY_THREAD='1'))
    elapsed = time.monotonic() - t0
    log = proc.stderr
    last = log.strip().splitlines()[-1]
    assert proc.returncode == 1, log[-3000:]
    assert last.startswith('rae-jax --mode=train_stage1 failed: SaveFailed: checkpoint save of '
                           'step 1'), last
    assert 'No space left on device (ENOSPC) writing ' + str(work) in last, last
    assert ' bytes)' in last and 'MiB free there' in last, last
    assert last.endswith('earlier checkpoints are intact'), last
    assert elapsed < 100, elapsed  # includes start-up and compilation on 2 cores
    noise = [l for l in log.splitlines() if 'Event loop is closed' in l]
    assert len(noise) <= 1, (len(noise), log[-3000:])
    assert all(' asyncio task errors after the failed save suppressed; first: ' in l
               for l in noise), noise
    assert 'Task exception was never retrieved' not in log, log[-3000:]


# --- item 3: one workdir, one writer ---------------------------------------------------------


def _wait_for(pred, timeout, what):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if pred():
      return
    time.sleep(0.2)
  raise AssertionError(f'timed out waiting for {what}')


def test_second_writer_refused_readers_run_beside_stale_lock_taken_over(tmp_path):
  from rae_jax.interop import stats as stats_lib
  work = tmp_path / 'w'
  lock = work / '.rae_jax.lock'
  env = _env(tmp_path / 'cache')
  os.makedirs(work / 'stats')
  rng = np.random.default_rng(0)
  stats_lib.save_stats({'mean': rng.normal(size=(4, 4, 64)).astype(np.float32),
                        'var': rng.uniform(1, 2, size=(4, 4, 64)).astype(np.float32)},
                       work / 'stats' / 'stat.npz')
  # A: a long training run (the writer).
  a = subprocess.Popen(_train_cmd(MAIN, work, steps=100000), cwd=REPO, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    _wait_for(lock.exists, 120, 'the first run to take the lock')
    _wait_for(lambda: a.poll() is not None or list((work / 'config_history').glob('*')), 60,
              'the first run to record its config')
    history = sorted(os.listdir(work / 'config_history'))
    assert len(history) == 1 and history[0].endswith(f'.train_stage1.{a.pid}.json'), history
    # B: a second writer on the same workdir is refused, naming the holder.
    b = subprocess.run(_train_cmd(MAIN, work), cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    last = b.stderr.strip().splitlines()[-1]
    assert b.returncode == 1, b.stderr[-3000:]
    assert 'failed: WorkdirLocked' in last, last
    assert f'host {socket.gethostname()}, pid {a.pid}, --mode=train_stage1, started ' in last
    assert sorted(os.listdir(work / 'config_history')) == history  # refused: nothing written
    # C: a read-only mode works beside the training run.
    c = subprocess.run([sys.executable, str(MAIN), '--config=configs/demo.py',
                        f'--workdir={work}', '--mode=export_torch'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert c.returncode == 0, c.stderr[-3000:]
    assert (work / 'export' / 'stat.pt').exists()
    assert a.poll() is None  # A still trains
  finally:
    a.kill()  # SIGKILL: its lock stays behind, stale
    a.wait()
  assert json.loads(lock.read_text())['pid'] == a.pid
  # D: a restart is not blocked by the dead run's lock (no manual cleanup).
  d = subprocess.Popen(_train_cmd(MAIN, work), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
  seen = []
  try:
    for line in d.stderr:
      seen.append(line)
      if 'Took over the stale lock' in line or 'failed:' in line:
        break
  finally:
    d.kill()
    d.wait()
  assert any('Took over the stale lock' in s and f'pid {a.pid}' in s for s in seen), seen[-20:]
  assert json.loads(lock.read_text())['pid'] == d.pid


def test_lock_is_released_and_reentrant_in_process(tmp_path):
  from rae_jax import workdir_lock
  with workdir_lock.WorkdirLock(str(tmp_path), 'train_stage1') as held:
    assert held.held and (tmp_path / workdir_lock.LOCK_NAME).exists()
    with pytest.raises(workdir_lock.WorkdirLocked, match=f'pid {os.getpid()}'):
      workdir_lock.WorkdirLock(str(tmp_path), 'train_stage2').acquire()
  assert not (tmp_path / workdir_lock.LOCK_NAME).exists()
  # A lock left by another host is stale only once its heartbeat is old.
  info = dict(host='other-host', pid=1, heartbeat=time.time(), mode='all', started='then',
              token='x')
  (tmp_path / workdir_lock.LOCK_NAME).write_text(json.dumps(info))
  with pytest.raises(workdir_lock.WorkdirLocked, match='host other-host'):
    workdir_lock.WorkdirLock(str(tmp_path), 'all').acquire()
  info['heartbeat'] = time.time() - workdir_lock.STALE_S - 1
  (tmp_path / workdir_lock.LOCK_NAME).write_text(json.dumps(info))
  lock = workdir_lock.WorkdirLock(str(tmp_path), 'all').acquire()
  assert json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())['token'] == lock.token
  lock.release()


# --- items 4, 5: a refused resume writes nothing and names the changed model field -----------


def test_refused_resume_writes_nothing_and_names_the_model_field(tmp_path):
  import jax
  import jax.numpy as jnp
  from rae_jax import modes
  from rae_jax.train import checkpoint as ckpt_lib
  saved = load_config('demo')
  ck = ckpt_lib.Checkpointer(tmp_path / 'stage2', save_every=1)
  ck.save(5, {'w': jnp.ones((3,))}, {}, saved.to_dict())
  ck.close()
  (tmp_path / 'config.train_stage2.json').write_text('{"what": "actually trained"}')
  before = _tree(tmp_path)
  current = load_config('demo')
  current.model.hidden_size = (128, 256)
  with pytest.raises(config_checks.ConfigError) as e:
    modes.run('train_stage2', current, str(tmp_path))
  msg = str(e.value)
  assert 'config.model.hidden_size: [128, 192] -> [128, 256]' in msg, msg
  assert 'StructureMismatch' not in msg and 'does not match the model' not in msg
  assert _tree(tmp_path) == before  # no event file, no config overwritten, no lock left
  assert jax.process_count() == 1


# --- item 6: numeric fields -------------------------------------------------------------------


@pytest.mark.parametrize('field, value', [
    ('stage2.optim.num_steps', -5), ('stage1.optim.num_steps', 0),
    ('stage1.disc.optim.num_steps', -2), ('sampler.num_steps', 0), ('eval.num_samples', -1),
    ('stats.eps', 0.0), ('stage2.optim.clip_grad', -1.0), ('model.depth', (4, 0)),
    ('stage1.noise_tau', -0.1), ('checkpoint.keep_period', -1), ('stage2.optim.epochs', 0.0),
    ('guidance.t_max', 1.5), ('sample.num_images', 0), ('data.prefetch', -1),
])
def test_meaningless_numbers_fail_naming_the_field(field, value):
  c = load_config('demo')
  section, _, name = field.rpartition('.')
  node = c
  for part in section.split('.'):
    node = node[part]
  node[name] = value
  if field == 'stage2.optim.epochs':
    c.stage2.optim.num_steps = -1
  with pytest.raises(config_checks.ConfigError, match=rf'config\.{field}='):
    config_checks.check(c, 'all', num_devices=8)


def test_documented_num_steps_minus_one_is_accepted():
  c = load_config('demo')
  c.stage2.optim.num_steps = -1
  config_checks.check(c, 'all', num_devices=8)


# --- item 7: a truncated .pt is named -----------------------------------------------------------


@pytest.mark.parametrize('suffix', ['.pt', '.safetensors'])
def test_truncated_import_file_is_named(tmp_path, suffix):
  from rae_jax.interop import torch_io
  from rae_jax.pipeline import release
  rng = np.random.default_rng(0)
  sd = {'mean': rng.normal(size=(64, 4, 4)).astype(np.float32),
        'var': rng.uniform(1, 2, size=(64, 4, 4)).astype(np.float32)}
  path = tmp_path / f'stat{suffix}'
  (torch_io.save_torch if suffix == '.pt' else torch_io.save_safetensors)(sd, path)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) * 2 // 3)
  c = load_config('demo')
  c.interop.stats = str(path)
  with pytest.raises(Exception) as e:
    release.import_release(c, str(tmp_path / 'w'))
  assert str(path) in str(e.value), str(e.value)
  assert not (tmp_path / 'w').exists()


# --- item 8: export into a read-only export/ is all or nothing ---------------------------------


def _stats_workdir(root):
  from rae_jax.interop import stats as stats_lib
  os.makedirs(root / 'stats')
  rng = np.random.default_rng(0)
  stats_lib.save_stats({'mean': rng.normal(size=(4, 4, 64)).astype(np.float32),
                        'var': rng.uniform(1, 2, size=(4, 4, 64)).astype(np.float32)},
                       root / 'stats' / 'stat.npz')
  os.makedirs(root / 'export')
  (root / 'export' / 'EARLIER_EXPORT.txt').write_text('the previous export')


def _export_cmd(workdir):
  return [sys.executable, str(MAIN), '--config=configs/demo.py', f'--workdir={workdir}',
          '--mode=export_torch']


def test_export_into_unwritable_export_dir_keeps_the_previous_one(tmp_path):
  """export/ not writable for the user (root without CAP_DAC_OVERRIDE, via setpriv: chmod
  alone does not bind root). The failure mode guarded: publishing the new export, leaving
  export.old behind and failing with `PermissionError: ... 'EARLIER_EXPORT.txt'`."""
  if not shutil.which('setpriv'):
    pytest.skip('setpriv (util-linux) is needed to run the export without CAP_DAC_OVERRIDE')
  work = pathlib.Path(tempfile.mkdtemp(dir=tmp_path))
  _stats_workdir(work)
  os.chmod(work / 'export', 0o555)
  before = _tree(work / 'export')
  cmd = ['setpriv', '--bounding-set=-dac_override,-dac_read_search', '--'] + _export_cmd(work)
  proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path / 'cache'), capture_output=True,
                        text=True, timeout=120)
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert f'{work / "export"} is not writable' in last, last
  assert _tree(work / 'export') == before
  assert sorted(os.listdir(work)) == ['config.export_torch.json', 'config_history', 'export',
                                      'stats']


def test_export_into_read_only_mount_keeps_the_previous_one(tmp_path):
  """export/ on a read-only mount (mount -o remount,ro): refused before anything is written."""
  from rae_jax.pipeline import release
  work = tmp_path / 'w'
  _stats_workdir(work)
  with _tmpfs(work / 'export', '1m'):
    (work / 'export' / 'EARLIER_EXPORT.txt').write_text('the previous export')
    subprocess.run(['mount', '-o', 'remount,ro', str(work / 'export')], check=True)
    before = _tree(work / 'export')
    c = load_config('demo')
    with pytest.raises(PermissionError, match='is not writable'):
      release.export_release(c, str(work))
    assert _tree(work / 'export') == before
    assert sorted(os.listdir(work)) == ['export', 'stats']


# --- item 9: 16-bit PNGs ------------------------------------------------------------------------


def test_16bit_png_is_scaled_not_clipped(tmp_path):
  from rae_jax.data.image_folder import ImageFolderSource
  ramp = np.linspace(0, 65535, 64 * 48).astype(np.uint16).reshape(48, 64)
  os.makedirs(tmp_path / 'cls')
  Image.fromarray(ramp).save(tmp_path / 'cls' / 'ramp16.png')
  assert Image.open(tmp_path / 'cls' / 'ramp16.png').mode.startswith('I')
  image, _ = ImageFolderSource(str(tmp_path))[0]
  want = np.round(ramp.astype(np.float64) / 257.0)
  assert image.shape == (48, 64, 3) and image.dtype == np.uint8
  np.testing.assert_allclose(image[..., 0], want, atol=1)
  assert (image == 255).mean() < 0.01
