"""gs:// workdirs against a local GCS emulator: the path layer, checkpoints with a
damaged newest step, and the demo end to end (kill -9 and resume, eval, export).

The emulator (tests/gcs_emulator.py, gcp-storage-emulator in this process) is the real test
bed: orbax/tensorstore, gcsfs and google-cloud-storage talk HTTP to it. Each test works under
its own prefix of the session's bucket.
"""
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from conftest import REPO


def _prefix(gcs, name):
  return gcs.url(f"{name}-{uuid.uuid4().hex[:8]}")


def test_storage_layer_on_gcs(gcs, tmp_path):
  from rae_jax import storage
  root = _prefix(gcs, "layer")
  assert storage.is_remote(root) and not storage.exists(root) and not storage.isdir(root)
  assert storage.abspath(root) == root  # never a local 'gs:' folder
  storage.write_text(f"{root}/a/x.json", '{"k": 1}')
  storage.write_file(f"{root}/a/b/arr.npz", lambda f: np.savez(f, v=np.arange(5)))
  assert storage.read_text(f"{root}/a/x.json") == '{"k": 1}'
  assert sorted(storage.listdir(f"{root}/a")) == ["b", "x.json"]
  assert storage.isdir(f"{root}/a/b") and storage.isfile(f"{root}/a/x.json")
  assert storage.files_under(root) == ["a/b/arr.npz", "a/x.json"]
  with storage.load_npz(f"{root}/a/b/arr.npz") as z:
    np.testing.assert_array_equal(z["v"], np.arange(5))
  assert storage.read_range(f"{root}/a/x.json", 2, 3) == b"k"
  assert not os.path.exists(os.path.join(os.getcwd(), "gs:"))

  # A failing writer publishes nothing (no half object).
  with pytest.raises(RuntimeError):
    def broken(f):
      f.write(b"half")
      raise RuntimeError("killed mid-write")
    storage.write_file(f"{root}/a/half.bin", broken)
  assert not storage.exists(f"{root}/a/half.bin")

  # move_tree (no directory rename on GCS): copied, checked, then the source deleted.
  storage.write_text(f"{root}/a/commit_success.txt", "ok")
  storage.move_tree(f"{root}/a", f"{root}/a.corrupt")
  assert not storage.exists(f"{root}/a")
  assert storage.files_under(f"{root}/a.corrupt") == ["b/arr.npz", "commit_success.txt", "x.json"]

  # publish_dir: the marker is written last; stale files go, kept subfolders stay.
  storage.write_text(f"{root}/exp/old.txt", "old")
  storage.write_text(f"{root}/exp/diffusers/config.json", "{}")
  local = tmp_path / "stage"
  local.mkdir()
  (local / "m.pt").write_bytes(b"w")
  (local / "README.txt").write_text("done")
  storage.publish_dir(str(local), f"{root}/exp", "README.txt", keep=("diffusers",))
  assert storage.files_under(f"{root}/exp") == ["README.txt", "diffusers/config.json", "m.pt"]

  with storage.local_copy(f"{root}/exp/m.pt") as p:
    assert open(p, "rb").read() == b"w"
  with storage.local_dir(f"{root}/exp") as d:
    assert sorted(os.listdir(d)) == ["README.txt", "diffusers", "m.pt"]


def test_checkpoint_damaged_newest_falls_back_on_gcs(gcs):
  """A damaged newest step on gs:// is moved aside (copied to <step>.corrupt, never deleted
  before the copy is complete) and the previous step restored, as on local disk."""
  import jax
  import jax.numpy as jnp
  from rae_jax import storage
  from rae_jax.train import checkpoint as ckpt_lib
  from rae_jax.train import optim
  from rae_jax.train import state as state_lib

  root = _prefix(gcs, "ckpt")
  tx = optim.make_optimizer(1e-3)
  params = {"w": jnp.arange(64, dtype=jnp.float32).reshape(8, 8), "b": jnp.ones(3)}
  state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(3))
  ck = ckpt_lib.Checkpointer(root, save_every=1, keep=3)
  for step in (1, 2, 3):
    state = state.replace(params=jax.tree.map(lambda p: p + 1, state.params), step=step)
    assert ck.save(step, state, {"pos": step}, {"model": "tiny"})
    ck.wait()
  assert ck.all_steps() == [1, 2, 3]
  ck.close()
  d = f"{root}/checkpoints"
  assert "commit_success.txt" in storage.listdir(f"{d}/3")  # orbax's marker on object stores
  before = storage.files_under(f"{d}/3")
  storage.remove(f"{d}/3/state/manifest.ocdbt")  # damage the newest step

  ck = ckpt_lib.Checkpointer(root, save_every=1, keep=3)
  zeros = jax.tree.map(jnp.zeros_like, state)
  restored, data_state, _ = ck.restore(zeros)
  assert ck.restored_step == 2 and data_state == {"pos": 2}
  np.testing.assert_array_equal(np.asarray(restored.params["b"]), np.full(3, 3.0))
  moved = storage.files_under(f"{d}/3.corrupt")
  assert moved == [f for f in before if f != "state/manifest.ocdbt"]  # nothing lost
  assert not storage.exists(f"{d}/3") and ck.all_steps() == [1, 2]
  ck.close()


def test_metric_writer_on_gcs(gcs):
  """TensorBoard event files on gs:// (tensorboardX writes them through google-cloud-storage)."""
  from rae_jax import storage
  from rae_jax.train.loop import MetricWriter
  root = _prefix(gcs, "tb")
  writer = MetricWriter(root, wandb=None)
  writer.scalars(1, {"train/loss": 0.5})
  writer.close()
  names = storage.listdir(f"{root}/tensorboard")
  assert len(names) == 1 and names[0].startswith("events.out.tfevents.")


FAST = ["--config.stage1.optim.num_steps=6", "--config.stage2.optim.num_steps=6",
        "--config.checkpoint.every_steps=3", "--config.log.every_steps=3",
        "--config.data.synthetic_size=200", "--config.sampler.num_steps=4",
        "--config.sample.num_images=20"]  # tests/test_demo.py's fast variant
EVAL = ["--config.eval.num_samples=20", "--config.eval.shard_size=10",
        "--config.eval.per_device_batch=10"]


def _cmd(workdir, *extra):
  return [sys.executable, "main.py", "--config=configs/demo.py", f"--workdir={workdir}", *FAST,
          *extra]


def _run(cmd, env):
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (cmd[4:], proc.stderr[-4000:])
  return proc.stderr


def _stage2_weights(workdir):
  import jax
  from rae_jax.pipeline import snapshots
  from rae_jax.train import mesh as mesh_lib
  mesh = mesh_lib.make_mesh()
  out = {}
  for which in ("params", "ema"):
    tree, desc = snapshots.load_params(str(workdir), "stage2", mesh, which)
    assert "step 6 " in desc, desc
    out.update({f"{which}{jax.tree_util.keystr(k)}": np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(tree)})
  return out


@pytest.mark.slow
def test_demo_on_gcs_kill_resume_eval_export(gcs, tmp_path):
  """The demo's fast variant with --workdir=gs://...: killed with SIGKILL in the middle of stage
  2, resumed, evaluated and exported; its stage-2 weights are bitwise those of an uninterrupted
  stage 2 on local disk (same stage 1 and stats). The compilation cache lives in the gs://
  workdir too (the default), so the restarts load programs compiled by the first run."""
  from rae_jax import storage
  work = _prefix(gcs, "demo") + "/run"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)

  # 1. stage 1 -> stats -> stage 2, SIGKILL as stage 2 logs step 4 (saves synchronous here, so
  #    the resume starts from step 3 and not, by chance, from 0).
  cmd = _cmd(work, "--config.log.every_steps=1", "--config.checkpoint.async_save=false")
  cmd[1] = str(REPO / "tests" / "fault_main.py")  # main.py + the kill at an exact log line
  proc = subprocess.run(cmd, cwd=REPO, env=dict(env, RAE_SIGKILL_ON_LOG="[stage2] step 4/6"),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert "[stage2] step 4/6" in proc.stderr and "[stage2] step 5/6" not in proc.stderr
  # Progress of the long passes as log lines (not a terminal): images/s, and the bar at 100%.
  assert "stats: 100%" in proc.stderr and "img/s" in proc.stderr
  assert not os.path.exists(REPO / "gs:")  # no POSIX path was made out of the URL
  assert storage.exists(f"{work}/stats/stat.npz")
  assert storage.listdir(f"{work}/{'compilation_cache'}")

  # 2. Resume: stage 1 has nothing left, stats are reused, stage 2 continues; then sampling.
  log = _run(_cmd(work), env)
  assert f"Resumed from {work}/stage2/checkpoints at step 3" in log, log[-3000:]
  assert "[stage2] step 6/6" in log
  with storage.load_npz(f"{work}/samples.npz") as z:
    assert z["arr_0"].shape == (20, 32, 32, 3)
  assert storage.listdir(f"{work}/stage2/tensorboard")

  # 3. Eval (sharded generation + scores) and export, all on gs://.
  log = _run(_cmd(work, "--mode=eval", *EVAL), env)
  assert "eval: generating: 100%" in log and "eval: scoring: 100%" in log, log[-3000:]
  import json
  metrics = json.loads(storage.read_text(f"{work}/eval/metrics.json"))
  assert metrics["random_inception"] is True and np.isfinite(metrics["inception_score"])
  with storage.load_npz(f"{work}/eval/samples.npz") as z:
    assert z["arr_0"].shape == (20, 32, 32, 3) and z["arr_0"].dtype == np.uint8
  _run(_cmd(work, "--mode=export_torch"), env)
  exported = storage.listdir(f"{work}/export")
  assert "README.txt" in exported and any(n.endswith(".safetensors") for n in exported), exported

  # 4. An uninterrupted stage 2 on local disk from the same stage 1 and stats.
  local = tmp_path / "local"
  for part in ("stage1", "stats"):
    storage.copy_tree(f"{work}/{part}", str(local / part))
  _run(_cmd(local, "--mode=train_stage2",
            f"--config.compilation_cache.dir={work}/compilation_cache"), env)
  ref, got = _stage2_weights(local), _stage2_weights(work)
  assert ref.keys() == got.keys() and len(ref) > 10
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def _events(data: bytes):
  """(step, scalar tags, session_log status) of each record of a TensorBoard event file."""
  import struct
  from tensorboardX.proto import event_pb2
  out, pos = [], 0
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
    out.append((ev.step, [v.tag for v in ev.summary.value], ev.session_log.status))
    pos += 12 + n + 4
  return out


def test_tracking_survives_restart_on_gcs(gcs, monkeypatch):
  """A restart neither duplicates TensorBoard steps nor opens a new W&B run.

  TensorBoard: the resumed writer starts its event file with purge_step = first step it logs
  (TensorBoard then hides the killed run's events from that step on). W&B (offline): the run
  id is a function of the workdir, and the run is opened with resume='allow'."""
  pytest.importorskip("wandb")
  from rae_jax import storage
  from rae_jax.train import loop
  from tensorboardX.proto import event_pb2
  root = _prefix(gcs, "track")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  ids = []
  for first, last in ((1, 5), (4, 6)):  # killed after step 5, resumed from the step-3 checkpoint
    writer = loop.MetricWriter(root, wandb={"project": "rae-test"})
    writer.start_at(first)
    ids.append(writer._wandb.run.id)
    for step in range(first, last + 1):
      writer.scalars(step, {"train/loss": 1.0 / step})
    writer.close()
  assert ids[0] == ids[1] == loop.wandb_run_id(root)
  files = sorted(storage.listdir(f"{root}/tensorboard"))
  assert len(files) == 2
  first, resumed = sorted((_events(storage.read_bytes(f"{root}/tensorboard/{f}")) for f in files),
                         key=lambda ev: min(s for s, tags, _ in ev if tags))
  assert [s for s, tags, _ in first if tags] == [1, 2, 3, 4, 5]
  assert (1, [], event_pb2.SessionLog.START) in first
  ev = resumed
  assert (4, [], event_pb2.SessionLog.START) in ev  # the purge marker at the resumed step
  assert [s for s, tags, _ in ev if tags] == [4, 5, 6]


@pytest.mark.slow
def test_two_process_eval_shards_on_gcs_match_one_process(gcs, tmp_path):
  """Two processes (jax.distributed, gloo) write eval shards and parts to one gs:// folder,
  straight and preempted + resumed; the files equal a one-process run's."""
  import socket
  import eval_worker
  import train_worker
  from rae_jax import storage
  from rae_jax.eval import sample_shards
  from rae_jax.train import mesh as mesh_lib
  root = _prefix(gcs, "eval")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(train_worker.subprocess_env(devices=4), **{
      k: os.environ[k] for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                 "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "GOOGLE_CLOUD_PROJECT")})
  procs = [subprocess.Popen(
      [sys.executable, str(REPO / "tests" / "eval_worker.py"), "--out", str(tmp_path),
       "--shards_root", root, "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
       "--process_id", str(pid)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for pid in range(2)]
  bound = eval_worker.bound_sampler(mesh_lib.make_mesh(1, 8))
  single = sample_shards.generate_shards(bound, eval_worker.toy_labels(), str(tmp_path / "single"),
                                      eval_worker.SHARD_SIZE, manifest=eval_worker.MANIFEST)
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0 and "finished" in out, out[-3000:]

  def arrays(paths):
    out = []
    for p in paths:
      with storage.load_npz(p) as z:
        out.append((z["arr_0"], z["arr_1"], z["indices"]))
    return [np.concatenate(x) for x in zip(*out)]
  ref = arrays(single)
  for run in ("full", "resumed"):
    files = sample_shards.shard_files(f"{root}/{run}", 30, eval_worker.SHARD_SIZE)
    assert all(f.startswith("gs://") for f in files)
    assert any(".part_" in f for f in files)  # shard 2 straddles the two processes
    for a, b in zip(arrays(files), ref):
      np.testing.assert_array_equal(a, b)


def test_inputs_on_gcs_read_like_local_ones(gcs, ref_dir, tmp_path):
  """Input paths a user may put on gs://: an HF encoder folder (encoder.path), official decoder
  weights and stat.pt (interop.*), and an image folder (data.path). Each reads exactly as its
  local copy: the imported decoder and stats export bit-identically, the images equal."""
  import ml_collections
  import test_interop_release as tir
  import test_tfds
  from rae_jax import storage
  from rae_jax.data import make_source
  from rae_jax.pipeline import release
  root = _prefix(gcs, "inputs")
  storage.copy_tree(str(ref_dir / "tiny_dinov2_reg"), f"{root}/tiny_dinov2_reg")
  for name in ("rae_tiny.decoder.safetensors", "tiny_stat.pt"):
    storage.copy_file(str(ref_dir / name), f"{root}/{name}")
  outs = {}
  for where in ("local", "gcs"):
    c = tir.rae_ref_config(ref_dir)
    if where == "gcs":
      c.encoder.path = f"{root}/tiny_dinov2_reg"
      c.interop.decoder = f"{root}/rae_tiny.decoder.safetensors"
      c.interop.stats = f"{root}/tiny_stat.pt"
    release.import_release(c, str(tmp_path / where))
    outs[where] = release.export_release(c, str(tmp_path / where), "params")
  # ... and a gs:// workdir: import_torch writes each item in place (no directory rename there).
  c = tir.rae_ref_config(ref_dir)
  release.import_release(c, f"{root}/workdir")
  assert not storage.exists(f"{root}/workdir/{release.STAGING_DIR}")
  outs["gcs_workdir"] = release.export_release(c, f"{root}/workdir", "params")
  assert storage.is_remote(outs["gcs_workdir"])
  for name in ("decoder.safetensors", "stat.safetensors"):
    want = storage.read_bytes(f"{outs['local']}/{name}")
    for where in ("gcs", "gcs_workdir"):
      assert storage.read_bytes(f"{outs[where]}/{name}") == want, (where, name)

  import jax
  from rae_jax.pipeline import builders
  encoders = []
  for path in (str(ref_dir / "tiny_dinov2_reg"), f"{root}/tiny_dinov2_reg"):
    c = tir.rae_ref_config(ref_dir)
    c.encoder.path = path
    encoders.append(builders.build_rae(c, "", with_stats=False)[1]["encoder"])
  assert jax.tree.all(jax.tree.map(np.array_equal, *encoders))

  test_tfds._write_images(tmp_path / "images")
  storage.copy_tree(str(tmp_path / "images"), f"{root}/images")
  cfg = dict(source="image_folder", tfds_name="", split="train", data_dir="", image_size=8,
             num_classes=3)
  local = make_source(ml_collections.ConfigDict(dict(cfg, path=str(tmp_path / "images"))))
  remote = make_source(ml_collections.ConfigDict(dict(cfg, path=f"{root}/images")))
  assert len(local) == len(remote) == 12
  for i in range(len(local)):
    (a, ya), (b, yb) = local[i], remote[i]
    assert ya == yb and np.array_equal(a, b), i


def test_latent_cache_on_gcs(gcs):
  """The latent cache in a gs:// workdir: two processes' shards written through the path layer,
  read back with ranged requests (no memory map on an object store), mirrors included."""
  from rae_jax.data import LatentCacheSource, LatentCacheWriter, cached_indices
  root = _prefix(gcs, "latents")
  rng = np.random.default_rng(0)
  n, shape = 12, (2, 2, 3)
  lat = rng.normal(size=(n, 2) + shape).astype(np.float32)
  labels = np.arange(n) % 5
  for p in (0, 1):
    w = LatentCacheWriter(root, process_index=p, dtype=np.float32)
    mine = np.arange(p, n, 2)
    for k in range(0, len(mine), 3):
      w.append(lat[mine[k:k + 3]], labels[mine[k:k + 3]], mine[k:k + 3])
  np.testing.assert_array_equal(cached_indices(root), np.arange(n))
  src = LatentCacheSource(root)
  assert len(src) == n and src.latent_shape == shape and src.num_classes == 5
  for i in range(n):
    latents, label = src[i]  # the image's latent and its mirror's
    np.testing.assert_array_equal(latents, lat[i])
    assert label == labels[i]
    np.testing.assert_array_equal(src.read_flip(i, True)[0], lat[i, 1])


def test_fid_reference_on_gcs(gcs, tmp_path):
  """eval.reference_npz on gs:// (an ADM reference batch: mu/sigma, images): read as locally."""
  from rae_jax import storage
  from rae_jax.eval import metrics
  rng = np.random.default_rng(0)
  a = rng.normal(size=(6, 6))
  local = str(tmp_path / "ref.npz")
  np.savez(local, mu=rng.normal(size=6), sigma=a @ a.T,
           arr_0=rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8))
  remote = _prefix(gcs, "fidref") + "/ref.npz"
  storage.copy_file(local, remote)
  want, got = metrics.load_reference_batch(local), metrics.load_reference_batch(remote)
  assert got.num_images == want.num_images == 3
  np.testing.assert_array_equal(got.mu, want.mu)
  np.testing.assert_array_equal(got.sigma, want.sigma)


def test_dino_discriminator_weights_on_gcs(gcs, ref_dir, tmp_path):
  """config.stage1.disc.dino_ckpt_path on gs://: the frozen DINO ViT loads as from local disk."""
  import jax
  import torch
  import test_train_parity as tp
  from conftest import seeded_state_dict
  from rae_jax import storage
  from rae_jax.pipeline import stage1
  meta, _ = tp.load_case(ref_dir, "train1_rae")
  config = tp.stage1_config(meta, ref_dir)
  parts = stage1.build_parts(config, meta["steps_per_epoch"] * meta["batch"])
  depth = 1 + max(parts.disc.vit_config()["key_depths"], default=0)
  sd = seeded_state_dict(tp.dino_torch_shapes(meta["discriminator"]["recipe"], depth))
  local = str(tmp_path / "dino.pth")
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, local)
  config.stage1.disc.random_init = False
  remote = _prefix(gcs, "dino") + "/dino.pth"
  storage.copy_file(local, remote)
  got = []
  for path in (local, remote):
    config.stage1.disc.dino_ckpt_path = path
    got.append(stage1.frozen_dino_params(parts.disc, config.stage1.disc, jax.random.PRNGKey(0)))
  assert jax.tree.all(jax.tree.map(np.array_equal, *got))


def test_fid_inception_weights_on_gcs(gcs, ref_dir, tmp_path):
  """eval.inception_weights on gs:// (a .npz copy of pytorch-fid's weights): the same params."""
  import json
  import jax
  from conftest import seeded_state_dict
  from rae_jax import storage
  from rae_jax.interop import inception_weights
  sd = seeded_state_dict(json.loads((ref_dir / "fid_inception.state_dict.json").read_text()))
  local = str(tmp_path / "inception.npz")
  np.savez(local, **sd)
  remote = _prefix(gcs, "inception") + "/inception.npz"
  storage.copy_file(local, remote)
  (want, r1), (got, r2) = (inception_weights.load_fid_inception_or_random(p, jax.random.PRNGKey(0))
                           for p in (local, remote))
  assert not r1 and not r2
  assert jax.tree.all(jax.tree.map(np.array_equal, want, got))
