"""A wrong config fails at start naming the field; a too-narrow DiT warns loudly."""
import importlib.util
import warnings

import pytest

from conftest import REPO
from rae_jax import config_checks


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("name", ["demo", "stage1_dinov2b_decxl_256", "stage1_dinov3b_decxl_256",
                                  "stage2_ditdh_xl_256",
                                  "stage2_ditdh_s_256", "stage2_ditdh_xl_512",
                                  "sample_ditdh_xl_256_ag", "sample_ditdh_xl_256_cfg"])
def test_every_recipe_is_valid(name):
  c = load_config(name)
  with warnings.catch_warnings():
    warnings.simplefilter("error", config_checks.WidthRuleWarning)
    config_checks.check(c, "all", num_devices=8)


def test_official_values():
  c = load_config("stage2_ditdh_xl_256")
  assert c.model.hidden_size == (1152, 2048) and c.model.depth == (28, 2)
  assert c.transport.shift_dim == 196608 and c.transport.time_dist_type == "logit-normal_0_1"
  assert c.stage2.optim.lr == 2e-4 and c.stage2.optim.final_lr == 2e-5
  assert c.stage2.optim.warmup_epochs == 40 and c.stage2.optim.decay_end_epoch == 800
  assert c.stage2.ema_decay == 0.9995 and c.stage2.global_batch_size == 1024
  ag = load_config("sample_ditdh_xl_256_ag")
  assert ag.guidance.method == "autoguidance" and ag.guidance.scale == 1.42
  assert ag.guidance.guide_model.hidden_size == (384, 2048)
  s1 = load_config("stage1_dinov2b_decxl_256")
  assert s1.stage1.noise_tau == 0.8 and s1.stage1.ema_decay == 0.9978
  assert s1.decoder.decoder_hidden_size == 1152 and s1.decoder.decoder_num_hidden_layers == 28
  v3 = load_config("stage1_dinov3b_decxl_256")  # patch 16 at 256px: 16x16x768 latents
  assert (v3.encoder.name, v3.encoder.input_size, v3.encoder.patch_size) == ("dinov3", 256, 16)
  assert config_checks.latent_grid(v3) == 16 == v3.model.input_size
  assert v3.model.in_channels == 768 and v3.transport.shift_dim == 16 * 16 * 768
  assert v3.data.image_size == 16 * v3.decoder.patch_size
  big = load_config("stage2_ditdh_xl_512")
  assert big.model.input_size == 32 and big.transport.shift_dim == 768 * 32 * 32


@pytest.mark.parametrize("mutate, field", [
    (lambda c: setattr(c.data, "image_size", 30), "config.data.image_size"),
    (lambda c: setattr(c.encoder, "name", "dinov4"), "config.encoder.name"),
    (lambda c: setattr(c.stage2, "global_batch_size", 60), "config.stage2.global_batch_size"),
    (lambda c: setattr(c.model, "in_channels", 32), "config.model.in_channels"),
    (lambda c: setattr(c.model, "input_size", 8), "config.model.input_size"),
    (lambda c: setattr(c.encoder, "input_size", 30), "config.encoder.input_size"),
    (lambda c: setattr(c.transport, "shift_dim", 4096), "config.transport.shift_dim"),
    (lambda c: setattr(c.guidance, "method", "pag"), "config.guidance.method"),
])
def test_wrong_config_names_the_field(mutate, field):
  c = load_config("demo")
  mutate(c)
  with pytest.raises(config_checks.ConfigError, match=field.replace(".", r"\.")):
    config_checks.check(c, "all", num_devices=8)


def test_narrow_dit_warns_but_starts():
  c = load_config("demo")
  c.model.hidden_size = (32, 48)
  with pytest.warns(config_checks.WidthRuleWarning, match="NARROWER"):
    config_checks.check(c, "train_stage2", num_devices=1)


@pytest.mark.parametrize("override, field", [
    (("compute_dtype", "float16"), "config.compute_dtype"),
    (("eval.per_device_batch", 0), "config.eval.per_device_batch"),
    (("stage2.optim.betas", 0.9), "config.stage2.optim.betas"),
    (("mesh.data", 3), "config.mesh.data"),
    (("checkpoint.every_steps", 0), "config.checkpoint.every_steps"),
    (("stage1.global_batch_size", 0), "config.stage1.global_batch_size"),
    (("stage2.ema_decay", 1.5), "config.stage2.ema_decay"),
])
def test_bad_values_fail_up_front_before_anything_is_written(tmp_path, override, field):
  """Each fails as a ConfigError naming the field before the workdir is written (not as a
  KeyError/ZeroDivisionError/IndexError later)."""
  from rae_jax import modes
  c = load_config("demo")
  path, value = override
  *parents, leaf = path.split(".")
  node = c
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value
  workdir = tmp_path / "w"
  with pytest.raises(config_checks.ConfigError, match=field.replace(".", r"\.")):
    modes.run("all", c, str(workdir))
  assert not workdir.exists() or not any(workdir.iterdir())


def test_missing_encoder_path_fails_and_ignored_path_warns(tmp_path):
  c = load_config("stage2_ditdh_xl_256")
  c.encoder.path = str(tmp_path / "no_such_encoder")
  with pytest.raises(config_checks.ConfigError, match=r"config\.encoder\.path=.*no such file"):
    config_checks.check(c, "train_stage2", num_devices=8)
  demo = load_config("demo")
  demo.encoder.path = str(tmp_path)
  with pytest.warns(config_checks.IgnoredFieldWarning, match=r"config\.encoder\.path"):
    config_checks.check(demo, "all", num_devices=8)


def test_resume_refuses_changed_run_fields_unless_allowed():
  saved = load_config("demo").to_dict()
  c = load_config("demo")
  bs = c.stage2.global_batch_size
  c.stage2.global_batch_size = 2 * bs
  c.stage2.optim.lr = 2 * c.stage2.optim.lr
  c.stage2.ema_decay = 0.9
  c.log.every_steps = 7  # exempt: cannot change the math
  c.stage2.optim.num_steps = 5000  # exempt: extends the run
  c.stage1.optim.lr = 1.0  # not read by stage 2
  c.model.remat, c.model.remat_policy = True, "dots_saveable"  # memory only: same math, params
  c.model.scan_layers = True  # changes the param layout: refused
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.check_resume(saved, c.to_dict(), stage="stage2")
  msg = str(e.value)
  for f in (f"config.stage2.global_batch_size: {bs} -> {2 * bs}", "config.stage2.optim.lr",
            "config.stage2.ema_decay", "config.model.scan_layers"):
    assert f in msg, msg
  assert "log.every_steps" not in msg and "num_steps" not in msg and "stage1" not in msg
  assert "model.remat" not in msg, msg
  assert ("--config.resume.allow_changes=model.scan_layers,stage2.ema_decay,"
          "stage2.global_batch_size,stage2.optim.lr") in msg
  c.model.scan_layers = False
  c.resume.allow_changes = "stage2.ema_decay, config.stage2.global_batch_size,stage2.optim.lr"
  changed = config_checks.check_resume(saved, c.to_dict(), stage="stage2")
  assert changed == ["stage2.ema_decay", "stage2.global_batch_size", "stage2.optim.lr"]
  # Stage 1 does refuse its own lr.
  with pytest.raises(config_checks.ConfigError, match=r"config\.stage1\.optim\.lr"):
    config_checks.check_resume(saved, c.to_dict(), stage="stage1")
