"""Generic training loop: step fn + data iterator + checkpoints + logging.

The loop never blocks on the device except at log steps (metrics of the steps since the last
log are fetched together) and at checkpoints. Data iterators: `next(it)` gives a batch
(`prepare_batch` turns it into the global, sharded batch, e.g. rae_jax.data's to_global);
`it.get_state()`/`it.state()` give a JSON-able dict describing the position after the batches
consumed so far, and `it.set_state(d)`/`it.restore(d)` rewind to it (grain's or our names).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np

from rae_jax import config_checks
from rae_jax import storage
from rae_jax.train import checkpoint as checkpoint_lib
from rae_jax.train import multihost
from rae_jax.train.checkpoint import Checkpointer, PreemptionFlag
from rae_jax.train.profile import StepProfiler

Hook = Callable[[int, Any, Optional[dict]], None]


def _format_eta(seconds: float) -> str:
  if not np.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def image_grid(images: np.ndarray, ncols: Optional[int] = None) -> np.ndarray:
  """(N, H, W, C) in [0, 1] -> one (rows*H, cols*W, C) uint8 grid."""
  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  n, h, w, c = images.shape
  ncols = ncols or int(np.ceil(np.sqrt(n)))
  nrows = int(np.ceil(n / ncols))
  grid = np.zeros((nrows * h, ncols * w, c), np.float32)
  for i in range(n):
    r, q = divmod(i, ncols)
    grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[i]
  return (grid * 255.0 + 0.5).astype(np.uint8)


def wandb_run_id(workdir) -> str:
  """A W&B run id that is a pure function of the (stage) workdir: every restart of a run, on any
  host, resumes the same W&B run."""
  import hashlib  # pylint: disable=g-import-not-at-top
  path = os.fspath(workdir).rstrip('/')
  if '://' not in path:
    path = os.path.abspath(path)
  name = re.sub(r'[^A-Za-z0-9_-]+', '-', os.path.basename(path))[-40:].strip('-') or 'run'
  return f'{name}-{hashlib.sha256(path.encode()).hexdigest()[:12]}'


def _local_wandb_dir(workdir) -> Optional[str]:
  """W&B writes its files through the local filesystem: a gs:// workdir gets a local folder."""
  path = os.fspath(workdir) if workdir else None
  if path and '://' in path:
    import tempfile  # pylint: disable=g-import-not-at-top
    local = os.path.join(tempfile.gettempdir(), 'rae_jax_wandb', wandb_run_id(path))
    os.makedirs(local, exist_ok=True)
    return local
  return path


class MetricWriter:
  """Scalars and image grids to TensorBoard (tensorboardX) and optionally W&B; process 0 only.

  wandb: None, or a dict of wandb.init kwargs (project, name, ...); skipped with a warning if
  the package is missing. Unless the dict names an `id`, the run id is derived from the
  workdir (wandb_run_id) and the run is opened with resume='allow': a run restarted after a
  preemption continues the same W&B run instead of opening a new one.

  Restarts: train_loop calls `start_at(first step)`; TensorBoard then gets that step as
  `purge_step`, which hides the events a killed run logged after its last checkpoint (they are
  logged again by the resumed run), so no step appears twice. W&B drops steps lower than the
  ones it already has.
  """

  def __init__(self, workdir: Optional[str], *, tensorboard: bool = True,
               wandb: Optional[dict] = None, config: Optional[dict] = None):
    self.active = jax.process_index() == 0
    self._tb = None
    self._wandb = None
    self._purge_step = None
    self._tb_local = None  # local event folder of a remote logdir
    if not self.active:
      return
    # Created at the first write: a run refused at start (config drift found on resume, a
    # damaged workdir) leaves no event file behind.
    self._tb_dir = (os.path.join(os.fspath(workdir), 'tensorboard') if tensorboard and workdir
                    else None)
    self._tb_remote = self._tb_dir
    if wandb:
      try:
        import wandb as wandb_lib  # pylint: disable=g-import-not-at-top
        self._wandb = wandb_lib
        kwargs = dict(wandb)
        kwargs.setdefault('id', wandb_run_id(workdir))
        kwargs.setdefault('resume', 'allow')
        wandb_dir = kwargs.pop('dir', None) or _local_wandb_dir(workdir)
        wandb_lib.init(config=config, dir=wandb_dir, **kwargs)
      except ImportError:
        logging.warning('W&B requested (%s) but the wandb package is not installed; skipping.',
                        wandb)

  # gs:// (or another object store): events go to a local file, uploaded whole through the path
  # layer at most every UPLOAD_EVERY_S seconds and at flush/close (an object is rewritten, never
  # appended to; a kill loses at most the last interval, which the resumed run logs again).
  UPLOAD_EVERY_S = 60.0

  def _tensorboard(self):
    if self._tb is None and self._tb_dir is not None:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      logdir = self._tb_dir
      if storage.is_remote(logdir):
        import tempfile  # pylint: disable=g-import-not-at-top
        self._tb_local = logdir = tempfile.mkdtemp(prefix='rae-tensorboard-')
        self._tb_uploaded = time.monotonic()
      # A unique suffix: a restart within the same second gets its own event file (the default
      # name has a 1 s timestamp; on gs:// the second file would replace the first).
      import uuid  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(logdir, purge_step=self._purge_step,
                               filename_suffix=f'.{os.getpid()}.{uuid.uuid4().hex[:8]}')
    if self._tb_local is not None and time.monotonic() - self._tb_uploaded > self.UPLOAD_EVERY_S:
      self._upload()
    return self._tb

  def _upload_closed(self) -> None:
    if self._tb_local is not None:
      import shutil  # pylint: disable=g-import-not-at-top
      for name in sorted(os.listdir(self._tb_local)):
        storage.upload(os.path.join(self._tb_local, name), os.path.join(self._tb_remote, name))
      shutil.rmtree(self._tb_local, ignore_errors=True)
      self._tb_local = None

  def _upload(self) -> None:
    """Copies the local event files of a remote logdir to it (each one upload)."""
    if self._tb is None or self._tb_local is None:
      return
    self._tb.flush()
    for name in sorted(os.listdir(self._tb_local)):
      storage.upload(os.path.join(self._tb_local, name), os.path.join(self._tb_remote, name))
    self._tb_uploaded = time.monotonic()

  def start_at(self, step: int) -> None:
    """The first step this run logs: events of an earlier (killed) run from `step` on are
    purged (hidden) in TensorBoard, as this run logs them again."""
    if not self.active:
      return
    if self._tb is not None:
      logging.warning('MetricWriter.start_at(%d) after the first write: not purged.', step)
    self._purge_step = int(step)

  def scalars(self, step: int, values: dict):
    if not self.active:
      return
    if self._tensorboard() is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, float(v), step)
    if self._wandb is not None:
      self._wandb.log({k: float(v) for k, v in values.items()}, step=step)

  def images(self, step: int, name: str, images: np.ndarray):
    """images: (N, H, W, 3) in [0, 1], written as one grid."""
    if not self.active:
      return
    grid = image_grid(images)
    if self._tensorboard() is not None:
      self._tb.add_image(name, grid, step, dataformats='HWC')
    if self._wandb is not None:
      self._wandb.log({name: self._wandb.Image(grid)}, step=step)

  def flush(self):
    if self._tb is not None:
      self._tb.flush()
      self._upload()

  def close(self):
    self._tb_dir = None
    if self._tb is not None:
      self._tb.close()
      self._upload_closed()
      self._tb = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


def resume(checkpointer: Optional[Checkpointer], state: Any,
           data_iter: Optional[Iterator] = None, config: Optional[dict] = None,
           name: str = 'train') -> tuple[Any, Optional[dict]]:
  """Restores the newest intact checkpoint into `state`'s shardings, and rewinds the data.

  Damaged newer steps are moved aside (see Checkpointer.restore). With `config`, the config
  saved with the checkpoint must agree on every run-defining field (config_checks.resume_drift)
  unless config['resume']['allow_changes'] names the changed ones.
  Returns (state, config saved with the checkpoint or None when starting fresh).
  """
  if checkpointer is None or checkpointer.latest_step() is None:
    return state, None
  state, data_state, saved_config = checkpointer.restore(state)
  step = checkpointer.restored_step
  if config is not None and saved_config:
    config_checks.check_resume(saved_config, config, stage=name,
                               where=f'{checkpointer.directory} step {step}')
  if data_iter is not None and not (data_state and _set_data_state(data_iter, data_state)):
    logging.warning('Checkpoint %d: no data iterator state restored; the data order restarts.',
                    step)
  if jax.process_index() == 0:
    logging.info('Resumed from %s at step %d.', checkpointer.directory, step)
  return state, saved_config


def _data_state(data_iter) -> Optional[dict]:
  get = getattr(data_iter, 'get_state', None) or getattr(data_iter, 'state', None)
  return dict(get()) if callable(get) else None


def _set_data_state(data_iter, data_state: dict) -> bool:
  put = getattr(data_iter, 'set_state', None) or getattr(data_iter, 'restore', None)
  if not callable(put):
    return False
  put(data_state)
  return True


def train_loop(train_step: Callable, state: Any, data_iter: Iterator, *, num_steps: int,
               global_batch_size: int, checkpointer: Optional[Checkpointer] = None,
               config: Optional[dict] = None, log_every: int = 50,
               writer: Optional[MetricWriter] = None, hooks: Sequence[Hook] = (),
               preemption: Optional[PreemptionFlag] = None, auto_resume: bool = True,
               exit_on_preemption: bool = True, frozen: Any = None,
               prepare_batch: Optional[Callable[[Any], Any]] = None,
               name: str = 'train') -> Any:
  """Runs train_step until state.step == num_steps; returns the final state.

  - auto_resume: restore the newest complete checkpoint (and data position) first.
  - checkpoints every checkpointer's save_every steps (async) and at the end (forced).
  - preemption (SIGTERM): after the current step, save synchronously and exit with code 0
    (raise SystemExit(0)), or return the state if exit_on_preemption is False.
  - hooks(step, state, metrics or None) run after every step (metrics only at log steps);
    use them for sampling/eval every N steps.
  """
  if auto_resume:
    state, _ = resume(checkpointer, state, data_iter, config, name)
  owns_preemption = preemption is None
  if owns_preemption:
    preemption = PreemptionFlag()
  is_main = multihost.is_main()
  step = int(jax.device_get(state.step))
  start_step = step
  if writer is not None:
    writer.start_at(start_step + 1)  # steps a killed run logged past its checkpoint: once
  pending: list[dict] = []
  tty = is_main and sys.stderr.isatty()
  t_last, step_last = time.perf_counter(), step

  saved = {checkpointer.latest_step()} if checkpointer is not None else set()
  profiler = StepProfiler.from_config(config, checkpointer)  # config.profile: jax.profiler trace

  def save(force: bool):
    if checkpointer is None or step in saved:
      return
    if checkpointer.save(step, state, _data_state(data_iter), config, force=force):
      saved.add(step)

  try:
    while step < num_steps:
      profiler.before_step(step + 1, state)
      batch = next(data_iter)
      if prepare_batch is not None:
        batch = prepare_batch(batch)
      if frozen is None:
        state, metrics = train_step(state, batch)
      else:
        state, metrics = train_step(state, batch, frozen)
      step += 1
      pending.append(metrics)
      host_metrics = None
      if step % log_every == 0 or step == num_steps:
        host = jax.device_get(pending)
        pending = []
        host_metrics = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        now = time.perf_counter()
        sps = (step - step_last) / max(now - t_last, 1e-9)
        t_last, step_last = now, step
        host_metrics['steps_per_sec'] = sps
        host_metrics['images_per_sec'] = sps * global_batch_size
        data_metrics = getattr(data_iter, 'metrics', None)
        if callable(data_metrics):  # e.g. data/num_skipped: unreadable examples replaced
          host_metrics.update({k: float(v) for k, v in data_metrics().items()})
        if is_main:
          if tty:
            sys.stderr.write('\r\033[K')
          logging.info(
              '[%s] step %d/%d | loss %.4f | lr %.3e | grad_norm %.3f | %.2f steps/s | '
              '%.1f img/s | ETA %s', name, step, num_steps, host_metrics['loss'],
              host_metrics.get('lr', float('nan')), host_metrics.get('grad_norm', float('nan')),
              sps, sps * global_batch_size, _format_eta((num_steps - step) / max(sps, 1e-9)))
        if writer is not None:
          writer.scalars(step, {f'{name}/{k}': v for k, v in host_metrics.items()})
      elif tty:
        done = (step - start_step) / max(num_steps - start_step, 1)
        bar = '#' * int(30 * done)
        sys.stderr.write(f'\r[{name}] {bar:<30} {step}/{num_steps}')
        sys.stderr.flush()
      for hook in hooks:
        hook(step, state, host_metrics)
      if checkpointer is not None:
        checkpointer.check()  # a failed async save stops the run here, not one interval later
      if preemption.should_stop(step):
        if is_main:
          logging.warning('Preempted at step %d: saving a checkpoint synchronously.', step)
        save(force=True)
        if checkpointer is not None:
          checkpointer.close()
        if writer is not None:
          writer.flush()
        if exit_on_preemption:
          raise SystemExit(0)
        return state
      if checkpointer is not None and checkpointer.should_save(step):
        save(force=False)
    save(force=True)
    if checkpointer is not None:
      checkpointer.wait()
    if writer is not None:
      writer.flush()
    return state
  except BaseException:
    # Let a running save finish and orbax's threads stop before the error propagates (no
    # background-thread noise after the traceback); a second failure is only logged.
    # A stalled save is abandoned after a timeout instead of keeping the failed run alive.
    checkpoint_lib.abandon(checkpointer)
    raise
  finally:
    profiler.stop(state)
    if owns_preemption:
      preemption.uninstall()
