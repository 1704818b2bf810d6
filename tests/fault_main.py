"""main.py with an injected disk-full error: the async save of step $RAE_FAIL_SAVE_STEP fails
when it is committed (as ENOSPC would), for the fault-injection tests. $RAE_STUCK_LIBRARY_THREAD
starts a non-daemon thread that never ends. $RAE_SIGKILL_ON_LOG kills the process with SIGKILL
when a log line contains that text."""
import errno
import os
import pathlib
import runpy
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent

if os.environ.get('RAE_FAIL_SAVE_STEP'):
  from orbax.checkpoint._src.path import atomicity
  _marker = f"{os.environ['RAE_FAIL_SAVE_STEP']}.orbax-checkpoint-tmp"
  _original = atomicity.AtomicRenameTemporaryPath.finalize

  async def _finalize(self, *args, **kwargs):
    if _marker in str(vars(self)):
      raise OSError(errno.ENOSPC, 'No space left on device (injected)')
    return await _original(self, *args, **kwargs)
  atomicity.AtomicRenameTemporaryPath.finalize = _finalize

if os.environ.get('RAE_SIGKILL_ON_LOG'):
  # SIGKILL (kill -9: no handler, no flush) the moment a log line contains this text, e.g.
  # '[stage2] step 4/6': a kill at an exact step, however fast the steps run.
  import logging
  import signal

  class _KillOnLog(logging.Handler):
    def emit(self, record):
      if os.environ['RAE_SIGKILL_ON_LOG'] in record.getMessage():
        sys.stderr.write(f'{record.getMessage()}\n(SIGKILL)\n')
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
  logging.getLogger().addHandler(_KillOnLog())

if os.environ.get('RAE_STUCK_LIBRARY_THREAD'):
  # A library thread that never ends (as orbax's save/signalling threads waiting for a commit
  # that will not come): a failed run must still exit promptly.
  import threading
  threading.Thread(target=threading.Event().wait, name='stuck_library_thread',
                   daemon=False).start()

sys.path.insert(0, str(REPO))
sys.argv = [str(REPO / 'main.py')] + sys.argv[1:]
runpy.run_path(str(REPO / 'main.py'), run_name='__main__')
