"""One scripted demo run (stage 1, through the CLI) that is killed, has its newest checkpoint
corrupted and its disk filled, and still ends bitwise equal to an uninterrupted run."""
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np

from conftest import REPO
from train_worker import xla_flags

FAULT_MAIN = pathlib.Path(__file__).resolve().parent / 'fault_main.py'
STEPS = 5


def _cmd(workdir):
  return [sys.executable, str(FAULT_MAIN), '--config=configs/demo.py', f'--workdir={workdir}',
          '--mode=train_stage1', f'--config.stage1.optim.num_steps={STEPS}',
          '--config.checkpoint.every_steps=1', '--config.checkpoint.keep=10',
          '--config.log.every_steps=1', '--config.data.synthetic_size=200',
          '--config.log.sample_every_steps=0']


def _env(tmp_path, **extra):
  return dict(os.environ, XLA_FLAGS=xla_flags(1),
              JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', **extra)


def _run(workdir, env):
  proc = subprocess.run(_cmd(workdir), cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  return proc.returncode, proc.stderr


def _flip(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, 'state'))
           for f in fs if f'{os.sep}d{os.sep}' in os.path.join(r, f)]
  path = max(files, key=os.path.getsize)
  data = bytearray(pathlib.Path(path).read_bytes())
  mid = len(data) // 2
  for i in range(max(0, mid - 2048), min(len(data), mid + 2048)):
    data[i] ^= 0x10
  pathlib.Path(path).write_bytes(bytes(data))


def _weights(workdir):
  from rae_jax.pipeline import snapshots
  from rae_jax.train import mesh as mesh_lib
  mesh = mesh_lib.make_mesh()
  out = {}
  for which in ('params', 'ema'):
    tree, desc = snapshots.load_params(str(workdir), 'stage1', mesh, which)
    assert f'step {STEPS} ' in desc, desc
    out.update({f'{which}{k}': np.asarray(v) for k, v in
                __import__('jax').tree_util.tree_leaves_with_path(tree)})
  return out


def test_kill_corrupt_and_disk_full_end_bitwise_equal(tmp_path):
  env = _env(tmp_path)
  rc, log = _run(tmp_path / 'ref', env)
  assert rc == 0, log[-3000:]

  work = tmp_path / 'faulty'
  ckpts = work / 'stage1' / 'checkpoints'
  # 1. SIGKILL after step 4 (asynchronous saves of the last steps may be in flight).
  proc = subprocess.Popen(_cmd(work), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if f'] step 4/{STEPS} ' in line:
      proc.kill()
      break
  proc.wait(timeout=120)
  assert os.path.isdir(ckpts), ''.join(seen)[-3000:]
  steps = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())
  assert steps and steps[-1] >= 2, steps
  # 2. Bit-flip the newest checkpoint; 3. the disk "fills up" at the step-4 save.
  _flip(str(ckpts / str(steps[-1])))
  rc, log = _run(work, _env(tmp_path, RAE_FAIL_SAVE_STEP='4'))
  last = log.strip().splitlines()[-1]
  assert rc == 1, log[-3000:]
  assert last.startswith('rae-jax --mode=train_stage1 failed: SaveFailed: checkpoint save of '
                         'step 4') and 'No space left' in last, last
  assert 'is damaged' in log and f'{steps[-1]}.corrupt' in log, log[-3000:]
  assert f'step 6/{STEPS}' not in log
  # 4. A plain restart finishes the run.
  rc, log = _run(work, env)
  assert rc == 0, log[-3000:]
  assert 'Resumed from' in log
  names = os.listdir(ckpts)
  assert f'{steps[-1]}.corrupt' in names and not any('orbax-checkpoint-tmp' in n for n in names)
  ref, got = _weights(tmp_path / 'ref'), _weights(work)
  assert ref.keys() == got.keys() and len(ref) > 10
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
