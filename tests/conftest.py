"""Shared test setup: 8 forced host devices (set before jax is imported) and reference paths."""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from rae_jax.interop import common as interop_common  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def rel_err(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def ref_dir():
  """Golden vectors copied from ../shared/reference into tests/fixtures/reference."""
  return FIXTURES / "reference"


seeded_state_dict = interop_common.seeded_state_dict  # the reference README's weight rule


@pytest.fixture(scope="session")
def gcs():
  """A GCS emulator on 127.0.0.1 (tests/gcs_emulator.py), shared by the session's tests; each
  test uses its own prefix in the bucket."""
  pytest.importorskip("gcp_storage_emulator")
  import atexit
  import gcs_emulator
  emu = gcs_emulator.start()  # sets the environment gcsfs reads when it is imported
  # Stopped at exit, after the atexit handlers registered later (tensorboardX's GCS writer
  # uploads its event file once more there; with the emulator gone it would retry for 120 s).
  atexit.register(emu.stop)
  pytest.importorskip("gcsfs")
  yield emu
