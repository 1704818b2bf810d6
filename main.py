"""rae-jax entry point: one binary, one config, one workdir; --mode picks the job.

  python main.py --config=configs/demo.py --workdir=/tmp/rae_demo            # whole pipeline
  python main.py --config=configs/stage2_ditdh_xl_256.py --workdir=$W --mode=train_stage2 \
      --config.stage2.global_batch_size=256

Every mode resumes from what <workdir> already holds.
"""
import logging as pylogging
import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from rae_jax import modes

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Recipe (a get_config() file).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, samples).")
_MODE = flags.DEFINE_enum("mode", "all", sorted(modes.MODES), "What to run.")
flags.mark_flag_as_required("workdir")


class _QuietLibraries(pylogging.Filter):
  """Keep our INFO lines readable: orbax/XLA chatter only from WARNING up."""

  def filter(self, record):
    noisy = ("orbax", "jax/_src", "absl/logging")
    return record.levelno >= pylogging.WARNING or not any(n in record.pathname for n in noisy)


class AsyncioNoise(pylogging.Filter):
  """Collapses the asyncio noise of a failed orbax save into one counted line.

  Orbax writes a checkpoint on private event loops; when the write fails (disk full) it closes
  such a loop while tensorstore callbacks for it are still pending, and each of them reports
  `RuntimeError: Event loop is closed` through `sys.unraisablehook` (hundreds of tracebacks);
  task exceptions nobody reads are logged by the `asyncio` logger. All of them repeat the cause
  that the run's last line names. Installed for the whole run (`install`); only those two kinds
  are held back, every other unraisable exception and log record passes unchanged."""

  def __init__(self):
    super().__init__()
    self.count = 0
    self.first = None
    self._previous_hook = None

  def install(self) -> None:
    self._previous_hook = sys.unraisablehook
    sys.unraisablehook = self._unraisablehook
    pylogging.getLogger("asyncio").addFilter(self)

  def _held(self, text: str) -> None:
    self.count += 1
    if self.first is None:
      self.first = text[:300]

  def _unraisablehook(self, unraisable) -> None:
    if isinstance(unraisable.exc_value, RuntimeError) and str(
        unraisable.exc_value) == "Event loop is closed":
      self._held("RuntimeError: Event loop is closed")
    else:
      self._previous_hook(unraisable)

  def filter(self, record):
    message = record.getMessage()
    error = record.exc_info[1] if record.exc_info else None
    closed = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    if closed or message.startswith("Task exception was never retrieved"):
      cause = f": {type(error).__name__}: {str(error).strip().splitlines()[0]}" if error else ""
      self._held(message.splitlines()[0] + cause)
      return False
    return True

  def summary(self):
    """One line for the log, or None when nothing was held back."""
    if not self.count:
      return None
    return (f"{self.count} asyncio task errors after the failed save suppressed; "
            f"first: {self.first}")


_ASYNCIO_NOISE = AsyncioNoise()


def failure_sentence(mode: str, error: BaseException) -> str:
  """One line naming the cause: our errors already name the file/field/step; others get their
  type and first line, and an operating-system cause deeper in the chain (disk full, permission
  denied: its errno, path and bytes) is appended when the first line does not name it."""
  text = str(error).strip()
  first = text.splitlines()[0] if text else ""
  sentence = f"rae-jax --mode={mode} failed: {type(error).__name__}: {first}"
  from rae_jax.train.checkpoint import os_cause  # pylint: disable=g-import-not-at-top
  cause = os_cause(error)
  if cause and cause.split(" (")[0] not in sentence:
    sentence += f" -- cause: {cause}"
  return sentence


def exit_now(code: int) -> None:
  """Flush and end the process at once. A failed run must not be kept alive by a library's
  background threads (orbax's save and signalling threads, their asyncio loops), nor have them
  print tracebacks after its last line: skip the interpreter's shutdown (thread joins, garbage
  collection of pending tasks). Our own state is already closed (checkpoints, workdir lock)."""
  for handler in pylogging.getLogger().handlers + logging.get_absl_logger().handlers:
    try:
      handler.flush()
    except Exception:  # pylint: disable=broad-except
      pass
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _ASYNCIO_NOISE.install()
  try:
    modes.run(_MODE.value, _CONFIG.value, _WORKDIR.value)
  except (KeyboardInterrupt, SystemExit):
    raise
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    noise = _ASYNCIO_NOISE.summary()
    if noise:
      print(noise, file=sys.stderr)
    sys.stderr.flush()
    # Last line of the log: the cause in one sentence.
    print(failure_sentence(_MODE.value, e), file=sys.stderr, flush=True)
    exit_now(1)


if __name__ == "__main__":
  app.run(main)
