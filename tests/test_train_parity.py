"""Training-step parity: replay K official optimizer steps with their recorded random draws.

The trajectories (tests/fixtures/reference/train{1_rae,2_ditdh}.*, see its README) come from the
official train.py / train_stage1.py loop bodies with every random draw stored. Each replay builds
its optimizer, schedules, EMA (and for stage 1 the discriminator, LPIPS and phase logic) from a
config through the builders main.py uses, loads the `init` weights with the PyTorch name maps, and
feeds the draws to the jitted step main.py runs. Bound: every per-step scalar and every final
tensor within max(1e-5, 10 x the official trainer's own 1-ulp sensitivity), relative.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import rel_err
from rae_jax import presets
from rae_jax.diffusion.transport import time_shift
from rae_jax.interop import ditdh_names
from rae_jax.pipeline import builders, common, generate, stage2
from rae_jax.train import mesh as mesh_lib
from rae_jax.train import state as state_lib

FLOOR = 1e-5
_MODULES = {"DiTwDDTHead": "DiTDH", "LightningDiT": "LightningDiT"}


def bound(sensitivity) -> float:
  s = float(sensitivity)
  return max(FLOOR, 10.0 * s) if np.isfinite(s) else FLOOR


def load_case(ref_dir, name):
  meta = json.loads((ref_dir / f"{name}.json").read_text())
  return meta, dict(np.load(ref_dir / f"{name}.npz"))


def nhwc(x):
  return np.ascontiguousarray(np.moveaxis(np.asarray(x), -3, -1))


def optim_from_official(training: dict, steps: int) -> "presets.mlc.ConfigDict":
  """The official `training` section (optimizer + scheduler + clip) as our optim config."""
  opt, sch = training["optimizer"], training["scheduler"]
  cfg = presets.optim(lr=sch.get("base_lr", opt["lr"]), final_lr=sch["final_lr"],
                      schedule=sch["type"], warmup_epochs=sch["warmup_epochs"],
                      decay_end_epoch=sch["decay_end_epoch"], epochs=1,
                      warmup_from_zero=sch["warmup_from_zero"], betas=opt["betas"],
                      weight_decay=opt["weight_decay"], eps=opt.get("eps", 1e-8),
                      clip_grad=training.get("clip_grad") or 0.0)
  cfg.num_steps = steps
  return cfg


# ----------------------------------------------------------------------------------------------
# Stage 2


def stage2_config(meta: dict):
  """Recipe config whose fields carry the trajectory's official settings."""
  official = meta["config"]
  name = _MODULES[meta["module"]]
  c = presets.base_config()
  model = presets.ditdh((1, 1), (1, 1), (1, 1)) if name == "DiTDH" else presets.lightning_dit()
  for k, v in official.items():
    model[k] = tuple(v) if isinstance(v, list) else v
  c.model = model
  c.transport = presets.mlc.ConfigDict(dict(
      c.transport.to_dict(), time_dist_type=meta.get("time_dist_type", "logit-normal_0_1"),
      shift_base=4096.0, shift_dim=4096.0 * float(meta["time_shift"]) ** 2))  # sqrt(dim / base)
  c.stage2.global_batch_size = meta["batch"]
  c.stage2.ema_decay = meta["training"]["ema_decay"]
  c.stage2.use_latent_cache = True
  c.stage2.optim = optim_from_official(meta["training"], meta["steps"])
  return c


def stage2_export(model, params):
  if isinstance(model, builders.DiTDH):
    return ditdh_names.ditdh_to_torch(params, model)
  return ditdh_names.lightning_dit_to_torch(params, model)


def stage2_import(model, sd):
  if isinstance(model, builders.DiTDH):
    return ditdh_names.ditdh_from_torch(sd, model)
  return ditdh_names.lightning_dit_from_torch(sd, model)


def replay_stage2(ref_dir, name="train2_ditdh", *, config_edit=None):
  """Runs the trajectory through stage2.make_step; returns (metrics per step, state, model)."""
  meta, d = load_case(ref_dir, name)
  config = stage2_config(meta)
  if config_edit is not None:
    config_edit(config)
  m = config.model
  model = builders.build_stage2_model(m)
  latent_shape = (m.input_size, m.input_size, m.in_channels)
  transport = generate.transport_for(config, latent_shape)
  k, b = meta["steps"], meta["batch"]
  sched = common.optimizer(config.stage2.optim, meta["steps_per_epoch"] * b, b)
  assert sched.steps_per_epoch == meta["steps_per_epoch"]

  mesh = mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])
  params = stage2_import(model, load_file(ref_dir / f"{name}.init.safetensors"))
  state = state_lib.create_train_state(params, sched.tx, jax.random.PRNGKey(0))
  shardings = state_lib.state_shardings(jax.eval_shape(lambda: state), mesh)
  state = jax.device_put(state, shardings)
  frozen = {"stats": {}}
  step = stage2.make_step(config, model, None, transport, sched, shardings, mesh,
                          from_cache=True, frozen_shardings=frozen, latent_shape=latent_shape)
  # The recorded times are the shifted logit-normal draws of the recorded u: our shift agrees.
  np.testing.assert_allclose(time_shift(jax.nn.sigmoid(d["u"]), transport.time_dist_shift),
                             d["t"], rtol=2e-6)
  metrics = []
  for i in range(k):
    batch = {"latent": nhwc(d["x1"][i]), "label": d["y"][i].astype(np.int32)}
    draws = {"t": d["t"][i], "noise": nhwc(d["x0"][i])}
    if model.class_dropout_prob > 0:
      draws["drop"] = d["drop"][i].astype(bool)
    state, out = step(state, jax.device_put(batch, mesh_lib.batch_sharding(mesh)), frozen,
                      draws=draws)
    metrics.append(jax.device_get(out))
  return meta, d, metrics, jax.device_get(state), model


def check_scalars(meta, d, metrics, names):
  sens = meta["ulp_sensitivity"]
  worst = {}
  for ours, theirs in names.items():
    for i, m in enumerate(metrics):
      ref = d[f"out_{theirs}"][i]
      if np.isnan(ref):
        continue
      err = abs(float(m[ours]) - ref) / max(abs(ref), 1e-30)
      assert err <= bound(sens[theirs][i]), (theirs, i, float(m[ours]), ref, err)
      worst[theirs] = max(worst.get(theirs, 0.0), err)
  return worst


def check_tensors(got: dict, ref: dict, sensitivity: float, what: str, keys=None):
  keys = sorted(ref) if keys is None else keys
  missing = [k for k in keys if k not in got]
  assert not missing, f"{what}: no tensor for {missing[:5]}"
  errs = {k: rel_err(got[k], ref[k]) if np.any(ref[k]) else float(np.abs(got[k]).max())
          for k in keys}
  key = max(errs, key=errs.get)
  assert errs[key] <= bound(sensitivity), (what, key, errs[key])
  return errs[key]


def test_stage2_ditdh_trajectory(ref_dir):
  meta, d, metrics, state, model = replay_stage2(ref_dir)
  worst = check_scalars(meta, d, metrics, {"loss": "loss", "grad_norm": "grad_norm", "lr": "lr"})
  sens = meta["ulp_sensitivity"]
  final = load_file(ref_dir / "train2_ditdh.final.safetensors")
  ema = load_file(ref_dir / "train2_ditdh.ema.safetensors")
  p_err = check_tensors(stage2_export(model, state.params), final, sens["params_worst_tensor"],
                        "final params")
  e_err = check_tensors(stage2_export(model, state.ema_params), ema, sens["ema_worst_tensor"],
                        "EMA")
  assert int(state.step) == meta["steps"]
  print(f"stage-2 replay: worst per-step {worst}, params {p_err:.2e}, EMA {e_err:.2e}")


@pytest.mark.parametrize("edit,what", [
    (lambda c: setattr(c.stage2, "ema_decay", c.stage2.ema_decay + 1e-3), "EMA decay + 1e-3"),
    (lambda c: setattr(c.stage2.optim, "warmup_from_zero", True), "schedule warm-up"),
])
def test_stage2_replay_detects_a_wrong_setting(ref_dir, edit, what):
  """The replay is sharp: a plausible misconfiguration breaks the bound."""
  with pytest.raises(AssertionError):
    meta, d, metrics, state, model = replay_stage2(ref_dir, config_edit=edit)
    check_scalars(meta, d, metrics, {"loss": "loss", "grad_norm": "grad_norm", "lr": "lr"})
    sens = meta["ulp_sensitivity"]
    check_tensors(stage2_export(model, state.ema_params),
                  load_file(ref_dir / "train2_ditdh.ema.safetensors"), sens["ema_worst_tensor"],
                  "EMA")
