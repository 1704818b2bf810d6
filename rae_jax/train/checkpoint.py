"""Orbax checkpoints in <workdir>/checkpoints, preemption handling and auto-resume.

A step directory is written under a temporary name (`<step>.orbax-checkpoint-tmp-*`, or without
its `commit_success.txt` on object stores) and only renamed/marked once every process has
finished writing, so a save interrupted by a kill is never listed as a step: resuming picks
the newest complete one. We log such leftovers and let orbax delete them.

Each checkpoint holds three items: `state` (TrainState: step, params, EMA, optimizer, base
PRNG key, extra collections), `data` (the data iterator's JSON state) and `config` (JSON).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

TMP_MARKER = '.orbax-checkpoint-tmp'
ITEMS = ('state', 'data', 'config')


class PreemptionFlag:
  """SIGTERM (preemption notice) handler that only sets a flag; the train loop polls it.

  Saving from inside a signal handler could interleave with a running step or save, so the
  loop finishes its step, saves synchronously and exits 0. With several processes, all of them
  must agree to stop at the same step (a checkpoint is collective): should_stop() all-gathers
  the flags every `sync_every` steps.
  """

  def __init__(self, signals=(signal.SIGTERM,), sync_every: int = 10):
    self._event = threading.Event()
    self._previous = {}
    self.sync_every = max(int(sync_every), 1)
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
    if jax.process_count() == 1:
      return self.triggered
    if step % self.sync_every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.triggered))
    return bool(np.any(flags))

  def uninstall(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def incomplete_checkpoints(directory: str | os.PathLike) -> list[str]:
  """Names of step directories left half-written (temporary, never committed)."""
  if not os.path.isdir(directory):
    return []
  return sorted(n for n in os.listdir(directory) if TMP_MARKER in n)


class Checkpointer:
  """CheckpointManager for TrainState + data iterator state + config.

  save_every: async save every N steps (also forced saves: final, preemption).
  keep: the last K checkpoints are kept, plus every `keep_every`-th step if given.
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
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state: Any, data_state: Optional[dict] = None,
           config: Optional[dict] = None, *, force: bool = False) -> bool:
    """Starts a save (async unless configured otherwise); call on every process."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(dict(data_state or {})),
                              config=ocp.args.JsonSave(dict(config or {})))
    return self.manager.save(int(step), args=args, force=force)

  def restore(self, target: Any, step: Optional[int] = None) -> tuple[Any, dict, dict]:
    """Restores (state, data_state, config); `target` is a state or abstract state whose
    leaves carry the shardings to restore into (see state.abstract_state)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no complete checkpoint in {self.directory}.')
    abstract = jax.tree.map(_as_abstract, target)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['data'] or {}), dict(restored['config'] or {})

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _as_abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, 'sharding', None))
