"""Pod-scale correctness on forced host devices: what only shows at scale, checked on
shardings, compiled HLO and memory of small models that take the same code paths."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from rae_jax.models.decoder import ViTDecoder
from rae_jax.models.ditdh import DiTDH
from rae_jax.train import mesh as mesh_lib
from rae_jax.train import sharding as sharding_lib
from rae_jax.train import state as state_lib


def _ditdh_xl_shapes():
  m = DiTDH(input_size=16, in_channels=768)  # official XL geometry, shapes only
  return jax.eval_shape(lambda k: m.init(k, jnp.zeros((1, 16, 16, 768)), jnp.zeros((1,)),
                                         jnp.zeros((1,), jnp.int32))['params'],
                        jax.random.PRNGKey(0))


def _decoder_xl_shapes():
  d = ViTDecoder(hidden_size=768, decoder_hidden_size=1152, decoder_num_hidden_layers=28,
                 decoder_num_attention_heads=16, decoder_intermediate_size=4096)
  return jax.eval_shape(lambda k: d.init(k, jnp.zeros((1, 256, 768)))['params'],
                        jax.random.PRNGKey(0))


# ------------------------------------------------------------------ item 2: no silent replication
@pytest.mark.parametrize('devices', [64, 256])
def test_default_mesh_shards_xl_models(devices):
  """The default mesh at 64 / 256 devices leaves < 1% of DiTDH-XL and the ViT-XL decoder whole;
  all devices on fsdp (the old default) left 18% / 36% replicated at 256."""
  data, fsdp = mesh_lib.mesh_shape(devices, -1, -1)
  assert data * fsdp == devices and fsdp <= mesh_lib.MAX_FSDP
  assert (data, fsdp) == {64: (1, 64), 256: (4, 64)}[devices]
  mesh = AbstractMesh((data, fsdp), mesh_lib.MESH_AXES)
  for shapes in (_ditdh_xl_shapes(), _decoder_xl_shapes()):
    report = sharding_lib.replication_report(
        shapes, sharding_lib.fsdp_shardings(shapes, mesh, min_size=1024))
    assert report['replicated_fraction'] < 0.01, report['largest_replicated']
    assert report['per_device_bytes'] < 1.02 * report['total_bytes'] / fsdp
  if devices == 256:  # the old all-on-fsdp default: reported, not hidden
    flat = AbstractMesh((1, 256), mesh_lib.MESH_AXES)
    shapes = _ditdh_xl_shapes()
    report = sharding_lib.replication_report(shapes, sharding_lib.fsdp_shardings(shapes, flat))
    assert 0.15 < report['replicated_fraction'] < 0.25
    assert 'qkv' in report['largest_replicated'][0][1]
    assert sharding_lib.auto_fsdp_size(256, shapes, max_fsdp=256) == 128


def test_replication_is_logged_and_warned(caplog):
  shapes = {'w': jax.ShapeDtypeStruct((1152, 9), jnp.float32),
            'v': jax.ShapeDtypeStruct((64, 64), jnp.float32)}
  mesh = AbstractMesh((1, 8), mesh_lib.MESH_AXES)
  with caplog.at_level('INFO'):
    r = sharding_lib.log_replication('toy', shapes, sharding_lib.fsdp_shardings(shapes, mesh))
  assert r['replicated_bytes'] == 0 and r['per_device_bytes'] == (1152 * 9 + 64 * 64) * 4 // 8
  shapes['odd'] = jax.ShapeDtypeStruct((700, 9), jnp.float32)
  with caplog.at_level('INFO'):
    r = sharding_lib.log_replication('toy', shapes, sharding_lib.fsdp_shardings(shapes, mesh),
                                     warn_bytes=0)
  assert r['replicated_bytes'] == 700 * 9 * 4
  assert any(rec.levelname == 'WARNING' and "['odd']" in rec.getMessage() for rec in caplog.records)


class _FakeTpu:
  """Stand-in device with a slice index (multi-slice jobs); enough for mesh construction."""
  platform = 'fake'
  device_kind = 'fake'

  def __init__(self, i, slice_index):
    self.id, self.slice_index, self.process_index = i, slice_index, i // 4

  def __repr__(self):
    return f'Fake({self.id}, slice {self.slice_index})'


def test_multislice_mesh_keeps_fsdp_inside_a_slice():
  devices = [_FakeTpu(i, i // 8) for i in range(32)]  # 4 slices x 8 devices
  assert mesh_lib.num_slices(devices) == 4
  grid = mesh_lib.make_mesh(-1, -1, devices=devices).devices
  assert grid.shape == (4, 8)
  for row in grid:  # every fsdp group is one slice; data spans the slices
    assert len({d.slice_index for d in row}) == 1
  assert len({d.slice_index for d in grid[:, 0]}) == 4
  with pytest.raises(ValueError, match='fsdp stays on ICI'):
    mesh_lib.make_mesh(2, 16, devices=devices)


# ------------------------------------------------------------------ item 1: no closed-over weights
def _program_bytes(init, args):
  # The lowered StableHLO, not the compiled HLO: it prints every constant in full (the compiled
  # text elides large literals as {...}) and does not depend on the CPU backend's passes.
  return len(init.lower(*args).as_text())


def test_imported_weights_are_arguments_not_constants():
  """The init program does not grow with imported weights. Bound, not a measured size: a
  closed-over (512, 512) float32 array of distinct values prints as a dense hex literal of
  8 * 512^2 = 2 MiB characters, so the 512-wide program would exceed 200_000 characters and
  1.5x the 64-wide one (with the weights as arguments both are ~2.6k; the negative control at the
  end closes the same weights over)."""
  mesh = mesh_lib.make_mesh(1, -1)
  tx = optax.adamw(1e-3)
  sizes = {}
  for width in (64, 512):  # 16 KiB vs 1 MiB of weights
    # Distinct values: a splat constant (np.full) would print as one number even closed over.
    params = {'w': np.random.default_rng(width).standard_normal((width, width), np.float32),
              'b': np.linspace(0, 1, width, dtype=np.float32)}
    init, args, shardings = state_lib.init_program(None, tx, jax.random.PRNGKey(0),
                                                   jax.random.PRNGKey(1), mesh, params=params)
    sizes[width] = _program_bytes(init, args)
    state = init(*args)
    np.testing.assert_array_equal(np.asarray(state.params['w']), params['w'])
    np.testing.assert_array_equal(np.asarray(state.ema_params['b']), params['b'])
    assert state.params['w'].sharding.spec == P('fsdp', None)
  assert sizes[512] < 1.5 * sizes[64] < 200_000, sizes
  closed = jax.jit(lambda k: state_lib.create_train_state(params, tx, k))  # negative control
  assert _program_bytes(closed, (jax.random.PRNGKey(1),)) > 8 * 512 ** 2
  with pytest.raises(ValueError, match='exactly one'):
    state_lib.init_program(lambda k: params, tx, jax.random.PRNGKey(0), jax.random.PRNGKey(1),
                           mesh, params=params)


# ------------------------------------------------------------------ item 3: activation shardings
def _compiled_step_text(model, batch_size, mesh):
  import train_worker as tw
  from rae_jax.train import optim, step as step_lib
  tx = optim.make_optimizer(1e-3, clip_grad=1.0)
  init = tw.init_params_fn(model)
  abstract = jax.eval_shape(
      lambda k: state_lib.create_train_state(init(k), tx, jax.random.PRNGKey(1)),
      jax.random.PRNGKey(0))
  shardings = state_lib.state_shardings(abstract, mesh, min_size=256)
  bsh = mesh_lib.batch_sharding(mesh)
  batch = {'latent': jax.ShapeDtypeStruct((batch_size,) + tw.LATENT, jnp.float32, sharding=bsh),
           'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=bsh)}
  step = step_lib.make_train_step(tw.make_loss_fn(model), tx, 0.9, shardings, bsh)
  lowered = step.lower(state_lib.abstract_state(abstract, shardings), batch)
  # SPMD partitioning (where the collectives come from) does not depend on the backend level.
  return lowered.compile(compiler_options={'xla_backend_optimization_level': 0}).as_text()


def _gathered_activations(hlo: str, batch_size: int) -> list[str]:
  """Result types of all-gathers that assemble anything of the global batch: (B, N, D)
  activations, but also (B, D) conditioning and (B,) labels / timesteps."""
  out = []
  for m in re.finditer(r'= (\w+\[([\d,]*)\])\S* all-gather(?:-start)?\(', hlo):
    dims = [int(d) for d in m.group(2).split(',') if d]
    if dims and dims[0] == batch_size:
      out.append(m.group(1))
  return out


def _tiny_lightning(**kw):
  import train_worker as tw
  from rae_jax.models.lightning_dit import LightningDiT
  return LightningDiT(input_size=4, patch_size=1, in_channels=tw.LATENT[-1], hidden_size=48,
                      depth=2, num_heads=2, class_dropout_prob=0.1, num_classes=tw.NUM_CLASSES,
                      **kw)


@pytest.mark.parametrize('family', ['ditdh', 'lightning'])
def test_scanned_blocks_keep_activations_batch_sharded(family):
  """Without pins, scan_layers=True all-gathers (B, N, D) activations of the global batch in
  every block, and the per-sample conditioning (labels, t embedding, adaLN input) too;
  the models' sharding constraints keep everything of the batch split (checked in the compiled
  HLO of the whole train step, forward and backward)."""
  import train_worker as tw
  batch = 40  # distinct from every width, so a leading 40 is the batch
  mesh = mesh_lib.make_mesh(1, 8)
  build = ((lambda: tw.tiny_model(scan_layers=True, hidden_size=(48, 64), depth=(2, 1)))
           if family == 'ditdh' else (lambda: _tiny_lightning(scan_layers=True)))
  gathered = _gathered_activations(_compiled_step_text(build(), batch, mesh), batch)
  assert gathered == [], gathered
  # The check does see such gathers: the same scanned model without the mesh context (no
  # constraints) gathers them.
  from rae_jax.models import partitioning
  saved = partitioning.BATCH_AXES
  partitioning.BATCH_AXES = ('no_such_axis',)
  try:
    assert _gathered_activations(_compiled_step_text(build(), batch, mesh), batch)
  finally:
    partitioning.BATCH_AXES = saved


# ------------------------------------------------------------------ item 4: remat policies
# Remat does not change the math; the CPU backend's optimisation level does not matter for that.
FAST_COMPILE = {'xla_backend_optimization_level': 0}
COMPILED_POLICIES = {'ditdh': ('nothing_saveable', 'save_attention_out'),
                     'lightning': (), 'decoder': ('save_attention_out',)}


def _fast_jit(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def test_remat_policies_keep_the_math_and_trade_memory():
  """Remat policies give the same gradients as no remat (DiTDH, decoder); the saved-activation
  estimate falls from no remat to nothing_saveable for every block stack."""
  from rae_jax.models import layers
  from rae_jax.models.lightning_dit import LightningDiT
  from rae_jax.train import memory
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8))
  t, y = jnp.array([0.3, 0.7]), jnp.array([1, 2])
  models = {
      'ditdh': (DiTDH(input_size=4, in_channels=8, hidden_size=(32, 48), depth=(1, 1),
                      num_heads=(2, 2), num_classes=4, scan_layers=True),
                lambda m, p: jnp.sum(m.apply({'params': p}, x, t, y) ** 2)),
      'lightning': (LightningDiT(input_size=4, in_channels=8, hidden_size=32, depth=1,
                                 num_heads=2, num_classes=4),
                    lambda m, p: jnp.sum(m.apply({'params': p}, x, t, y) ** 2)),
      'decoder': (ViTDecoder(hidden_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                             decoder_num_attention_heads=2, decoder_intermediate_size=64,
                             patch_size=2, num_patches=16),
                  lambda m, p: jnp.sum(m.apply({'params': p}, x.reshape(2, 16, 8)) ** 2)),
  }
  for name, (model, loss) in models.items():
    inputs = (x.reshape(2, 16, 8),) if name == 'decoder' else (x, t, y)
    params = model.init(jax.random.PRNGKey(1), *inputs)['params']
    # Zero-initialised adaLN / output layers would make every gradient zero: perturb them.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    params = jax.tree.unflatten(tree, [v + 0.05 * jax.random.normal(k, v.shape)
                                       for v, k in zip(leaves, keys)])
    if COMPILED_POLICIES[name]:
      ref = _fast_jit(jax.grad(lambda p: loss(model, p)), params)(params)
    saved = {}
    for policy in (None, 'nothing_saveable', 'save_attention_out', 'dots_saveable'):
      m = model if policy is None else model.clone(remat=True, remat_policy=policy)
      saved[policy] = memory.residual_bytes(lambda p: loss(m, p), params)  # tracing only
      if policy not in COMPILED_POLICIES[name]:
        continue  # LightningDiT shares DiTDH's block stack; compile time is precious
      g = _fast_jit(jax.grad(lambda p: loss(m, p)), params)(params)
      # Leaf-wise against the largest gradient: some (attention key biases) are exactly zero
      # in theory and only float noise in practice.
      scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(ref))
      errs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / scale
              for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref))]
      assert max(errs) < 1e-5, (name, policy, max(errs))
    assert saved['nothing_saveable'] < saved['save_attention_out'] < saved[None], (name, saved)
    assert saved['dots_saveable'] < saved[None], (name, saved)
  with pytest.raises(ValueError, match='remat_policy'):
    layers.remat_policy('everything')


@pytest.mark.parametrize('family', ['decoder', 'ditdh'])
def test_remat_bounds_compiled_memory_only_in_a_scanned_stack(family):
  """What the compiler makes of remat (memory_analysis of the compiled gradient): in a scanned
  stack nothing_saveable cuts the temporaries several-fold; unrolled, the compiler is free to
  schedule every layer's recomputation early and here it keeps everything. Hence the pod
  recipes scan their block stacks (decoder.scan_layers, model.scan_layers).

  The 0.5: without remat the backward pass keeps every layer's residuals, L * W (W: one layer's
  saved activations, tens of (B, N, D) buffers: qkv, attention probabilities, the 4x MLP
  hidden); scanned with nothing_saveable it keeps one (B, N, D) carry per layer plus one
  layer's working set while recomputing, ~L + W. The ratio ~1/W + 1/L is < 0.5 for L = 5, 6
  (measured 0.24 decoder, 0.27 DiTDH). These sizes come from buffer assignment on the
  optimised HLO, before code generation: bit-identical byte counts with XLA_FLAGS=
  --xla_cpu_max_isa=AVX2 and =AVX, so the CPU's vector ISA does not move them."""
  if family == 'decoder':
    base = ViTDecoder(hidden_size=16, decoder_hidden_size=64, decoder_num_hidden_layers=6,
                      decoder_num_attention_heads=2, decoder_intermediate_size=256,
                      patch_size=2, num_patches=64)
    inputs = (jnp.zeros((8, 64, 16)),)
  else:
    base = DiTDH(input_size=8, in_channels=16, hidden_size=(64, 64), depth=(5, 1),
                 num_heads=(2, 2), num_classes=4)
    inputs = (jnp.zeros((8, 8, 8, 16)), jnp.zeros((8,)), jnp.zeros((8,), jnp.int32))
  temp = {}
  for scan in (False, True):
    for remat in (False, True):
      m = base.clone(scan_layers=scan, remat=remat, remat_policy='nothing_saveable')
      p = jax.eval_shape(lambda k, m=m: m.init(k, *inputs)['params'], jax.random.PRNGKey(0))
      grad = jax.grad(lambda p, m=m: jnp.sum(m.apply({'params': p}, *inputs) ** 2))
      temp[scan, remat] = jax.jit(grad).lower(p).compile().memory_analysis().temp_size_in_bytes
  assert temp[True, True] < 0.5 * min(temp[True, False], temp[False, True]), temp


def test_memory_check_fails_before_compiling_with_the_fields_to_change():
  from rae_jax.train import memory
  mesh = mesh_lib.make_mesh(1, 8)
  shapes = {'w': jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
  tx = optax.adam(1e-3)
  abstract = jax.eval_shape(lambda: state_lib.create_train_state(
      {'w': jnp.zeros((1024, 1024))}, tx, jax.random.PRNGKey(0)))
  shardings = state_lib.state_shardings(abstract, mesh)
  est = memory.estimate(abstract, shardings, activation_bytes_global=64 * 2**20, batch_shards=8)
  # params + EMA + 2 moments + grads, 4 MiB each, split 8 ways; 8 MiB of activations per device
  # (+16: step, rng key and Adam's count, replicated)
  assert est['state'] == 4 * 2**22 // 8 + 16 and est['grads'] == 2**22 // 8
  assert est['activations'] == 8 * 2**20
  memory.check_fits(est, None)  # unknown limit (CPU): no check
  memory.check_fits(est, 2**30)
  with pytest.raises(MemoryError, match=r'saved activations 0\.01 GiB.*remat_policy'):
    memory.check_fits(est, 8 * 2**20)
  del shapes


def test_memory_plan_picks_the_least_recompute_policy_that_fits():
  """The plan walks RECOMPUTE_ORDER (remat off first) and the
  pod recipes default to remat with the policy their docstring's plan chose for 16 GiB chips."""
  import importlib.util
  import os
  from rae_jax.models import layers
  from rae_jax.train import memory
  gib = 2 ** 30
  totals = {None: 20 * gib, 'dots_saveable': 12 * gib, 'save_attention_out': 4 * gib,
            'nothing_saveable': 3 * gib}
  assert memory.least_recompute(totals, 32 * gib) == 'remat off'
  assert memory.least_recompute(totals, 16 * gib) == 'dots_saveable'
  assert memory.least_recompute(totals, 8 * gib) == 'save_attention_out'
  assert memory.least_recompute(totals, 2 * gib) == 'none fits'
  assert set(memory.RECOMPUTE_ORDER[1:]) == set(layers.REMAT_POLICIES)
  # Frozen weights passed as arguments are excluded like the params (counted separately).
  w, frozen = jnp.ones((8, 8)), jnp.ones((8, 3))
  fn = lambda p, f, x: jnp.sum(jnp.tanh(x @ p) @ f)  # noqa: E731  (the pullback keeps f)
  x = jnp.ones((4, 8))
  assert (memory.residual_bytes(fn, w, frozen, x, exclude=frozen) <
          memory.residual_bytes(fn, w, frozen, x))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for name, section, policy in (('stage2_ditdh_xl_256', 'model', 'dots_saveable'),
                                ('stage2_ditdh_xl_512', 'model', 'save_attention_out'),
                                ('stage1_dinov2b_decxl_256', 'decoder', 'dots_saveable')):
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, 'configs', name + '.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()[section]
    assert c.remat and c.remat_policy == policy, name
    assert f'remat_policy="{policy}"' in mod.__doc__ and 'least recompute' in mod.__doc__, name


# ------------------------------------------------------------------ items 5 and 10: eval sampling
def _toy_generate(params, guide_params, rae_vars, labels, indices, seed_key):
  """Images that are a pure function of (index, label): enough to check layout and order."""
  del guide_params, rae_vars, seed_key
  v = (indices.astype(jnp.float32) * 0.01 + labels.astype(jnp.float32) * 0.1) % 1.0
  return jnp.broadcast_to(v[:, None, None, None] * params['gain'], (v.shape[0], 4, 4, 3))


def test_sampler_output_stays_batch_sharded():
  from rae_jax.eval import sample_shards
  mesh = mesh_lib.make_mesh(1, 8)
  sampler = sample_shards.ShardedSampler(_toy_generate, mesh, per_device_batch=2)
  params = {'gain': jnp.ones(())}
  labels, idx = np.arange(13, dtype=np.int32) % 3, np.arange(100, 113, dtype=np.int32)
  out = sampler.sharded(params, None, {}, labels, idx, jax.random.PRNGKey(0))
  assert out.shape == (16, 4, 4, 3) and out.dtype == jnp.uint8
  assert out.sharding.spec == P(('data', 'fsdp')) and not out.sharding.is_fully_replicated
  assert {s.data.shape[0] for s in out.addressable_shards} == {2}  # 2 images per device
  hlo = sampler._fn.lower(params, None, {}, jnp.zeros(16, jnp.int32), jnp.zeros(16, jnp.int32),
                          jax.random.PRNGKey(0)).compile().as_text()
  assert 'all-gather' not in hlo
  host = sampler(params, None, {}, labels, idx, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(host, np.asarray(out)[:13])
  with pytest.raises(ValueError, match='1..16 samples'):
    sampler.sharded(params, None, {}, np.zeros(17, np.int32), np.zeros(17, np.int32), None)


@pytest.mark.parametrize('guidance', ['cfg', 'autoguidance'])
def test_guided_sampling_moves_nothing_between_devices(guidance):
  """The real generate (scanned DiTDH, 3 Euler steps with guidance, RAE decode) compiled for a
  batch-sharded global batch on 8 devices has no collective at all: CFG pairs each sample's
  cond / null rows on its own device ([cond; null] concatenation permuted half of every
  device's activations at every step)."""
  import importlib.util
  from conftest import REPO
  from rae_jax.pipeline import builders, image_generator
  spec = importlib.util.spec_from_file_location('demo_config', REPO / 'configs' / 'demo.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.scan_layers = True
  c.guidance.method, c.guidance.scale, c.sampler.num_steps = guidance, 1.5, 3
  model = builders.build_stage2_model(c.model, jnp.float32)
  rae, rae_vars = builders.build_rae(c, '', with_stats=False)
  guide = model if guidance == 'autoguidance' else None
  gen = image_generator.make_generate(c, model, rae, image_generator.transport_for(c, rae.latent_shape),
                               guide_model=guide)
  params = jax.eval_shape(lambda k: builders.init_stage2_params(model, rae.latent_shape, k),
                          jax.random.PRNGKey(0))
  mesh = mesh_lib.make_mesh(1, 8)
  rep, bsh = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
  fn = jax.jit(gen, in_shardings=(rep, rep, rep, bsh, bsh, rep), out_shardings=bsh)
  sds = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)  # noqa: E731
  ids = jax.ShapeDtypeStruct((40,), jnp.int32)
  hlo = fn.lower(sds(params), sds(params) if guide else None, sds(rae_vars), ids, ids,
                 jax.random.PRNGKey(0)).compile().as_text()
  found = re.findall(r'(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)'
                     r'(?:-start)?\(', hlo)
  assert found == [], sorted(set(found))


def test_latent_cache_encodes_images_and_mirrors_in_place():
  """The latent-cache pass encodes each image and its mirror on the device that holds it: no
  collective in the compiled encoder pass over a batch-sharded global batch."""
  import importlib.util
  from conftest import REPO
  from rae_jax.pipeline import builders, latents
  spec = importlib.util.spec_from_file_location('demo_config', REPO / 'configs' / 'demo.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  rae, rae_vars = builders.build_rae(c, '', with_stats=False)
  mesh = mesh_lib.make_mesh(1, 8)
  size = c.data.image_size
  images = np.random.default_rng(0).random((16, size, size, 3), np.float32)
  fn = latents.encode_with_mirrors(rae, mesh)
  x = jax.device_put(images, mesh_lib.batch_sharding(mesh))
  enc = jax.device_put(rae_vars['encoder'], mesh_lib.replicated(mesh))
  z = fn(enc, x)
  assert {s.data.shape[0] for s in z.addressable_shards} == {2}  # 2 images per device
  hlo = fn.lower(enc, x).compile().as_text()
  found = re.findall(r'(all-gather|all-to-all|collective-permute|all-reduce)(?:-start)?\(', hlo)
  assert found == [], sorted(set(found))
  ref = rae.encode(rae_vars, np.concatenate([images, images[:, :, ::-1]]))
  np.testing.assert_allclose(np.asarray(z), np.stack([ref[:16], ref[16:]], 1), rtol=1e-5,
                             atol=1e-5)


def test_eval_batches_span_shards(tmp_path):
  """Work = N rounded up to one global batch (not every shard padded to whole batches); shard
  files are identical to shard-by-shard generation and resume skips finished shards."""
  from rae_jax.eval import sample_shards
  mesh = mesh_lib.make_mesh(1, 8)
  sampler = sample_shards.ShardedSampler(_toy_generate, mesh, per_device_batch=1)  # batch 8
  bound = sample_shards.bind(sampler, {'gain': jnp.ones(())}, None, {}, jax.random.PRNGKey(0))
  calls = []

  def counting(y, i):
    calls.append(len(i))
    return bound(y, i)
  counting.global_batch = bound.global_batch
  labels = np.arange(30, dtype=np.int32) % 4
  paths = sample_shards.generate_shards(counting, labels, str(tmp_path / 'a'), 7)
  assert calls == [8, 8, 8, 6]  # 30 samples, 4 calls; per shard it was 5 shards x 8 = 40
  per_shard = sample_shards.generate_shards(bound, labels, str(tmp_path / 'b'), 7, batch_size=7)
  for p, q in zip(paths, per_shard):
    with np.load(p) as x, np.load(q) as y:
      for k in ('arr_0', 'arr_1', 'indices'):
        np.testing.assert_array_equal(x[k], y[k])

  class Preempted(Exception):
    pass

  def stop(i, path):
    if i == 2:
      raise Preempted
  calls.clear()
  with pytest.raises(Preempted):
    sample_shards.generate_shards(counting, labels, str(tmp_path / 'c'), 7, on_shard=stop)
  calls.clear()
  resumed = sample_shards.generate_shards(counting, labels, str(tmp_path / 'c'), 7)
  assert calls == [8, 1]  # shards 3, 4 (samples 21..29) only
  for p, q in zip(resumed, paths):
    with np.load(p) as x, np.load(q) as y:
      np.testing.assert_array_equal(x['arr_0'], y['arr_0'])


# ------------------------------------------------------------------ item 6: the RAE is not replicated
def test_stage2_rae_weights_are_fsdp_sharded(tmp_path):
  import importlib.util
  from conftest import REPO
  from rae_jax.pipeline import loaders
  spec = importlib.util.spec_from_file_location('demo', REPO / 'configs' / 'demo.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  mesh = mesh_lib.make_mesh(1, 8)
  rae, variables = loaders.load_inference_rae(config, str(tmp_path), mesh)
  for part in ('encoder', 'decoder'):
    leaves = jax.tree.leaves(variables[part])
    big = max(leaves, key=lambda x: x.size)
    assert 'fsdp' in tuple(big.sharding.spec), (part, big.shape, big.sharding)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables[part])
    report = sharding_lib.replication_report(shapes, jax.tree.map(lambda x: x.sharding,
                                                                  variables[part]))
    assert report['per_device_bytes'] < 0.5 * report['total_bytes'], (part, report)
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(variables.get('stats', {})))


# ------------------------------------------------------------------ item 9: bytes on the wire
def test_uint8_images_convert_on_device_exactly_as_on_host():
  from rae_jax.data import pipeline as data_pipeline
  from rae_jax.data.transforms import to_unit_float
  from rae_jax.train import step as step_lib

  class Images:
    kind = 'image'

    def __len__(self):
      return 16

    def __getitem__(self, i):
      return np.random.default_rng(i).integers(0, 256, (6, 6, 3), dtype=np.uint8), i % 3
  kw = dict(seed=1, process_index=0, process_count=1, prefetch=0)
  with data_pipeline.DataIterator(Images(), 8, image_dtype=np.uint8, **kw) as it:
    raw = next(it)
  with data_pipeline.DataIterator(Images(), 8, **kw) as it:
    ref = next(it)
  assert raw['image'].dtype == np.uint8 and raw['image'].nbytes * 4 == ref['image'].nbytes
  on_device = jax.jit(step_lib.images_to_unit_float)(raw)['image']
  np.testing.assert_array_equal(np.asarray(on_device), ref['image'])
  np.testing.assert_array_equal(np.asarray(on_device), to_unit_float(raw['image']))
  with pytest.raises(ValueError, match='image_dtype'):
    data_pipeline.DataIterator(Images(), 8, image_dtype=np.float16, **kw)


def test_float16_latent_cache_is_the_default_and_barely_moves_the_loss(tmp_path):
  """float16 halves the cache and the bytes to the device; the effect on the stage-2 loss of the
  tiny model is bounded, not fitted. float16 rounds each latent x (rms 3) by a relative <= 2^-11,
  rms 2^-11/sqrt(3) * 3 = 8.5e-4; the velocity target (noise - x) and x_t move by as much, so the
  residual e (rms ~ sqrt(1 + 9) = 3.2) moves by de with rms(de)/rms(e) ~ 2.7e-4. To first
  order dL/L = 2<e, de>/<e, e>: aligned signs (a systematic bias, e.g. truncation toward zero,
  which correlates de with x and so with e) give up to ~5e-4; independent rounding errors
  cancel over the N = 8*4*4*8 = 1024 elements to a standard deviation of
  2 * 2.7e-4 / sqrt(1024) = 1.7e-5. The bound 1e-4 is ~6 such deviations; measured 4e-6 (the
  same with XLA_FLAGS=--xla_cpu_max_isa=AVX2; float32 evaluation noise is ~1e-7, so the change
  is also well above 0)."""
  import train_worker as tw
  from rae_jax.data import DataIterator, LatentCacheSource, LatentCacheWriter
  rng = np.random.default_rng(0)
  lat = (rng.standard_normal((8, 2) + tw.LATENT) * 3.0).astype(np.float32)
  w = LatentCacheWriter(str(tmp_path))
  w.append(lat, np.arange(8) % tw.NUM_CLASSES, np.arange(8))
  src = LatentCacheSource(str(tmp_path))
  with DataIterator(src, 8, seed=0, process_index=0, process_count=1, prefetch=0,
                    train=False) as it:
    batch = next(it)
  assert batch['latent'].dtype == np.float16
  np.testing.assert_allclose(batch['latent'], lat[:, 0], rtol=2 ** -10)
  model = tw.tiny_model()
  params = tw.init_params_fn(model)(jax.random.PRNGKey(0))
  leaves, tree = jax.tree.flatten(params)  # away from the zero-initialised outputs
  params = jax.tree.unflatten(tree, [v + 0.02 * jax.random.normal(jax.random.PRNGKey(i), v.shape)
                                     for i, v in enumerate(leaves)])
  loss_fn = jax.jit(tw.make_loss_fn(model))
  labels = jnp.asarray(batch['label'])
  f32 = jnp.mean(loss_fn(params, {'latent': jnp.asarray(lat[:, 0]), 'label': labels},
                         jax.random.PRNGKey(3))[0])
  f16 = jnp.mean(loss_fn(params, {'latent': jnp.asarray(batch['latent'], jnp.float32),
                                  'label': labels}, jax.random.PRNGKey(3))[0])
  change = abs(float(f16) - float(f32)) / abs(float(f32))
  print(f'stage-2 loss float32 cache {float(f32):.7f}, float16 cache {float(f16):.7f}, '
        f'relative change {change:.1e}')
  assert 0 < change < 1e-4


def test_stage2_memory_check_names_the_fields(monkeypatch):
  """The check on the real stage-2 loss (tiny model): passes with room, fails with none."""
  import train_worker as tw
  from rae_jax.train import memory
  model = tw.tiny_model()
  init = tw.init_params_fn(model)
  tx = optax.adam(1e-3)
  abstract = jax.eval_shape(lambda k: state_lib.create_train_state(init(k), tx,
                                                                   jax.random.PRNGKey(1)),
                            jax.random.PRNGKey(0))
  mesh = mesh_lib.make_mesh(1, 8)
  shardings = state_lib.state_shardings(abstract, mesh)
  loss = tw.make_loss_fn(model)
  batch = {'latent': jax.ShapeDtypeStruct((16,) + tw.LATENT, jnp.float16),
           'label': jax.ShapeDtypeStruct((16,), jnp.int32)}

  def loss_fn(p, b, draws, frozen):
    del frozen
    return loss(p, dict(b, latent=b['latent'].astype(jnp.float32)), draws)
  est = memory.check_train_step(loss_fn, lambda k, b: k, abstract, shardings, batch, {},
                                batch_shards=8, limit=2**30)
  assert 0 < est['activations'] < est['total'] < 2**30
  with pytest.raises(MemoryError, match='grad_accum_steps'):
    memory.check_train_step(loss_fn, lambda k, b: k, abstract, shardings, batch, {},
                            batch_shards=8, limit=est['total'])
