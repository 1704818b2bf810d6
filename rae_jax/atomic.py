"""Publication by rename: readers see the old or the new copy, never a mix.

Published files get the permissions a plain `open()` would give them (0666 & ~umask, so 0644
by default): `tempfile.mkstemp` creates 0600 files, which other users (or a web server) of a
shared workdir could not read after the rename.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, IO


def _umask() -> int:
  """The process umask, read without changing it where the OS allows (os.umask is racy)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def default_file_mode() -> int:
  return 0o666 & ~_umask()


def set_default_mode(path: str) -> None:
  """For files a library creates 0600 (safetensors' save_file writes through a temp file)."""
  os.chmod(path, default_file_mode())


def write_file(path: str, write: Callable[[IO[bytes]], object]) -> None:
  """Atomically (re)write `path` with `write(binary file)`; mode as open() would give it."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    os.fchmod(fd, default_file_mode())
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def recover_dir(dst: str) -> None:
  """Undo a kill between replace_dir's two renames: `dst.old` is then the only complete copy."""
  old = dst + ".old"
  if os.path.exists(old) and not os.path.exists(dst):
    os.replace(old, dst)


def replace_dir(src: str, dst: str) -> None:
  """Move `src` to `dst`, replacing it; `dst` is never a half-written mix of both."""
  old = dst + ".old"
  recover_dir(dst)
  if os.path.exists(old):
    shutil.rmtree(old)
  if os.path.exists(dst):
    os.replace(dst, old)
  os.replace(src, dst)
  if os.path.exists(old):
    shutil.rmtree(old)
