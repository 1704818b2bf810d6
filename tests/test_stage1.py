"""Stage-1 training (rae_jax.pipeline.stage1): all losses, phase switches, exact resume, L1 demo path.

Tiny models: the demo config at 16px, random LPIPS VGG weights written in the importers' .pth
formats, a random 2-block DINO discriminator. The persistent compilation cache is switched on for
this module only, so the resumed run reuses the executables of the uninterrupted one.
"""
import importlib.util
import os
import shutil

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as cc

from conftest import REPO
from rae_jax.config_checks import ConfigError
from rae_jax.losses.lpips import CHANNELS, VGG16_LAYERS
from rae_jax.pipeline import stage1

N_STEPS = 4  # 2 epochs of 2 steps: L1 only for steps 0-1; LPIPS, GAN term and D updates from step 2.


def demo_config():
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  previous = jax.config.jax_compilation_cache_dir
  previous_min = jax.config.jax_persistent_cache_min_compile_time_secs
  cc.set_cache_dir(str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  cc.reset_cache()
  yield
  cc.set_cache_dir(previous)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", previous_min)
  cc.reset_cache()


@pytest.fixture(scope="module")
def lpips_dir(tmp_path_factory):
  """Random VGG16 (He init) + LPIPS lin weights as torchvision / lpips .pth files."""
  torch = pytest.importorskip("torch")
  folder = tmp_path_factory.mktemp("lpips")
  rng = np.random.default_rng(0)
  vgg, prev = {}, 3
  for layer in VGG16_LAYERS:
    if layer == "M":
      continue
    idx, ch = layer
    w = rng.standard_normal((ch, prev, 3, 3)) * np.sqrt(2.0 / (9 * prev))
    vgg[f"features.{idx}.weight"] = torch.from_numpy(w.astype(np.float32))
    vgg[f"features.{idx}.bias"] = torch.from_numpy((rng.standard_normal(ch) * 0.01).astype(np.float32))
    prev = ch
  torch.save(vgg, folder / "vgg16-397923af.pth")
  lin = {f"lin{k}.model.1.weight": torch.from_numpy(rng.uniform(0, 0.1, (1, c, 1, 1)).astype(np.float32))
         for k, c in enumerate(CHANNELS)}
  torch.save(lin, folder / stage1.LPIPS_LIN_FILE)
  return str(folder)


def tiny_config(lpips_dir, num_steps):
  c = demo_config()
  c.data.image_size = 16
  c.data.synthetic_size = 16
  c.encoder.input_size = 16
  c.encoder.patch_size = 4
  c.decoder.patch_size = 4
  c.stage1.global_batch_size = 8  # 2 steps per epoch
  c.stage1.optim.num_steps = num_steps
  c.stage1.optim.warmup_epochs = 0.5
  c.stage1.optim.decay_end_epoch = 4
  loss = c.stage1.loss
  loss.perceptual_weight = 1.0
  loss.lpips_weights = lpips_dir
  loss.lpips_start = 1.0
  loss.disc_weight = 0.75
  loss.disc_start = 1.0
  loss.disc_upd_start = 1.0
  disc = c.stage1.disc
  disc.enabled = True
  disc.random_init = True
  disc.recipe = "S_16"
  disc.recipe_overrides = dict(depth=2, embed_dim=32, num_heads=2, patch_size=32)
  disc.key_depths = ()  # one head, on the last block
  disc.ks = 3
  disc.optim.warmup_epochs = 0.5
  disc.optim.decay_end_epoch = 4
  c.checkpoint.every_steps = 2
  c.log.every_steps = 1
  c.log.tensorboard = False
  c.log.sample_every_steps = 4
  return c


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


class Recorder:
  """Train-loop hook keeping every step's metrics and a host copy of the discriminator."""

  def __init__(self):
    self.metrics, self.disc = {}, {}

  def __call__(self, step, state, metrics):
    self.metrics[step] = metrics
    if "disc" in state.extra:
      self.disc[step] = host({"disc": state.extra["disc"], "spectral": state.extra["spectral"]})


@pytest.fixture(scope="module")
def full_run(lpips_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("stage1_full"))
  rec = Recorder()
  state = stage1.train_stage1(tiny_config(lpips_dir, N_STEPS), workdir, hooks=[rec])
  return workdir, host(state), rec


def test_phases_and_config_errors(lpips_dir):
  settings = stage1.LossSettings(perceptual_weight=1.0, disc_weight=0.5)
  c = demo_config()
  c.stage1.loss.lpips_start, c.stage1.loss.disc_start, c.stage1.loss.disc_upd_start = 0.5, 8, 6
  phases = stage1.Phases.from_config(c.stage1, settings, steps_per_epoch=10)
  assert (phases.lpips_start, phases.gan_start, phases.disc_start) == (5, 80, 60)
  assert phases.at(0) == (False, False, False)
  assert phases.at(5) == (True, False, False)
  assert phases.at(60) == (True, False, True)
  assert phases.at(80) == (True, True, True)
  off = stage1.Phases.from_config(c.stage1, stage1.LossSettings(), steps_per_epoch=10)
  assert off.at(10**6) == (False, False, False)  # L1 only: one phase, one compiled step

  c = demo_config()
  c.stage1.loss.perceptual_weight = 1.0
  with pytest.raises(ConfigError, match=r"config\.stage1\.loss\.lpips_weights"):
    stage1.train_stage1(c, "/nonexistent")
  c.stage1.loss.lpips_weights = "/nonexistent/lpips"
  with pytest.raises(ConfigError, match="is not a folder"):
    stage1.train_stage1(c, "/nonexistent")
  c = demo_config()
  c.stage1.disc.enabled = True
  with pytest.raises(ConfigError, match=r"config\.stage1\.disc\.dino_ckpt_path"):
    stage1.train_stage1(c, "/nonexistent")
  c.stage1.disc.random_init = True
  c.stage1.loss.disc_loss = "wasserstein"
  with pytest.raises(ConfigError, match="disc_loss"):
    stage1.train_stage1(c, "/nonexistent")


def test_all_losses_run_and_discriminator_trains(full_run):
  workdir, state, rec = full_run
  assert int(state.step) == N_STEPS
  assert sorted(rec.metrics) == list(range(1, N_STEPS + 1))
  for step, m in rec.metrics.items():
    assert all(np.isfinite(v) for v in m.values()), (step, m)
    assert m["l1"] > 0
    gan_active = step > 2  # updates 0, 1 precede lpips_start = disc_start = disc_upd_start (step 2)
    for key in ("lpips", "g_loss", "d_weight", "d_loss", "d_lr"):
      assert (m[key] != 0) == gan_active, (step, key, m[key])
    assert 0 <= m["disc_acc"] <= 1
    if gan_active:
      assert 0 < m["d_weight"] <= 1e4
      np.testing.assert_allclose(m["loss"], m["l1"] + m["lpips"] + 0.75 * m["d_weight"] * m["g_loss"],
                                 rtol=1e-5)
    else:
      np.testing.assert_allclose(m["loss"], m["l1"] + m["lpips"], rtol=1e-6)
  # No D update before step 2; then heads and spectral vectors move; the frozen ViT is not state.
  same = jax.tree.map(np.array_equal, rec.disc[1], rec.disc[2])
  assert all(jax.tree.leaves(same))
  for k in ("disc", "spectral"):  # (a 1-vector u of a 1-output conv stays +-1)
    moved = jax.tree.map(lambda a, b: a.size == 1 or not np.array_equal(a, b),
                         rec.disc[2][k], rec.disc[3][k])
    assert all(jax.tree.leaves(moved)), k
  assert "dino" not in state.extra["disc"]
  assert int(state.extra["disc_step"]) == N_STEPS - 2
  # EMA differs from the raw decoder; reconstruction grids were written.
  assert not np.array_equal(state.params["decoder_pred"]["kernel"],
                            state.ema_params["decoder_pred"]["kernel"])
  samples = os.listdir(os.path.join(workdir, "stage1", "samples"))
  assert samples == ["step_00000004.png"]


def test_resume_is_exact(full_run, lpips_dir, tmp_path):
  """Restart from the step-N/2 checkpoint (later ones removed, as if killed after that save)."""
  full_dir, full_state, _ = full_run
  workdir = str(tmp_path)
  shutil.copytree(os.path.join(full_dir, "stage1", "checkpoints"),
                  os.path.join(workdir, "stage1", "checkpoints"))
  ckpts = os.path.join(workdir, "stage1", "checkpoints")
  assert sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) == [N_STEPS // 2, N_STEPS]
  shutil.rmtree(os.path.join(ckpts, str(N_STEPS)))
  rec = Recorder()
  resumed = host(stage1.train_stage1(tiny_config(lpips_dir, N_STEPS), workdir, hooks=[rec]))
  assert sorted(rec.metrics) == list(range(N_STEPS // 2 + 1, N_STEPS + 1))  # only the 2nd half ran
  assert int(resumed.step) == N_STEPS
  for name in ("params", "ema_params", "opt_state", "extra"):
    a, b = getattr(resumed, name), getattr(full_state, name)
    assert jax.tree.structure(a) == jax.tree.structure(b), name
    diffs = [jax.tree_util.keystr(path) for (path, x), y in
             zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b))
             if not np.array_equal(x, y)]
    assert not diffs, (name, diffs[:5])


def test_l1_only_demo_path_learns(tmp_path):
  """The demo's path (L1 only, no LPIPS, no discriminator): one compiled phase, L1 goes down.
  The demo decoder at the 16px geometry of tiny_config (shares its compiled pieces)."""
  c = demo_config()
  c.data.image_size = c.encoder.input_size = 16
  c.encoder.patch_size = c.decoder.patch_size = 4
  c.data.synthetic_size = 64
  c.stage1.global_batch_size = 8
  c.stage1.optim.num_steps = 30
  c.checkpoint.every_steps = 1000
  c.log.every_steps = 1
  c.log.tensorboard = False
  rec = Recorder()
  state = stage1.train_stage1(c, str(tmp_path), hooks=[rec])
  assert int(state.step) == 30
  keys = set(rec.metrics[1]) - {"steps_per_sec", "images_per_sec", "data/num_skipped"}
  assert keys == {"loss", "l1", "grad_norm", "lr"}  # no LPIPS / GAN terms computed or logged
  assert state.extra == {}
  l1 = np.array([rec.metrics[s]["l1"] for s in range(1, 31)])
  assert np.all(np.isfinite(l1))
  assert l1[-5:].mean() < 0.7 * l1[:5].mean(), l1


def _sharded_setup(c, lpips_dir):
  """(rae, parts, frozen, abstract state, shardings, mesh) for `c` on the 8-device mesh."""
  from rae_jax.pipeline import builders
  from rae_jax.train import mesh as mesh_lib
  from rae_jax.train import state as state_lib
  rae, rae_vars = builders.build_rae(c, "", with_stats=False)
  parts = stage1.build_parts(c, c.data.synthetic_size)
  frozen = {"encoder": rae_vars["encoder"], "lpips": stage1.load_lpips_folder(lpips_dir),
            "dino": stage1.frozen_dino_params(parts.disc, c.stage1.disc, jax.random.PRNGKey(0))}

  def init(key):
    extra = stage1.disc_extra_init(parts.disc, parts.disc_sched.tx)(key)
    return stage1.TrainState(step=0, params=rae.init_decoder(key), ema_params=None,
                             opt_state=parts.sched.tx.init(rae.init_decoder(key)), rng=key,
                             extra=extra)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  abstract = abstract.replace(ema_params=abstract.params)
  mesh = mesh_lib.make_mesh(1, 8)
  shardings = state_lib.state_shardings(abstract, mesh, min_size=64)
  return rae, parts, frozen, abstract, shardings, mesh


@pytest.mark.parametrize("scan", [False, True])  # scanned decoder: the pod recipe's layout
def test_sharded_step_never_gathers_the_global_batch(lpips_dir, scan):
  """The stage-1 step (decoder, L1 + LPIPS + GAN term, D update) keeps every activation of the
  global batch split over the devices: unpinned, the discriminator heads' weight-gradient convs
  all-gathered (B, tokens, C) activations in every head (checked in the compiled HLO)."""
  import re
  import jax.numpy as jnp
  from rae_jax.models import partitioning
  from rae_jax.train import mesh as mesh_lib
  from rae_jax.train import state as state_lib
  batch = 40  # 5 per device, distinct from every width and token count
  c = tiny_config(lpips_dir, N_STEPS)
  c.stage1.global_batch_size = batch
  c.data.synthetic_size = 4 * batch
  c.decoder.scan_layers = c.decoder.remat = scan

  def gathered():
    rae, parts, frozen, abstract, shardings, mesh = _sharded_setup(c, lpips_dir)
    rep = mesh_lib.replicated(mesh)
    frozen_sh = jax.tree.map(lambda _: rep, frozen)
    step = stage1.make_step(c, rae, parts, shardings, mesh, frozen_sh)
    size = c.data.image_size
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8,
                                  sharding=mesh_lib.batch_sharding(mesh))
    fro = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                       frozen, frozen_sh)
    hlo = step.for_phase((True, True, True)).lower(
        state_lib.abstract_state(abstract, shardings), {"image": images}, fro, None).compile(
            compiler_options={"xla_backend_optimization_level": 0}).as_text()
    types = re.findall(r"= (\w+\[([\d,]*)\])\S* all-gather(?:-start)?\(", hlo)
    return [t for t, dims in types if dims.split(",")[0] == str(batch)]

  assert gathered() == []
  saved = partitioning.BATCH_AXES  # negative control: without the pins the heads gather the batch
  partitioning.BATCH_AXES = ("no_such_axis",)
  try:
    assert gathered()
  finally:
    partitioning.BATCH_AXES = saved


def test_memory_check_at_start_names_the_fields(lpips_dir):
  """The generator update's estimate (decoder + L1 + LPIPS + GAN term) passes with room and
  fails, before anything compiles, naming the fields that reduce it."""
  c = tiny_config(lpips_dir, N_STEPS)
  rae, parts, frozen, abstract, shardings, mesh = _sharded_setup(c, lpips_dir)
  est = stage1.check_step_memory(c, rae, parts, abstract, shardings, frozen, mesh, limit=2**34)
  assert 0 < est["activations"] < est["total"] < 2**34
  with pytest.raises(MemoryError, match="decoder.remat"):
    stage1.check_step_memory(c, rae, parts, abstract, shardings, frozen, mesh,
                             limit=est["total"])


@pytest.mark.parametrize("gan", [False, True])
def test_grad_accum_two_half_batches_equal_the_full_batch(lpips_dir, gan):
  """stage1.grad_accum_steps=2 with the same draws as one full batch: the same update within
  float32 rounding (every phase term on; with the GAN, the adaptive weight comes from the whole
  batch's last-layer gradients, and the D update runs once on the whole batch). The decoder's
  optimizer is plain SGD here, so its new weights are the gradient itself (AdamW's first step is
  the gradient's sign, which rounding flips where a gradient is ~0)."""
  import dataclasses
  import optax
  from rae_jax.pipeline import builders
  from rae_jax.train import mesh as mesh_lib
  from rae_jax.train import state as state_lib
  c = tiny_config(lpips_dir, N_STEPS)
  c.stage1.loss.lpips_start = c.stage1.loss.disc_start = c.stage1.loss.disc_upd_start = 0.0
  c.stage1.disc.enabled = gan
  rae, rae_vars = builders.build_rae(c, "", with_stats=False)
  parts = stage1.build_parts(c, c.data.synthetic_size)
  parts.sched = dataclasses.replace(parts.sched, tx=optax.sgd(1.0))
  key = jax.random.PRNGKey(0)
  frozen = {"encoder": rae_vars["encoder"], "lpips": stage1.load_lpips_folder(lpips_dir)}
  extra = {}
  if gan:
    frozen["dino"] = stage1.frozen_dino_params(parts.disc, c.stage1.disc, key)
    extra = stage1.disc_extra_init(parts.disc, parts.disc_sched.tx)(key)
  mesh = mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])
  rep = mesh_lib.replicated(mesh)
  frozen = jax.device_put(frozen, rep)
  b = c.stage1.global_batch_size
  images = np.random.default_rng(0).integers(0, 256, (b, 16, 16, 3), dtype=np.uint8)
  batch = jax.device_put({"image": images}, mesh_lib.batch_sharding(mesh))
  h, w, ch = rae.latent_shape
  draws = stage1.draw_stage1(jax.random.PRNGKey(3), b, (h * w, ch), parts.settings.disc_updates)
  out = []
  for accum in (1, 2):
    c.stage1.grad_accum_steps = accum
    state = host(state_lib.create_train_state(rae.init_decoder(key), parts.sched.tx, key, extra))
    shardings = state_lib.state_shardings(jax.eval_shape(lambda: state), mesh)
    step = stage1.make_step(c, rae, parts, shardings, mesh, jax.tree.map(lambda _: rep, frozen))
    new, metrics = step(jax.device_put(state, shardings), batch, frozen, draws)
    out.append((host(metrics), host(new)))
  (m1, s1), (m2, s2) = out
  assert set(m1) == set(m2) and ({"g_loss", "d_weight", "d_loss"} <= set(m1)) == gan, sorted(m1)
  for k in m1:
    np.testing.assert_allclose(m2[k], m1[k], rtol=2e-6, atol=1e-7, err_msg=k)
  init = host(rae.init_decoder(jax.random.PRNGKey(0)))
  grads1, grads2 = (jax.tree.map(np.subtract, init, s.params) for s in (s1, s2))
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads1))
  for g1, g2 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads2)):
    np.testing.assert_allclose(g2, g1, rtol=1e-5, atol=1e-6 * scale)
  for e1, e2 in zip(jax.tree.leaves(s1.extra), jax.tree.leaves(s2.extra)):  # the D update
    np.testing.assert_allclose(e2, e1, rtol=1e-5, atol=1e-6)


def test_lpips_weights_folder_on_gcs(lpips_dir, gcs):
  """config.stage1.loss.lpips_weights on gs://: the same params as from the local folder."""
  from rae_jax import storage
  remote = gcs.url(f"lpips-{os.getpid()}")
  storage.copy_tree(lpips_dir, remote)
  local, got = stage1.load_lpips_folder(lpips_dir), stage1.load_lpips_folder(remote)
  assert jax.tree.all(jax.tree.map(np.array_equal, local, got))
  with pytest.raises(ConfigError, match="is not a folder"):
    stage1.load_lpips_folder(remote + "-missing")
