"""config.profile: the train loop writes a jax.profiler trace (TensorBoard xplane + Perfetto)."""
import glob
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rae_jax.train import loop as loop_lib
from rae_jax.train.profile import StepProfiler


class _Ckpt:
  """Only what StepProfiler and the loop read from a checkpointer: where the stage lives."""

  def __init__(self, stage_dir):
    self.directory = os.path.join(stage_dir, "checkpoints")

  def latest_step(self):
    return None

  def save(self, *a, **k):
    return False

  def check(self):
    pass

  def should_save(self, step):
    return False

  def wait(self):
    pass

  def close(self):
    pass


class _State(NamedTuple):
  w: jax.Array
  step: jax.Array


@jax.jit
def _step(state, batch):
  w = state.w - 0.1 * jnp.tanh(state.w @ batch)
  return _State(w, state.step + 1), {"loss": jnp.mean(w ** 2)}


def _run(workdir, profile):
  state = _State(jnp.eye(64), jnp.zeros((), jnp.int32))
  batches = iter([jnp.full((64, 64), 0.01 * i) for i in range(6)])
  loop_lib.train_loop(_step, state, batches, num_steps=6, global_batch_size=1,
                      checkpointer=_Ckpt(os.path.join(workdir, "stage2")),
                      config={"profile": profile}, log_every=3, name="stage2")


def test_trace_written_under_workdir_profile(tmp_path):
  _run(str(tmp_path), {"start_step": 2, "num_steps": 3})
  runs = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*"))
  assert len(runs) == 1, runs
  xplane = glob.glob(os.path.join(runs[0], "*.xplane.pb"))
  perfetto = glob.glob(os.path.join(runs[0], "*.trace.json.gz"))
  assert xplane and os.path.getsize(xplane[0]) > 0
  assert perfetto and os.path.getsize(perfetto[0]) > 0


def test_no_trace_unless_asked(tmp_path):
  _run(str(tmp_path), {"start_step": -1, "num_steps": 3})
  assert not os.path.exists(tmp_path / "profile")


def test_trace_stopped_when_the_run_ends_inside_the_window(tmp_path):
  _run(str(tmp_path), {"start_step": 5, "num_steps": 10})  # steps 5..6 of 6 traced
  assert glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  prof = StepProfiler.from_config({"profile": {"start_step": 1, "num_steps": 1}},
                                  workdir=str(tmp_path))
  assert prof.enabled and prof.logdir == str(tmp_path / "profile")
