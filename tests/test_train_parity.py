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
from rae_jax.pipeline import builders, common, image_generator, stage2
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
  model = builders.build_stage2_model(m, builders.compute_dtype(config))
  latent_shape = (m.input_size, m.input_size, m.in_channels)
  transport = image_generator.transport_for(config, latent_shape)
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


def rel(a, b) -> float:
  a, b = float(a), float(b)
  return abs(a - b) / max(abs(b), 1e-30)


def check_scalars(meta, d, metrics, names, own=None, inherited=None):
  """Per-step scalars within max(1e-5, 10 x sensitivity); `own` (metrics of our replay from
  1-ulp-perturbed init weights) adds our own floating-point sensitivity to the official one, and
  `inherited` ({name: per-step relative divergence}) what a scalar inherits from upstream."""
  sens = meta["ulp_sensitivity"]
  worst = {}
  for ours, theirs in names.items():
    for i, m in enumerate(metrics):
      ref = d[f"out_{theirs}"][i]
      if np.isnan(ref):
        continue
      s = max(float(sens[theirs][i]), rel(own[i][ours], m[ours]) if own else 0.0,
              (inherited or {}).get(theirs, [0.0] * len(metrics))[i])
      err = rel(m[ours], ref)
      assert err <= bound(s), (theirs, i, float(m[ours]), ref, err, s)
      worst[theirs] = max(worst.get(theirs, 0.0), err)
  return worst


def tensor_errors(got: dict, ref: dict) -> dict:
  missing = [k for k in ref if k not in got]
  assert not missing, f"no tensor for {missing[:5]}"
  return {k: rel_err(got[k], ref[k]) if np.any(ref[k]) else float(np.abs(got[k]).max())
          for k in ref}


def check_tensors(got: dict, ref: dict, sensitivity: float, what: str, own: dict = None):
  """Worst tensor within max(1e-5, 10 x sensitivity) (plus our own, from `own` tensors)."""
  errs = tensor_errors(got, ref)
  if own is not None:
    sensitivity = max(sensitivity, max(tensor_errors(own, got).values()))
  key = max(errs, key=errs.get)
  assert errs[key] <= bound(sensitivity), (what, key, errs[key], sensitivity)
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



def test_stage2_trajectory_in_bfloat16(ref_dir):
  """compute_dtype=bfloat16 against the float32 official trajectory.

  Bound: bf16 keeps 8 mantissa bits (unit roundoff u = 2^-9 ~ 2e-3). Matmuls accumulate in
  float32, so each layer adds O(u) relative error to its output; over the few layers of this
  model the velocity's error stays a small multiple of u, and the per-example squared-error loss
  (a mean of squares) has about twice the relative error of its argument: per-step loss and grad
  norm within 2e-2 (~10 u). Params, Adam state and EMA stay float32 and AdamW normalises the
  update, so after K steps the weights move by at most K * lr * (relative grad error) from the
  float32 path: within 1e-2 of the reference, relative, per tensor.
  """
  def bf16(c):
    c.compute_dtype = "bfloat16"
  meta, d, metrics, state, model = replay_stage2(ref_dir, config_edit=bf16)
  assert model.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  worst = {}
  for name, tol in (("loss", 2e-2), ("grad_norm", 2e-2), ("lr", 1e-6)):
    errs = [rel(m[name], d[f"out_{name}"][i]) for i, m in enumerate(metrics)]
    worst[name] = max(errs)
    assert worst[name] <= tol, (name, errs)
  errs = tensor_errors(stage2_export(model, state.params),
                       load_file(ref_dir / "train2_ditdh.final.safetensors"))
  worst["params"] = max(errs.values())
  assert worst["params"] <= 1e-2, max(errs, key=errs.get)
  print(f"stage-2 bf16 replay vs float32 reference: {worst}")


# ----------------------------------------------------------------------------------------------
# Stage 1


def dino_torch_shapes(recipe: dict, heads_depth: int) -> dict:
  """FrozenDINONoDrop state_dict keys/shapes of a DINO ViT recipe (224px input, as the official)."""
  d, p = recipe["embed_dim"], recipe["patch_size"]
  hid = round(d * recipe["mlp_ratio"])
  shapes = {"cls_token": (1, 1, d), "pos_embed": (1, (224 // p) ** 2 + 1, d),
            "patch_embed.proj.weight": (d, recipe.get("in_chans", 3), p, p),
            "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
  for i in range(max(recipe["depth"], heads_depth)):
    b = f"blocks.{i}."
    shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,),
                   b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
                   b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                   b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                   b + "mlp.fc1.weight": (hid, d), b + "mlp.fc1.bias": (hid,),
                   b + "mlp.fc2.weight": (d, hid), b + "mlp.fc2.bias": (d,)})
  return shapes


def stage1_config(meta: dict, ref_dir):
  """Recipe config whose fields carry the trajectory's official RAE, loss and GAN settings."""
  rae_meta, disc_meta, loss = meta["rae"], meta["discriminator"], meta["loss"]
  enc_dir = ref_dir / rae_meta["encoder"].split(" over ")[1].rstrip("/")
  enc_hf = json.loads((enc_dir / "config.json").read_text())
  dec_hf = json.loads((ref_dir / rae_meta["decoder_config"].rstrip("/") / "config.json").read_text())
  c = presets.base_config()
  c.encoder.name = "dinov2_reg"
  c.encoder.path = str(enc_dir)
  c.encoder.input_size = rae_meta["encoder_input_size"]
  c.encoder.hidden_size = enc_hf["hidden_size"]
  c.encoder.patch_size = enc_hf["patch_size"]
  for k in ("decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads",
            "decoder_intermediate_size", "layer_norm_eps"):
    c.decoder[k] = dec_hf[k]
  c.decoder.patch_size = rae_meta["decoder_patch_size"]
  s1 = c.stage1
  s1.global_batch_size = meta["batch"]
  s1.noise_tau = rae_meta["noise_tau"]
  s1.ema_decay = meta["training"]["ema_decay"]
  s1.optim = optim_from_official(meta["training"], meta["steps"])
  for k in ("perceptual_weight", "disc_weight", "disc_start", "disc_upd_start", "lpips_start",
            "max_d_weight", "disc_updates", "disc_loss", "gen_loss"):
    s1.loss[k] = type(s1.loss[k])(loss[k])
  s1.loss.lpips_weights = "seeded-rule weights, passed as frozen params"
  d = s1.disc
  d.enabled = True
  d.random_init = True  # the frozen ViT gets the seeded-rule weights below
  d.recipe_overrides = dict(disc_meta["recipe"])
  d.key_depths = tuple(disc_meta["key_depths"])
  d.ks = disc_meta["ks"]
  d.norm_type = disc_meta["norm_type"]
  d.using_spec_norm = disc_meta["using_spec_norm"]
  d.aug_prob = float(meta["disc"]["augment"]["prob"])
  d.cutout = float(meta["disc"]["augment"]["cutout"])
  d.optim = optim_from_official(meta["disc"], meta["steps"])
  return c


def ulp_perturbed(sd: dict, seed: int = 1) -> dict:
  """Weights moved by about one float32 ulp (relative 1e-7), as the README's sensitivity runs."""
  rng = np.random.default_rng(seed)
  return {k: (v * (1 + 1e-7 * rng.standard_normal(v.shape))).astype(v.dtype) for k, v in sd.items()}


def replay_stage1(ref_dir, name="train1_rae", *, also_perturbed=False, config_edit=None,
                  steps=None, steps_per_epoch=None):
  """Runs the trajectory through stage1.make_step -> (meta, draws, runs, rae); runs is a list of
  (metrics per step, final state): from the init weights and, if asked, from 1-ulp-perturbed ones
  (through the same compiled steps). `config_edit`, `steps` (a prefix of the trajectory) and
  `steps_per_epoch` (the schedules' clock) serve the negative controls."""
  from conftest import seeded_state_dict
  from rae_jax.interop import decoder_names, dino_weights
  from rae_jax.interop.lpips_weights import lpips_params_from_state_dict
  from rae_jax.losses.spectral_norm import SPECTRAL
  from rae_jax.pipeline import stage1

  meta, d = load_case(ref_dir, name)
  config = stage1_config(meta, ref_dir)
  if config_edit is not None:
    config_edit(config)
  k, b = steps or meta["steps"], meta["batch"]
  spe = steps_per_epoch or meta["steps_per_epoch"]
  parts = stage1.build_parts(config, spe * b)
  assert parts.sched.steps_per_epoch == spe and parts.disc is not None
  rae, rae_vars = builders.build_rae(config, "", with_stats=False)
  assert rae.image_size == meta["rae"]["image_size"]

  decoder = load_file(ref_dir / f"{name}.decoder_init.safetensors")
  inits = [decoder] + ([ulp_perturbed(decoder)] if also_perturbed else [])
  dcfg = parts.disc.vit_config()
  dino_sd = seeded_state_dict(dino_torch_shapes(meta["discriminator"]["recipe"],
                                                1 + max(dcfg["key_depths"], default=0)))
  disc_vars = dino_weights.disc_variables_from_torch(
      parts.disc, dino_sd, load_file(ref_dir / f"{name}.heads_init.safetensors"))
  heads = {n: v for n, v in disc_vars["params"].items() if n != "dino"}
  extra = {"disc": heads, "spectral": disc_vars[SPECTRAL],
           "disc_opt": parts.disc_sched.tx.init(heads), "disc_step": jnp.zeros((), jnp.int32)}
  lpips_shapes = json.loads((ref_dir / "lpips.state_dict.json").read_text())
  frozen = {"encoder": rae_vars["encoder"], "dino": disc_vars["params"]["dino"],
            "lpips": lpips_params_from_state_dict(seeded_state_dict(lpips_shapes))}

  mesh = mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])
  rep = mesh_lib.replicated(mesh)
  frozen = jax.device_put(frozen, rep)
  step = shardings = None
  a = d["aug_u"].shape[1]
  assert a == 1 + 2 * parts.settings.disc_updates
  runs = []
  for init in inits:
    params = decoder_names.from_state_dict(rae.decoder, init, source="decoder_init")
    state = state_lib.create_train_state(params, parts.sched.tx, jax.random.PRNGKey(0),
                                         jax.tree.map(np.array, extra))  # fresh: steps donate
    if step is None:
      shardings = state_lib.state_shardings(jax.eval_shape(lambda: state), mesh)
      step = stage1.make_step(config, rae, parts, shardings, mesh,
                              jax.tree.map(lambda _: rep, frozen))
    state = jax.device_put(state, shardings)
    metrics = []
    for i in range(k):
      def aug(c):  # official DiffAug call c of step i
        return {"u": d["aug_u"][i, c], "rand01": d["aug_rand01"][i, c]}
      d_calls = [(aug(1 + 2 * j), aug(2 + 2 * j)) for j in range(parts.settings.disc_updates)]
      stack = lambda *x: np.stack(x)  # noqa: E731
      draws = {"latent_noise": {"sigma_u": d["noise_u"][i], "noise": d["noise"][i]},
               "g_aug": aug(0),
               "d_aug": {"fake": jax.tree.map(stack, *[f for f, _ in d_calls]),
                         "real": jax.tree.map(stack, *[r for _, r in d_calls])}}
      batch = {"image": nhwc(d["images"][i])}
      state, out = step(state, jax.device_put(batch, mesh_lib.batch_sharding(mesh)), frozen,
                        draws)
      metrics.append(jax.device_get(out))
    runs.append((metrics, jax.device_get(state)))
  return meta, d, runs, rae


STAGE1_SCALARS = {
    "l1": "rec_loss", "lpips": "lpips", "g_loss": "gan_loss", "d_weight": "adaptive_weight",
    "loss": "total", "grad_norm": "grad_norm", "lr": "lr", "d_loss": "d_loss",
    "logits_real": "logits_real", "logits_fake": "logits_fake", "d_lr": "d_lr"}


def stage1_tensors(rae, state):
  from rae_jax.interop import decoder_names, dino_weights
  from rae_jax.losses.spectral_norm import SPECTRAL
  heads = dino_weights.disc_heads_to_torch(
      {"params": state.extra["disc"], SPECTRAL: state.extra["spectral"]})
  return (decoder_names.to_state_dict(rae.decoder, state.params),
          decoder_names.to_state_dict(rae.decoder, state.ema_params), heads)


D_PATH = ("logits_real", "logits_fake")
# Scalars that read the discriminator once the GAN term is on: the generator loss is D's mean
# logit on the fakes, the adaptive weight a ratio with the norm of D's input gradient, the total
# and the decoder's gradient norm carry both.
D_DOWNSTREAM = ("gan_loss", "adaptive_weight", "grad_norm")


def d_path_divergence(meta, d, metrics, own=None) -> list:
  """Per step, the worst relative divergence the discriminator has reached by then: the official
  1-ulp sensitivity, our own perturbed replay and our measured distance from the reference of its
  logits (each of which the test bounds by itself)."""
  sens, out, worst = meta["ulp_sensitivity"], [], 0.0
  for i, m in enumerate(metrics):
    for name in D_PATH:
      ref = d[f"out_{name}"][i]
      if not np.isnan(ref):
        ours = STAGE1_NAMES[name]
        worst = max(worst, float(sens[name][i]), rel(m[ours], ref),
                    rel(own[i][ours], m[ours]) if own else 0.0)
    out.append(worst)
  return out


def inherited_from_discriminator(meta, d, metrics, own=None) -> dict:
  """What the D-downstream scalars inherit, derived per step (zero while the official GAN term is
  off: everything before it keeps the strict bound).

  With eps_D the discriminator's divergence, the generator loss (D's logits) and the adaptive
  weight (||grad rec|| / ||grad_x D||) move by eps_D to first order, and so does the part of the
  gradient norm that the GAN term contributes. The total is rec + w_p LPIPS + w_g a G: its GAN
  term moves by (eps_a + eps_G) |w_g a G|, i.e. 2 eps_D |w_g a G| / |total| relative."""
  eps_d = d_path_divergence(meta, d, metrics, own)
  spe, loss = meta["steps_per_epoch"], meta["loss"]
  on = [i // spe >= loss["disc_start"] for i in range(len(metrics))]  # the official epoch switch
  out = {name: [e if g else 0.0 for e, g in zip(eps_d, on)] for name in D_DOWNSTREAM}
  gan_term = np.abs(loss["disc_weight"] * d["out_adaptive_weight"] * d["out_gan_loss"])
  out["total"] = [2 * e * float(gan_term[i] / abs(d["out_total"][i])) if on[i] else 0.0
                  for i, e in enumerate(eps_d)]
  return out


STAGE1_NAMES = {v: k for k, v in STAGE1_SCALARS.items()}
STRICT_STAGE1 = ("rec_loss", "lpips", "lr", "d_lr", "d_loss")


def check_stage1_run(ref_dir, meta, d, metrics, state=None, rae=None, own=None):
  """Every check of the stage-1 replay; raises AssertionError naming the quantity and step.
  `state` (the final state) also checks the final decoder, EMA and heads tensors; `own` is
  (metrics, state) of our 1-ulp-perturbed replay or None."""
  own_metrics, own_state = own or (None, None)
  strict = {k: v for k, v in STAGE1_SCALARS.items() if v in STRICT_STAGE1}
  check_scalars(meta, d, metrics, strict)
  worst = check_scalars(meta, d, metrics, STAGE1_SCALARS, own=own_metrics,
                        inherited=inherited_from_discriminator(meta, d, metrics, own_metrics))
  # Before the D updates start nothing may have run: our zeros where the reference has NaN.
  first_d = int(np.argmax(~np.isnan(d["out_d_loss"])))
  assert all(float(m["d_lr"]) == 0.0 for m in metrics[:first_d]), "d_lr before the D updates"
  if state is None:
    return worst
  sens = meta["ulp_sensitivity"]
  dec, ema, heads = stage1_tensors(rae, state)
  own_dec, own_ema, own_heads = stage1_tensors(rae, own_state) if own else (None,) * 3
  worst["decoder"] = check_tensors(dec, load_file(ref_dir / "train1_rae.decoder_final.safetensors"),
                                   sens["decoder_worst_tensor"], "decoder", own_dec)
  worst["ema"] = check_tensors(ema, load_file(ref_dir / "train1_rae.decoder_ema.safetensors"),
                               sens["ema_worst_tensor"], "decoder EMA", own_ema)
  worst["heads"] = check_tensors(heads, load_file(ref_dir / "train1_rae.heads_final.safetensors"),
                                 sens["heads_worst_tensor"], "discriminator heads", own_heads)
  n_d = int(np.sum(~np.isnan(d["out_d_loss"])))
  assert int(state.extra["disc_step"]) == n_d and int(state.step) == meta["steps"]
  return worst


def test_stage1_rae_gan_trajectory(ref_dir):
  """The stage-1 loop has measure-zero discontinuities that a 1-ulp change can cross (a ReLU /
  max-pool tie in LPIPS's VGG flips between XLA's fused and unfused rounding of the same
  reconstruction; the D heads learn from near-zero hinge gradients that AdamW normalises to full
  steps), so from the first D update on the discriminator diverges chaotically: by about 5e-3
  after three updates, in the official trainer itself as in ours (on any CPU: which ties flip
  depends on the vector width). The D logits are bounded by 10 x the larger of the official
  sensitivity and our own perturbed replay; what reads D (GAN loss, adaptive weight, total,
  gradient norm) by what it inherits from D's measured divergence
  (`inherited_from_discriminator`), never by one random draw. Everything that does not pass
  through D (L1, LPIPS, schedules, D loss, every step before the GAN term) keeps
  max(1e-5, 10 x the official sensitivity), which is where a wrong clock, EMA, phase or
  adaptive-weight formula shows (`test_stage1_replay_check_catches`)."""
  meta, d, runs, rae = replay_stage1(ref_dir, also_perturbed=True)
  (metrics, state), own = runs
  worst = check_stage1_run(ref_dir, meta, d, metrics, state, rae, own)
  print(f"stage-1 replay: worst {worst}")


def _late_gan_start(c):
  c.stage1.loss.disc_start = 2.5  # GAN term one step after the official epoch switch


def _ema_decay(c):
  c.stage1.ema_decay = 0.999


def _squared_adaptive_weight(monkeypatch):
  """A wrong adaptive weight: (||grad rec|| / ||grad G||)^2 instead of the ratio."""
  from rae_jax.losses import gan as gan_lib
  right = gan_lib.adaptive_weight_from_grads
  monkeypatch.setattr(gan_lib, "adaptive_weight_from_grads",
                      lambda r, g, m=1e4: jnp.minimum(right(r, g, m) ** 2, m))


@pytest.mark.slow
@pytest.mark.parametrize("fault, replay_kw, steps, names", [
    # epochs counted in 3 steps, not 2: the LR moves, and with it the step-1 reconstruction
    ("schedule clock", dict(steps_per_epoch=3), 2, r"'(lr|rec_loss)', 1,"),
    ("phase start", dict(config_edit=_late_gan_start), 5, r"'gan_loss', 4,"),
    ("adaptive weight", dict(), 5, r"'adaptive_weight', 4,"),
    ("EMA decay", dict(config_edit=_ema_decay), None, "decoder EMA"),
], ids=["clock", "phase", "adaptive_weight", "ema"])
def test_stage1_replay_check_catches(ref_dir, monkeypatch, fault, replay_kw, steps, names):
  """Negative controls: the derived bounds still fail a replay with each mistake (one replay
  prefix each, as short as the mistake needs)."""
  if fault == "adaptive weight":
    _squared_adaptive_weight(monkeypatch)
  meta, d, runs, rae = replay_stage1(ref_dir, steps=steps, **replay_kw)
  (metrics, state), = runs
  with pytest.raises(AssertionError, match=names):
    check_stage1_run(ref_dir, meta, d, metrics, state if steps is None else None, rae)
