"""One run, one writer: a lock object in the workdir, on local disk, NFS or gs://.

`<workdir>/.rae_jax.lock` holds JSON {host, pid, pid_start, started, heartbeat, mode, token,
processes}. Only process 0 of a run takes it (one lock per run, not per process); the other
processes learn the outcome from it. Modes that only read a workdir (`sample`, `eval`,
`export_*`, ...) take no lock and run beside a training run.

- Acquire: create-if-absent. Local/NFS: `open(O_CREAT | O_EXCL)`. gs://: an upload with the
  precondition `if_generation_match=0` (GCS's "only if no object exists"), so two starters
  cannot both win even though gs:// has no atomic rename and lists eventually.
- Held: a daemon thread rewrites `heartbeat` every HEARTBEAT_S (gs://: conditional on the
  generation it last wrote, so a lock taken over meanwhile is noticed, never overwritten).
  Released (deleted) when the mode ends, also on failure and preemption.
- Stale (a run killed with -9, a lost VM): on the same host, the holder's pid is gone or was
  reused (different start time); from another host, no heartbeat for STALE_S (clocks of the
  hosts must agree to within that). A stale lock is taken over without manual cleanup:
  gs:// rewrites it with `if_generation_match=<the stale generation>` (compare-and-swap: one
  restarter wins); local disk renames the stale file aside (one renamer wins), checks that it
  is the one judged stale and creates a new one exclusively.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Optional

from absl import logging

LOCK_NAME = ".rae_jax.lock"
HEARTBEAT_S = float(os.environ.get("RAE_LOCK_HEARTBEAT_S", "60"))
STALE_S = float(os.environ.get("RAE_LOCK_STALE_S", "600"))


class WorkdirLocked(RuntimeError):
  """Another live run writes to this workdir; the message names it (host, pid, start time)."""


def _pid_start(pid: int) -> Optional[str]:
  """Start time of a pid (clock ticks since boot) from /proc; None where unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _pid_alive(pid: int, start: Optional[str]) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # someone else's live process
  now = _pid_start(pid)
  return start is None or now is None or now == start


def describe(info: dict) -> str:
  return (f"host {info.get('host')}, pid {info.get('pid')}, --mode={info.get('mode')}, started "
          f"{info.get('started')}, last heartbeat {_age(info)} s ago")


def _age(info: dict) -> int:
  return int(time.time() - float(info.get("heartbeat", 0)))


def is_stale(info: dict) -> bool:
  if info.get("host") == socket.gethostname():
    return not _pid_alive(int(info.get("pid", -1)), info.get("pid_start"))
  return _age(info) > STALE_S


class _LocalStore:
  """A lock file on a POSIX filesystem (local disk, NFS v3+: O_EXCL create is atomic)."""

  def __init__(self, path: str):
    self.path = path

  def read(self) -> Optional[tuple[dict, Any]]:
    try:
      with open(self.path, "rb") as f:
        text = f.read()
    except FileNotFoundError:
      return None
    try:
      info = json.loads(text)
    except ValueError:  # killed while writing it: a lock nobody holds
      info = {"host": "?", "pid": -1, "heartbeat": 0, "token": None}
    return info, info.get("token")

  def create(self, data: bytes) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    return True

  def take_over(self, version: Any, data: bytes) -> bool:
    aside = f"{self.path}.stale.{uuid.uuid4().hex}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return self.create(data)  # released meanwhile
    moved = _LocalStore(aside).read()
    if moved is not None and moved[1] != version:  # a fresh lock replaced the stale one first
      with contextlib.suppress(OSError):
        os.link(aside, self.path)  # put it back (fails only if yet another one exists)
      os.unlink(aside)
      return False
    os.unlink(aside)
    return self.create(data)

  def update(self, version: Any, data: bytes) -> bool:
    current = self.read()
    if current is None or current[1] != version:
      return False
    tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, self.path)
    return True

  def delete(self, version: Any) -> None:
    current = self.read()
    if current is not None and current[1] == version:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(self.path)


class _GcsStore:
  """A lock object on GCS with generation preconditions (google-cloud-storage)."""

  def __init__(self, path: str):
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    bucket, _, name = path[len("gs://"):].partition("/")
    self.blob = storage.Client().bucket(bucket).blob(name)
    self.path = path
    self._failed = (exceptions.PreconditionFailed, exceptions.NotFound)
    self._version = None

  def read(self) -> Optional[tuple[dict, Any]]:
    try:
      text = self.blob.download_as_bytes()
    except self._failed:
      return None
    try:
      info = json.loads(text)
    except ValueError:
      info = {"host": "?", "pid": -1, "heartbeat": 0, "token": None}
    return info, self.blob.generation

  def _upload(self, data: bytes, generation: int) -> bool:
    try:
      self.blob.upload_from_string(data, if_generation_match=generation)
    except self._failed:
      return False
    self._version = self.blob.generation
    return True

  def create(self, data: bytes) -> bool:
    return self._upload(data, 0)

  def take_over(self, version: Any, data: bytes) -> bool:
    return self._upload(data, version)

  def update(self, version: Any, data: bytes) -> bool:
    del version
    return self._upload(data, self._version)

  def delete(self, version: Any) -> None:
    del version
    with contextlib.suppress(*self._failed):
      self.blob.delete(if_generation_match=self._version)


def _store(workdir: str):
  path = f"{workdir.rstrip('/')}/{LOCK_NAME}"
  if workdir.startswith("gs://"):
    return _GcsStore(path)
  if "://" in workdir:
    raise ValueError(f"{workdir}: the workdir lock supports local paths, NFS and gs://")
  return _LocalStore(path)


class WorkdirLock:
  """Held by process 0 of a writing run; `release()` is idempotent."""

  def __init__(self, workdir: str, mode: str, processes: int = 1):
    self.store = _store(os.fspath(workdir))
    self.token = uuid.uuid4().hex
    pid = os.getpid()
    now = time.time()
    self.info = dict(host=socket.gethostname(), pid=pid, pid_start=_pid_start(pid),
                     started=time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now)),
                     heartbeat=now, mode=mode, token=self.token, processes=processes)
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self.held = False

  def _data(self) -> bytes:
    return json.dumps(self.info, indent=1).encode()

  def acquire(self) -> "WorkdirLock":
    for _ in range(5):
      if self.store.create(self._data()):
        break
      current = self.store.read()
      if current is None:
        continue  # released between our create and read: try again
      info, version = current
      if not is_stale(info):
        raise WorkdirLocked(
            f"{self.store.path}: the workdir is in use by another run ({describe(info)}). One "
            "workdir has one writer: wait for it, stop it, or use another --workdir (read-only "
            "modes such as sample, eval and export_* may run beside it)")
      if self.store.take_over(version, self._data()):
        logging.warning("Took over the stale lock of a run that is gone (%s): %s", describe(info),
                        self.store.path)
        break
    else:
      raise WorkdirLocked(f"{self.store.path}: could not take the workdir lock (other runs keep "
                          "starting on this workdir)")
    self.held = True
    self._thread = threading.Thread(target=self._beat, name="rae_jax_lock_heartbeat", daemon=True)
    self._thread.start()
    return self

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S):
      self.info["heartbeat"] = time.time()
      try:
        ok = self.store.update(self.token, self._data())
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("workdir lock heartbeat failed (%s); retrying", e)
        continue
      if not ok:
        logging.error("%s was taken over by another run: this run no longer holds the workdir",
                      self.store.path)
        self.held = False
        return

  def release(self):
    self._stop.set()
    if self.held:
      self.held = False
      with contextlib.suppress(Exception):
        self.store.delete(self.token)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


@contextlib.contextmanager
def hold(workdir: str, mode: str):
  """The run's lock on every process: process 0 takes it, all processes agree on the outcome."""
  import jax  # pylint: disable=g-import-not-at-top
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir, mode, jax.process_count()).acquire()
    except Exception as e:  # pylint: disable=broad-except
      error = e
  if jax.process_count() > 1:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not ok and error is None:
      error = WorkdirLocked(f"{workdir}: in use by another run (see process 0's log)")
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
