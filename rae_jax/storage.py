"""The one path layer for workdir and input files: local disk, NFS or `gs://`.

Paths stay plain strings everywhere (`os.path.join` is correct for `gs://b/x` too); every
operation that touches storage goes through this module, which uses `os` for local paths and
`etils.epath` (fsspec/gcsfs) for URLs. What an object store changes, and how we handle it:

* No rename. Files are published by writing to a local temp file and uploading it in one
  request (a GCS object appears whole or not at all), instead of temp-name + rename.
* No directory rename. `move_tree` copies every object and then deletes the source, so a kill
  in between leaves two complete copies, never a half-moved one; callers that must not lose
  data (checkpoint quarantine) only ever rely on the copy being complete before the delete.
* Cached listings. gcsfs caches directory listings per process; `listdir`/`exists` drop the
  cache first so a file another host wrote is seen.
* No memory mapping: `open` gives a seekable file with ranged reads instead.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from typing import IO, Callable, Iterator

_SCHEMES = ("gs://", "s3://", "az://", "hf://")
# Files whose presence makes a directory count as complete (orbax on object stores).
_COMMIT_MARKERS = ("commit_success.txt",)


def is_remote(path) -> bool:
  return isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(_SCHEMES)


def _epath(path):
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(os.fspath(path))


def _fs(path):
  """The fsspec filesystem behind a URL: the instance epath uses (one listing cache to drop)."""
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  return backend.fsspec_backend.fs(os.fspath(path))


def _fresh(path) -> None:
  """Drop gcsfs' cached listings above `path` (another host may have written since)."""
  try:
    _fs(path).invalidate_cache()
  except Exception:  # pylint: disable=broad-except
    pass


def abspath(path) -> str:
  """Absolute form for libraries that want one (orbax); URLs are returned unchanged."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def join(*parts) -> str:
  return os.path.join(*(os.fspath(p) for p in parts))


def exists(path) -> bool:
  if not is_remote(path):
    return os.path.exists(path)
  _fresh(path)
  return _epath(path).exists()


def isdir(path) -> bool:
  if not is_remote(path):
    return os.path.isdir(path)
  _fresh(path)
  return _epath(path).is_dir()


def isfile(path) -> bool:
  if not is_remote(path):
    return os.path.isfile(path)
  _fresh(path)
  return _epath(path).is_file()


def listdir(path) -> list[str]:
  """Names in a directory (no error for a missing one on object stores: [])."""
  if not is_remote(path):
    return os.listdir(path)
  _fresh(path)
  p = _epath(path)
  if not p.is_dir():
    raise FileNotFoundError(f"no such directory: {path}")
  return [c.name for c in p.iterdir()]


def glob(directory, pattern: str) -> list[str]:
  """Paths in `directory` matching a shell pattern on their name, sorted."""
  import fnmatch  # pylint: disable=g-import-not-at-top
  if not isdir(directory):
    return []
  return sorted(join(directory, n) for n in listdir(directory) if fnmatch.fnmatch(n, pattern))


def walk(top) -> Iterator[tuple[str, list[str], list[str]]]:
  if not is_remote(top):
    yield from os.walk(top, followlinks=True)
    return
  _fresh(top)
  scheme = os.fspath(top).split("://", 1)[0] + "://"
  for root, dirs, files in _fs(top).walk(os.fspath(top)):
    root = root if "://" in root else scheme + root  # fsspec drops the scheme
    yield root, sorted(dirs), sorted(files)


def makedirs(path) -> None:
  """A no-op on object stores (directories are prefixes), `mkdir -p` elsewhere."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def remove(path) -> None:
  if not is_remote(path):
    os.remove(path)
    return
  _epath(path).unlink()
  _fresh(path)


def rmtree(path, ignore_errors: bool = False) -> None:
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=ignore_errors)
    return
  try:
    if _epath(path).exists():
      _epath(path).rmtree()
  except Exception:  # pylint: disable=broad-except
    if not ignore_errors:
      raise
  _fresh(path)


def open(path, mode: str = "rb") -> IO:  # pylint: disable=redefined-builtin
  """Reading (or a non-atomic write) of one file. Use write_file to publish a file."""
  if not is_remote(path):
    import builtins  # pylint: disable=g-import-not-at-top
    return builtins.open(path, mode)
  if "r" in mode:
    _fresh(path)
  return _epath(path).open(mode)


def read_bytes(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def read_range(path, start: int, end: int) -> bytes:
  """Bytes start..end-1 of a file (one ranged request on object stores; thread-safe)."""
  if not is_remote(path):
    with open(path, "rb") as f:
      f.seek(start)
      return f.read(end - start)
  return _fs(path).cat_file(os.fspath(path), start=start, end=end)


def read_text(path) -> str:
  return read_bytes(path).decode("utf-8")


def load_npz(path):
  """np.load of an .npz (usable as a context manager); ranged reads on object stores."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not is_remote(path):
    return np.load(path)
  f = open(path, "rb")
  z = np.load(f)
  z.fid = f  # closed with the NpzFile
  return z


def write_file(path, write: Callable[[IO[bytes]], object]) -> None:
  """Atomically (re)write `path` with `write(binary file)`: readers see the old file or the
  new one, never a part. Local: temp file + rename (atomic.py). Object store: written to a
  local temp file first, then uploaded in one request (an object appears whole or not at all;
  a failing `write` uploads nothing)."""
  from rae_jax import atomic  # pylint: disable=g-import-not-at-top
  if not is_remote(path):
    atomic.write_file(os.fspath(path), write)
    return
  with tempfile.TemporaryDirectory(prefix="rae-upload-") as d:
    local = os.path.join(d, "file")
    with io.open(local, "wb") as f:
      write(f)
    upload(local, path)


def write_bytes(path, data: bytes) -> None:
  write_file(path, lambda f: f.write(data))


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def upload(local: str, path) -> None:
  """Copy a local file to `path` (one request on object stores)."""
  if not is_remote(path):
    makedirs(os.path.dirname(os.path.abspath(path)))
    shutil.copyfile(local, path)
    return
  _fs(path).put_file(local, os.fspath(path))
  _fresh(path)


def copy_file(src, dst) -> None:
  if not is_remote(src) and not is_remote(dst):
    makedirs(os.path.dirname(os.path.abspath(dst)))
    shutil.copyfile(src, dst)
  elif is_remote(src) and is_remote(dst) and src.split("://")[0] == dst.split("://")[0]:
    _fs(src).copy(os.fspath(src), os.fspath(dst))  # server-side
    _fresh(dst)
  elif is_remote(src) and not is_remote(dst):
    makedirs(os.path.dirname(os.path.abspath(dst)))
    _fs(src).get_file(os.fspath(src), os.fspath(dst))
  elif is_remote(dst) and not is_remote(src):
    upload(src, dst)
  else:
    write_file(dst, lambda f: f.write(read_bytes(src)))


def files_under(directory) -> list[str]:
  """Relative paths of every file below `directory` (one recursive listing on object stores)."""
  if is_remote(directory):
    _fresh(directory)
    base = os.fspath(directory).split("://", 1)[1].rstrip("/") + "/"
    try:
      found = _fs(directory).find(os.fspath(directory))
    except FileNotFoundError:
      return []
    return sorted(f[len(base):] for f in found if f.startswith(base) and not f.endswith("/"))
  out = []
  for root, _, files in os.walk(directory, followlinks=True):
    rel = os.path.relpath(root, directory)
    out.extend(os.path.normpath(os.path.join(rel, f)) for f in files)
  return sorted(out)


def copy_tree(src, dst) -> None:
  for rel in files_under(src):
    copy_file(join(src, rel), join(dst, rel))


def replace(src, dst) -> None:
  """Move one file onto `dst`: an atomic rename locally; copy then delete on object stores
  (the copy is complete before the source goes away)."""
  if not is_remote(src) and not is_remote(dst):
    os.replace(src, dst)
    return
  copy_file(src, dst)
  remove(src)


def move_tree(src, dst) -> None:
  """Move a directory: one rename locally; on object stores every object is copied, the copy
  checked complete, and only then the source deleted. Never loses data: a kill leaves `src`
  whole (and maybe a partial `dst`), or two complete copies."""
  if not is_remote(src) and not is_remote(dst):
    os.rename(src, dst)
    return
  names = files_under(src)
  copy_tree(src, dst)
  missing = sorted(set(names) - set(files_under(dst)))
  if missing:
    raise OSError(f"copying {src} to {dst}: {missing[:3]} did not arrive; {src} kept")
  for marker in _COMMIT_MARKERS:  # first: a half-deleted source never looks committed
    if marker in names:
      remove(join(src, marker))
  rmtree(src)


@contextlib.contextmanager
def local_copy(path) -> Iterator[str]:
  """A local file name holding `path`'s bytes, for libraries that only take file names
  (torch.load, safetensors.safe_open); the path itself when it is already local."""
  if not is_remote(path):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory(prefix="rae-download-") as d:
    local = os.path.join(d, os.path.basename(os.fspath(path).rstrip("/")))
    _fs(path).get_file(os.fspath(path), local)
    yield local


@contextlib.contextmanager
def local_dir(path) -> Iterator[str]:
  """A local directory holding a copy of `path`'s tree (HF folders, image folders)."""
  if not is_remote(path):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory(prefix="rae-download-") as d:
    for rel in files_under(path):
      local = os.path.join(d, rel)
      os.makedirs(os.path.dirname(local), exist_ok=True)
      _fs(path).get_file(join(path, rel), local)
    yield d


@contextlib.contextmanager
def staged_dir(path) -> Iterator[str]:
  """A local directory whose files end up under `path` when the block succeeds (libraries
  that write folders: safetensors, diffusers). Local paths are written in place."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory(prefix="rae-upload-") as d:
    yield d
    for root, _, files in os.walk(d):
      for f in files:
        local = os.path.join(root, f)
        upload(local, join(path, os.path.relpath(local, d)))


def publish_dir(local_src: str, dst, marker: str, keep: tuple[str, ...] = ()) -> None:
  """Replace the object-store directory `dst` by the files of the local directory `local_src`.

  There is no directory rename on an object store, so completeness is carried by `marker` (a
  file of the folder, e.g. README.txt or config.json): it is deleted first, every other file
  uploaded (each appears whole), files of the old version not in the new one deleted (except
  under `keep`, e.g. another mode's subfolder), and `marker` uploaded last. A reader that finds
  the marker sees one complete version; a kill part-way leaves no marker (rerun the export).
  Local destinations use atomic.replace_dir instead (one rename)."""
  if not is_remote(dst):
    raise ValueError(f"publish_dir is for object stores; {dst} is local (use atomic.replace_dir)")
  if exists(join(dst, marker)):
    remove(join(dst, marker))
  new = []
  for root, _, files in os.walk(local_src):
    for f in files:
      rel = os.path.relpath(os.path.join(root, f), local_src)
      new.append(rel)
  for rel in sorted(new):
    if rel != marker:
      upload(os.path.join(local_src, rel), join(dst, rel))
  for rel in files_under(dst):
    if rel not in new and rel != marker and not rel.startswith(tuple(k + "/" for k in keep)):
      remove(join(dst, rel))
  if marker in new:
    upload(os.path.join(local_src, marker), join(dst, marker))
