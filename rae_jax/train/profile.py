"""jax.profiler traces of a few training steps, for TensorBoard's profile plugin or Perfetto.

`--config.profile.start_step=N --config.profile.num_steps=K` traces steps N..N+K-1 (1-based step
numbers, as logged) into <workdir>/profile/plugins/profile/<run>/: an .xplane.pb for TensorBoard
(`tensorboard --logdir <workdir>/profile`) and a Perfetto trace.json.gz (ui.perfetto.dev). Only
process 0 traces unless profile.all_processes. Steps are dispatched asynchronously, so the trace
stops only after the last traced step's state is ready.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax

from rae_jax import storage


class StepProfiler:
  """Starts a trace before step `start_step` runs and stops it once `num_steps` have run."""

  def __init__(self, logdir: Optional[str], start_step: int = -1, num_steps: int = 0):
    self.logdir = logdir
    self.start = int(start_step)
    self.stop_at = self.start + int(num_steps)
    self.enabled = bool(logdir) and self.start >= 1 and num_steps > 0
    self.active = False

  @classmethod
  def from_config(cls, config: Optional[dict], checkpointer: Any = None,
                  workdir: Optional[str] = None) -> "StepProfiler":
    """From config['profile']; <workdir> defaults to the one above <workdir>/<stage>/checkpoints."""
    prof = (config or {}).get("profile") or {}
    start, num = int(prof.get("start_step", -1)), int(prof.get("num_steps", 0))
    if start < 1 or num <= 0:
      return cls(None)
    if workdir is None and checkpointer is not None:
      workdir = os.path.dirname(os.path.dirname(os.fspath(checkpointer.directory)))
    if not workdir:
      raise ValueError("config.profile.start_step is set but no workdir is known to write "
                       "<workdir>/profile to (the loop has no checkpointer)")
    if jax.process_index() != 0 and not prof.get("all_processes", False):
      return cls(None)
    return cls(os.path.join(workdir, "profile"), start, num)

  def before_step(self, step: int, state: Any) -> None:
    """Call before running `step` (1-based) with the state that step will consume."""
    if not self.enabled:
      return
    if step == self.start and not self.active:
      jax.block_until_ready(state)  # earlier steps' work stays out of the trace
      storage.makedirs(self.logdir)
      jax.profiler.start_trace(self.logdir, create_perfetto_trace=True)
      self.active = True
      logging.info("Profiling steps %d..%d into %s", self.start, self.stop_at - 1, self.logdir)
    elif step == self.stop_at and self.active:
      self.stop(state)

  def stop(self, state: Any = None) -> None:
    """Ends a running trace (also at the end of the run or on an error); idempotent."""
    if not self.active:
      return
    if state is not None:
      jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.active = False
    logging.info("Profile written to %s", self.logdir)
