"""Sharded stage-2 train step: same result on every mesh shape; sharding rule; optimizer math."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import rel_err
from jax.sharding import PartitionSpec as P

import train_worker as tw
from rae_jax.train import ema as ema_lib
from rae_jax.train import mesh as mesh_lib
from rae_jax.train import optim
from rae_jax.train import sharding as sharding_lib
from rae_jax.train import state as state_lib
from rae_jax.train import step as step_lib

# The tiny model's step takes ~3x longer to compile at the default CPU optimisation level; the
# comparison is between meshes, so every mesh is compiled the same way.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def test_fsdp_rule():
  assert sharding_lib.fsdp_spec((1152, 4608), 8) == P(None, 'fsdp')
  assert sharding_lib.fsdp_spec((4608, 1152), 8) == P('fsdp', None)
  assert sharding_lib.fsdp_spec((6, 64, 64), 8) == P(None, 'fsdp', None)  # tie -> first
  assert sharding_lib.fsdp_spec((7, 9), 8) == P()  # nothing divisible -> replicated
  assert sharding_lib.fsdp_spec((), 8) == P()
  assert sharding_lib.fsdp_spec((64,), 8, min_size=1024) == P()
  assert sharding_lib.fsdp_spec((64, 64), 1) == P()
  with pytest.raises(ValueError, match='mesh.data'):
    mesh_lib.mesh_shape(8, data=3)


def test_schedules_match_official_formula():
  spe = 7
  stage2 = optim.official_stage2_schedule(spe, warmup_epochs=2, decay_end_epoch=5)
  warm, end, ratio = 14, 35, 0.1
  for k in [0, 1, 13, 14, 15, 20, 34, 35, 36, 100]:
    if k < warm:
      f = 1.0  # official warmup_from_zero=False: constant base lr during "warmup"
    elif k >= end:
      f = ratio
    else:
      f = 1.0 - (1.0 - ratio) * (k - warm) / (end - warm)
    assert math.isclose(float(stage2(k)), 2e-4 * f, rel_tol=1e-6), k
  stage1 = optim.official_stage1_schedule(spe, warmup_epochs=1, decay_end_epoch=3)
  warm, end = 7, 21
  for k in [0, 3, 6, 7, 10, 20, 21, 50]:
    if k < warm:
      f = (k + 1) / warm
    elif k >= end:
      f = ratio
    else:
      f = ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * (k - warm) / (end - warm)))
    assert math.isclose(float(stage1(k)), 2e-4 * f, rel_tol=1e-6), k
  assert optim.steps_per_epoch(1_281_167, 1024) == 1251
  with pytest.raises(ValueError, match='smaller than one global batch'):
    optim.steps_per_epoch(10, 1024)


def test_clip_and_ema_match_torch_semantics():
  g = {'a': jnp.array([3.0, 4.0]), 'b': jnp.array([[12.0]])}  # global norm 13
  clipped, _ = optim.clip_by_global_norm_torch(1.0).update(g, None)
  scale = 1.0 / (13.0 + 1e-6)
  np.testing.assert_allclose(clipped['a'], np.array([3.0, 4.0]) * scale, rtol=1e-6)
  small, _ = optim.clip_by_global_norm_torch(100.0).update(g, None)
  np.testing.assert_array_equal(small['b'], g['b'])
  e = ema_lib.ema_update({'w': jnp.array([1.0, 2.0])}, {'w': jnp.array([3.0, -2.0])}, 0.75)
  np.testing.assert_allclose(e['w'], [1.5, 1.0], rtol=1e-7)


def test_gradient_accumulation_equals_big_batch():
  """accum_steps=4 averages micro-batch gradients: same update as one big batch."""
  mesh = mesh_lib.make_mesh(1, -1, devices=jax.devices()[:4])

  def loss_fn(params, batch, key):
    del key
    pred = jnp.tanh(batch['x'] @ params['w']) @ params['v']
    return jnp.mean((pred - batch['y']) ** 2, axis=-1), {}
  rng = np.random.default_rng(0)
  params = {'w': rng.standard_normal((6, 32)).astype(np.float32),
            'v': rng.standard_normal((32, 3)).astype(np.float32)}
  batch = {'x': rng.standard_normal((16, 6)).astype(np.float32),
           'y': rng.standard_normal((16, 3)).astype(np.float32)}
  tx = optim.make_optimizer(1e-2, clip_grad=0.5)
  out = []
  for accum in (1, 4):
    state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(0))
    shardings = state_lib.state_shardings(jax.eval_shape(lambda: state), mesh, min_size=0)
    state = jax.device_put(state, shardings)
    step = step_lib.make_train_step(loss_fn, tx, 0.5, shardings, mesh_lib.batch_sharding(mesh),
                                    accum)
    new, metrics = step(state, jax.device_put(batch, mesh_lib.batch_sharding(mesh)))
    out.append((jax.device_get(new), jax.device_get(metrics)))
  (a, ma), (b, mb) = out
  # Mean of 4 micro-batch means vs one mean of 16 positive per-example losses: two summation
  # orders differ by <= 2 * 15 * 2^-24 = 1.8e-6 relative (worst case, above the old 1e-6),
  # plus the per-example forwards batched as 4 vs 16 rows (dots of length 6 and 32, a few
  # float32 roundoffs each, doubled by the square): within the one-forward standard 1e-5
  # on any CPU (measured 1.1e-7, bit-identical with --xla_cpu_max_isa=AVX2).
  assert rel_err(mb['loss'], ma['loss']) < 1e-5
  assert rel_err(mb['grad_norm'], ma['grad_norm']) < 1e-5
  # Adam's first step is lr * g / |g| (bias-corrected, per element): the gradients' rounding
  # differences cancel except where |g| ~ eps, so the params agree far inside 1e-6 (1e-9).
  for x, y in zip(jax.tree.leaves(b.params), jax.tree.leaves(a.params)):
    assert rel_err(x, y) < 1e-6
  assert int(b.step) == 1 and int(b.opt_state[1][0].count) == 1


def test_same_step_on_every_mesh_shape():
  model = tw.tiny_model()
  schedule = optim.lr_schedule(1e-3, 1e-4, 1, 4)
  tx = optim.make_optimizer(schedule, clip_grad=1.0)
  init = jax.jit(lambda k: state_lib.create_train_state(tw.init_params_fn(model)(k), tx,
                                                        jax.random.PRNGKey(1)))
  host_state = jax.device_get(init(jax.random.PRNGKey(0)))
  batch_np = tw.global_batch_np(seed=0, step=0)
  loss_fn = tw.make_loss_fn(model)
  results = {}
  for shape in [None, (8, 1), (2, 4), (1, 8)]:
    if shape is None:
      mesh = mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])
    else:
      mesh = mesh_lib.make_mesh(*shape)
    shardings = state_lib.state_shardings(jax.eval_shape(lambda: host_state), mesh, min_size=256)
    state = jax.device_put(host_state, shardings)
    bsh = mesh_lib.batch_sharding(mesh)
    batch = mesh_lib.global_batch(mesh, batch_np, tw.GLOBAL_BATCH)
    step = step_lib.make_train_step(loss_fn, tx, 0.9, shardings, bsh, lr_schedule=schedule)
    compiled = step.lower(state, batch).compile(compiler_options=FAST_COMPILE)
    new, metrics = compiled(state, batch, None, None)  # (state, batch, frozen, draws)
    if shape is not None and shape[1] > 1:
      # A big parameter, its Adam moment and its EMA really are split over 'fsdp'.
      leaves = jax.tree_util.tree_leaves_with_path(new.params)
      path, big = max(leaves, key=lambda kv: kv[1].size)
      assert 'fsdp' in tuple(big.sharding.spec), (path, big.sharding)
      assert len({str(s.index) for s in big.addressable_shards}) == shape[1]
      ema_big = [v for p, v in jax.tree_util.tree_leaves_with_path(new.ema_params) if p == path]
      assert ema_big[0].sharding.spec == big.sharding.spec
      assert batch['latent'].sharding.spec == P(('data', 'fsdp'))
    results[shape] = (jax.device_get(new), jax.device_get(metrics))
  ref_state, ref_metrics = results[None]
  assert float(ref_metrics['lr']) == pytest.approx(1e-3)
  assert int(ref_state.step) == 1
  moved = sum(float(np.sum((np.asarray(a) - np.asarray(b)) ** 2)) for a, b in
              zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(host_state.params)))
  assert moved > 1e-8  # the step did update the parameters
  for shape, (st, m) in results.items():
    assert rel_err(m['loss'], ref_metrics['loss']) <= 1e-5, shape
    assert rel_err(m['grad_norm'], ref_metrics['grad_norm']) <= 1e-5, shape
    pairs = list(zip(jax.tree.leaves((st.params, st.ema_params)),
                     jax.tree.leaves((ref_state.params, ref_state.ema_params))))
    # Leaves that are still all zero (zero-initialised, no gradient yet) compare exactly.
    errs = [rel_err(a, b) if np.any(b) else float(np.max(np.abs(a))) for a, b in pairs]
    assert max(errs) <= 1e-5, (shape, max(errs))
    print(f'mesh {shape}: loss {float(m["loss"]):.7f}, max param/EMA rel err {max(errs):.2e}')


def test_process_batch_slice_single_process():
  mesh = mesh_lib.make_mesh(2, 4)
  assert mesh_lib.process_batch_slice(mesh, 16) == slice(0, 16)
  with pytest.raises(ValueError, match='not divisible'):
    mesh_lib.process_batch_slice(mesh, 12)
  assert mesh_lib.num_batch_shards(mesh) == 8
  assert optax.tree.norm({'a': jnp.ones(4)}) == 2.0
