"""Directory publication by rename: readers see the old or the new copy, never a mix."""
from __future__ import annotations

import os
import shutil


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
