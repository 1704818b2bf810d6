"""A local GCS emulator for the gs:// tests: gcp-storage-emulator, in process.

`start()` serves an in-memory GCS on 127.0.0.1 with one bucket and points every client at it
through the environment (inherited by the subprocesses the tests start):
  STORAGE_EMULATOR_HOST    gcsfs (hence etils.epath), google-cloud-storage (tensorboardX)
  TENSORSTORE_GCS_HTTP_URL tensorstore (hence orbax's array data)
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false skips gcsfs' bucket-layout lookup through the storage
control API, which the emulator does not serve (gcsfs would warn and fall back on every call).

One emulator gap is filled here, in the test bed only: its media download (GET ...?alt=media,
/download/...) omits the `x-goog-generation` header that real GCS always sends. tensorstore then
records generation 0 for what it read, and its next conditional request on that object fails
with "Malformed StorageGeneration" -- which is how an orbax save on gs:// failed here (OCDBT
reads its manifest, then writes it with if-generation-match). Reproduced with tensorstore
alone: write a key, read it through a new KvStore (stamp generation b'\x00' * 9), then
`write(..., if_equal=that generation)` -> "Malformed StorageGeneration". `_patch_download`
adds the two headers from the object's own metadata.
"""
import logging
import os
import socket

BUCKET = "rae"


def _free_port() -> int:
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()
  return port


def env(address: str) -> dict:
  return {"STORAGE_EMULATOR_HOST": address, "TENSORSTORE_GCS_HTTP_URL": address,
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test"}


def _patch_download() -> None:
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects
  original = objects.download
  if getattr(original, "adds_generation", False):
    return

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not found: the original set the status
      return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  download.adds_generation = True
  objects.download = download  # objects.get(alt=media) calls it by name
  for _, handlers in server.HANDLERS:
    for method, fn in list(handlers.items()):
      if fn is original:
        handlers[method] = download


class Emulator:
  def __init__(self, bucket: str = BUCKET):
    from gcp_storage_emulator.server import create_server
    _patch_download()
    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    self.port = _free_port()
    self.address = f"http://127.0.0.1:{self.port}"
    self.bucket = bucket
    self.server = create_server("127.0.0.1", self.port, in_memory=True, default_bucket=bucket)
    self._saved = {}

  def start(self) -> "Emulator":
    self.server._api.daemon = True  # never keeps the interpreter alive
    self.server.start()
    for k, v in env(self.address).items():
      self._saved[k] = os.environ.get(k)
      os.environ[k] = v
    return self

  def stop(self) -> None:
    self.server.stop()
    for k, v in self._saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v

  def wipe(self) -> None:
    self.server.wipe(keep_buckets=True)

  def url(self, *parts: str) -> str:
    return "/".join([f"gs://{self.bucket}", *parts])


def start(bucket: str = BUCKET) -> Emulator:
  return Emulator(bucket).start()
