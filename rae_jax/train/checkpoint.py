"""Orbax checkpoints in <workdir>/checkpoints, preemption handling and auto-resume.

A step directory is written under a temporary name (`<step>.orbax-checkpoint-tmp-*`, or without
its `commit_success.txt` on object stores) and only renamed/marked once every process has
finished writing, so a save interrupted by a kill is never listed as a step: resuming picks
the newest complete one. We log such leftovers and let orbax delete them.

Each checkpoint holds four items: `state` (TrainState: step, params, EMA, optimizer, base
PRNG key, extra collections), `data` (the data iterator's JSON state), `config` (JSON) and
`integrity` (a checksum per array, taken on device at save time and verified on restore, so a
flipped bit is caught instead of restored). A step that fails to restore is moved aside to
`<step>.corrupt` (never deleted) and the previous one is used.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import threading
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from rae_jax import storage
from rae_jax.train import multihost

TMP_MARKER = '.orbax-checkpoint-tmp'
ITEMS = ('state', 'data', 'config', 'integrity')


class PreemptionFlag:
  """Preemption notice (SIGTERM) -> stop after the current step; the train loop polls it.

  Saving from inside a signal handler could interleave with a running step or save, so the
  loop finishes its step, saves synchronously and exits 0. With several processes all must stop
  at the same step (a checkpoint is collective): JAX's preemption service (started by
  jax.distributed.initialize; it catches SIGTERM itself) agrees on that step in the background,
  and `should_stop` only asks it locally, never a collective that would drain the step pipeline.
  Without the service (an old coordinator) the flags are all-gathered every `sync_every` steps.
  """

  def __init__(self, signals=(signal.SIGTERM,), sync_every: int = 10):
    self._event = threading.Event()
    self._previous = {}
    self.sync_every = max(int(sync_every), 1)
    self._service = _preemption_service()
    if self._service:
      return  # Our Python handler would replace the service's SIGTERM notifier.
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    else:
      logging.warning('PreemptionFlag: not on the main thread, signal handlers not installed.')

  def _handle(self, signum, frame):
    del frame
    logging.warning('Received signal %d: will checkpoint and exit after this step.', signum)
    self._event.set()

  def set(self):
    self._event.set()

  @property
  def triggered(self) -> bool:
    return self._event.is_set()

  def should_stop(self, step: int) -> bool:
    """Call at every step, on every process (the service's protocol needs each step id)."""
    if jax.process_count() == 1:
      return self.triggered
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if self._service:
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    if step % self.sync_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.triggered))
    return bool(np.any(flags))

  def uninstall(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def _preemption_service() -> bool:
  """True when several processes run and JAX's preemption sync manager is up."""
  if jax.process_count() == 1:
    return False
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return getattr(distributed.global_state, 'preemption_sync_manager', None) is not None


def incomplete_checkpoints(directory: str | os.PathLike) -> list[str]:
  """Names of step directories left half-written (temporary, never committed)."""
  if not storage.isdir(directory):
    return []
  return sorted(n for n in storage.listdir(directory) if TMP_MARKER in n)


class CheckpointError(RuntimeError):
  """A checkpoint problem; the message is one line naming the step, file and cause."""


class DamagedCheckpoint(CheckpointError):
  """A step that cannot be restored as saved (missing/truncated file, checksum mismatch)."""


class SaveFailed(CheckpointError):
  """An asynchronous save failed in the background (e.g. disk full)."""


# --- integrity -----------------------------------------------------------------------------


def _leaf_name(path) -> str:
  """'params/block_0/kernel' for TrainState attributes and dict keys alike (partial restores
  of dicts and full restores of dataclasses give the same names)."""
  parts = []
  for k in path:
    for attr in ('name', 'key', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def _as_u32(x):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  bits = x.dtype.itemsize * 8
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if bits == 32:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if bits in (8, 16):
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{bits}')).astype(jnp.uint32)
  if bits == 64:  # x64 mode: both halves.
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  raise TypeError(f'checksum: unsupported dtype {x.dtype}')


@jax.jit
def _sums(leaves):
  """Per array: (sum, position-weighted sum) of its bits as uint32, wrapping. Any single-bit
  flip changes the weighted sum (odd weights); computed on device where the array lives."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  out = []
  for x in leaves:
    u = _as_u32(x).reshape(-1)
    w = jnp.arange(u.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    out.append(jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * w, dtype=jnp.uint32)]))
  return out


def checksums(tree: Any) -> dict[str, list[int]]:
  """{leaf name: [sum, weighted sum]} of every array leaf (one jitted device pass)."""
  flat = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
          if hasattr(x, 'dtype') and hasattr(x, 'shape')]
  if not flat:
    return {}
  sums = jax.device_get(_sums([x for _, x in flat]))
  return {_leaf_name(p): [int(v) for v in s] for (p, _), s in zip(flat, sums)}


def verify(tree: Any, expected: dict, where: str) -> None:
  """Raises DamagedCheckpoint naming the first array whose checksum differs from the save."""
  got = checksums(tree)
  for name, value in got.items():
    want = expected.get(name)
    if want is not None and list(want) != value:
      raise DamagedCheckpoint(f'{where}: array {name!r} fails its checksum (saved {want}, '
                              f'read {value}): the data file was altered after saving')


# --- damage handling -----------------------------------------------------------------------

# Files every committed step of ours has; a missing one is reported by name.
REQUIRED_FILES = ('_CHECKPOINT_METADATA', 'state/_METADATA', 'state/manifest.ocdbt',
                  'data/metadata', 'config/metadata')


def missing_files(step_dir: str) -> list[str]:
  if not storage.isdir(step_dir):
    return [step_dir]
  if not storage.listdir(step_dir):
    return [step_dir + ' (the step directory is empty)']
  present = set(storage.files_under(step_dir))  # one listing (an object store lists a prefix)
  return [f for f in REQUIRED_FILES if f not in present]


def describe_error(error: BaseException, step_dir: str) -> str:
  """One line out of an orbax/tensorstore error chain: the innermost error that names a file
  (the file and why), else the outermost message's first line."""
  chain, e = [], error
  while e is not None and e not in chain and len(chain) < 20:
    chain.append(e)
    e = e.__cause__ or e.__context__
  path_re = re.compile(re.escape(storage.abspath(step_dir)) + r'[^\s"\'\]\),]*')
  for e in reversed(chain):
    text = str(e).strip()
    if path_re.search(text):
      line = next((ln for ln in text.splitlines() if path_re.search(ln)), text.splitlines()[0])
      return _clip(f'{type(e).__name__}: {line.strip()}')
  text = str(error).strip()
  return _clip(f'{type(error).__name__}: {text.splitlines()[0] if text else ""}')


_OS_CODE = re.compile(r"os_error_code='?(\d+)")
_FAILED_PATH = re.compile(r'(?:Failed writing|Error writing local file|Failed to open|'
                          r'Error opening)[^"]*"([^"]+)"')
_NBYTES = re.compile(r'Failed to write (\d+) bytes')


def os_cause(error: BaseException) -> Optional[str]:
  """The operating-system root cause in an error chain (Python OSError, or tensorstore's
  `[os_error_code=28]` text) as one short phrase: 'No space left on device (ENOSPC) writing
  <path> (288505 bytes)'; None when there is none."""
  import errno as errno_lib  # pylint: disable=g-import-not-at-top
  chain, e = [], error
  while e is not None and e not in chain and len(chain) < 30:
    chain.append(e)
    e = e.__cause__ or e.__context__
  for e in reversed(chain):  # innermost first
    code, path, nbytes = None, None, None
    if isinstance(e, OSError) and e.errno:
      code, path = e.errno, e.filename
    else:
      text = str(e)
      m = _OS_CODE.search(text)
      if m:
        code = int(m.group(1))
        p, n = _FAILED_PATH.search(text), _NBYTES.search(text)
        path, nbytes = (p.group(1) if p else None), (int(n.group(1)) if n else None)
    if code:
      name = errno_lib.errorcode.get(code, str(code))
      phrase = f'{os.strerror(code)} ({name})'
      if path:
        phrase += f' writing {path}' if nbytes or code in (errno_lib.ENOSPC, errno_lib.EDQUOT,
                                                           errno_lib.EFBIG) else f': {path}'
      if nbytes:
        phrase += f' ({nbytes} bytes)'
      return phrase
  return None


def _space(directory: str, nbytes: Optional[int]) -> str:
  """', the checkpoint holds about X MB, Y MB free on <fs>' where known (local paths)."""
  import shutil  # pylint: disable=g-import-not-at-top
  parts = []
  if nbytes:
    parts.append(f'the checkpoint holds about {nbytes / 2**20:.1f} MiB')
  path = directory
  while path and not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  if '://' not in directory and path:
    try:
      parts.append(f'{shutil.disk_usage(path).free / 2**20:.1f} MiB free there')
    except OSError:
      pass
  return ''.join(f', {p}' for p in parts)


def _save_failure(step, directory: str, error: BaseException, nbytes: Optional[int]) -> str:
  """SaveFailed's message: the root cause first (not cut off by orbax's long text)."""
  cause = os_cause(error)
  if cause:
    return (f'checkpoint save of step {step} in {directory} failed: {cause}'
            f'{_space(directory, nbytes)}; earlier checkpoints are intact')
  return (f'checkpoint save of step {step} in {directory} failed: '
          f'{describe_error(error, directory)}; earlier checkpoints are intact')


def _clip(line: str, n: int = 400) -> str:
  return line if len(line) <= n else line[:n] + '...'


def quarantine(directory: str, step: int) -> str:
  """Moves <directory>/<step> to <step>.corrupt[.N] (never deletes data); process 0 only, then
  every process waits for it. Returns the new path.

  Local/NFS: one rename. gs:// (no directory rename): every object is copied to the new name
  and checked there before the step's objects are deleted, its commit marker first, so a kill
  mid-way leaves either the untouched step or a complete copy (storage.move_tree)."""
  src = os.path.join(directory, str(step))
  dst = src + '.corrupt'
  n = 0
  while storage.exists(dst):
    n += 1
    dst = f'{src}.corrupt.{n}'
  if jax.process_index() == 0 and storage.exists(src):
    storage.move_tree(src, dst)
  multihost.barrier(f'quarantine {src}')
  return dst


def restore_newest_intact(directory: str, steps: Sequence[int],
                          restore_step: Callable[[int], Any], reload: Callable[[], None],
                          what: str = 'checkpoint') -> tuple[int, Any]:
  """Tries `restore_step(step)` newest first. A DamagedCheckpoint (or any error reading a step
  whose files are incomplete) is logged as one line, the step moved aside, the next older one
  tried. Errors that are not damage (a model that no longer matches) propagate unchanged."""
  for step in sorted(steps, reverse=True):
    step_dir = os.path.join(directory, str(step))
    try:
      missing = missing_files(step_dir)
      if missing:
        raise DamagedCheckpoint(f'missing {", ".join(os.path.join(step_dir, m) for m in missing)}')
      return step, restore_step(step)
    except StructureMismatch:
      raise
    except DamagedCheckpoint as e:
      cause = str(e)
    except Exception as e:  # pylint: disable=broad-except
      cause = describe_error(e, step_dir)
    moved = quarantine(directory, step)
    logging.error('%s step %d in %s is damaged (%s); moved aside to %s, trying the previous '
                  'step.', what.capitalize(), step, directory, cause, moved)
    reload()
  raise FileNotFoundError(f'no intact {what} in {directory} (damaged steps were moved aside to '
                          '<step>.corrupt).')


class StructureMismatch(CheckpointError, ValueError):
  """The checkpoint's arrays do not match the model being restored into (a config change, not
  damage): never moved aside."""


def check_structure(saved_meta: Any, target: Any, where: str) -> None:
  """Compares the saved array shapes with the restore target (names and shapes)."""
  def shapes(tree):
    return {_leaf_name(p): tuple(getattr(x, 'shape', ()))
            for p, x in jax.tree_util.tree_leaves_with_path(tree)
            if hasattr(x, 'shape')}
  saved, want = shapes(saved_meta), shapes(target)
  missing = sorted(set(want) - set(saved))
  wrong = sorted(k for k in set(want) & set(saved) if saved[k] != want[k])
  if missing or wrong:
    detail = ([f'{k}: saved {saved[k]}, model {want[k]}' for k in wrong[:5]] +
              [f'{k}: not in the checkpoint' for k in missing[:5]])
    raise StructureMismatch(f'{where} does not match the model: {"; ".join(detail)} (did the model '
                            'config change? use a new workdir)')


def item_handlers() -> dict:
  return {'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler(),
          'config': ocp.JsonCheckpointHandler(), 'integrity': ocp.JsonCheckpointHandler()}


class Checkpointer:
  """CheckpointManager for TrainState + data iterator state + config + checksums.

  save_every: async save every N steps (also forced saves: final, preemption).
  keep: the last K checkpoints are kept, plus every `keep_every`-th step if given.
  Each save records a checksum of every array (`integrity` item); restore verifies them and
  falls back to the newest intact step, moving damaged ones aside (`<step>.corrupt`).
  """

  def __init__(self, workdir: str | os.PathLike, *, save_every: int, keep: int = 3,
               keep_every: Optional[int] = None, async_save: bool = True):
    if save_every <= 0:
      raise ValueError(f'checkpoint save_every must be positive, got {save_every}.')
    self.directory = os.path.join(os.fspath(workdir), 'checkpoints')
    leftovers = incomplete_checkpoints(self.directory)
    if leftovers and jax.process_index() == 0:
      logging.warning('Ignoring incomplete checkpoint(s) %s in %s (a save was interrupted); '
                      'they will be deleted and the newest complete checkpoint is used.',
                      ', '.join(leftovers), self.directory)
    self.ignored = leftovers
    keepers = [policies.LatestN(n=keep)]
    if keep_every:
      keepers.append(policies.EveryNSteps(interval_steps=keep_every))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.FixedIntervalPolicy(save_every),
        preservation_policy=policies.AnyPreservationPolicy(keepers),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=item_handlers())
    self._pending: Optional[int] = None  # step of an async save not yet checked
    self._closed = False

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state: Any, data_state: Optional[dict] = None,
           config: Optional[dict] = None, *, force: bool = False) -> bool:
    """Starts a save (async unless configured otherwise); call on every process."""
    if self._pending is not None:
      self.wait()  # orbax would wait for it anyway; this attributes its failure to its step
    integrity = {'state': checksums(state)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(dict(data_state or {})),
                              config=ocp.args.JsonSave(dict(config or {})),
                              integrity=ocp.args.JsonSave(integrity))
    try:
      started = self.manager.save(int(step), args=args, force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise SaveFailed(_save_failure(step, self.directory, e, _nbytes(state))) from e
    if started:
      self._pending = int(step)
      self._pending_bytes = _nbytes(state)
    return started

  def check(self) -> None:
    """Raises SaveFailed if the last async save has finished with an error. Cheap (no wait
    while a save is still running): the train loop calls it at every step boundary."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self.wait()  # The save has finished: returns at once, raising its error if any.

  def restore(self, target: Any, step: Optional[int] = None) -> tuple[Any, dict, dict]:
    """Restores (state, data_state, config); `target` is a state or abstract state whose
    leaves carry the shardings to restore into (see state.abstract_state).

    step None: the newest intact step (damaged newer ones are moved aside). An explicit step
    that is damaged raises DamagedCheckpoint (and is left in place)."""
    abstract = jax.tree.map(_as_abstract, target)
    if step is not None:
      self.restored_step = int(step)
      return self._restore_step(abstract, int(step))
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f'no complete checkpoint in {self.directory}.')
    self.restored_step, out = restore_newest_intact(
        self.directory, steps, lambda s: self._restore_step(abstract, s), self.manager.reload)
    return out

  def _restore_step(self, abstract: Any, step: int) -> tuple[Any, dict, dict]:
    where = f'checkpoint step {step} in {self.directory}'
    try:
      meta = self.manager.item_metadata(step)['state']
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpoint(f'unreadable metadata: '
                              f'{describe_error(e, os.path.join(self.directory, str(step)))}') from e
    if meta is not None:
      check_structure(meta, abstract, where)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore(), integrity=ocp.args.JsonRestore()))
    integrity = dict(restored.get('integrity') or {})
    if integrity.get('state'):
      verify(restored['state'], integrity['state'], where)
    else:
      logging.warning('%s has no checksums (saved by an older version): not verified.', where)
    return restored['state'], dict(restored['data'] or {}), dict(restored['config'] or {})

  def wait(self):
    """Blocks until the pending save is written; raises SaveFailed (naming its step) if it
    failed."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise SaveFailed(_save_failure(step, self.directory, e,
                                     getattr(self, '_pending_bytes', None))) from e

  def close(self):
    """Waits for the pending save and stops orbax's threads. Idempotent; safe in a finally."""
    if self._closed:
      return
    self._closed = True
    try:
      self.wait()
    finally:
      self.manager.close()


def _nbytes(tree: Any) -> int:
  return int(sum(getattr(x, 'nbytes', 0) for x in jax.tree_util.tree_leaves(tree)))


def abandon(checkpointer: Optional['Checkpointer'], timeout: Optional[float] = None) -> None:
  """The error path's close: lets a running save finish and orbax's threads stop, but gives up
  after `timeout` seconds (RAE_CLOSE_TIMEOUT_S, default 120): a stalled save must not keep a
  failed run alive (main.py then ends the process, leaving such threads behind). A failure
  while closing is logged, not raised over the error being reported."""
  if checkpointer is None:
    return
  timeout = float(os.environ.get('RAE_CLOSE_TIMEOUT_S', '120')) if timeout is None else timeout
  errors = []

  def close():
    try:
      checkpointer.close()
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)

  thread = threading.Thread(target=close, name='rae_jax_checkpoint_close', daemon=True)
  thread.start()
  thread.join(timeout)
  if thread.is_alive():
    logging.error('Checkpoint manager of %s did not stop within %.0f s after the error; '
                  'abandoning it (a partial save is removed on the next start).',
                  checkpointer.directory, timeout)
  elif errors and not isinstance(errors[0], SaveFailed):
    logging.error('While stopping after an error: %s', errors[0])


def _as_abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, 'sharding', None))


def saved_config(directory: str | os.PathLike) -> Optional[tuple[int, dict]]:
  """(step, config) recorded with the newest checkpoint in `directory` whose config item reads,
  or None. Reads only the small JSON item (no orbax manager, no arrays), so a resume can be
  checked for config drift before anything is written or restored."""
  import json  # pylint: disable=g-import-not-at-top
  if not storage.isdir(directory):
    return None
  steps = sorted((int(n) for n in storage.listdir(directory) if n.isdigit()), reverse=True)
  for step in steps:
    try:
      config = json.loads(storage.read_text(os.path.join(directory, str(step), 'config',
                                                         'metadata')))
    except (OSError, ValueError):
      continue  # damaged or incomplete: the restore moves it aside
    if isinstance(config, dict) and config:
      return step, config
  return None
