"""diffusers AutoencoderRAE <-> workdir: export/import both ways, outputs compared (no network)."""
import json
import os

import jax
import numpy as np
import pytest
import torch
from conftest import rel_err

from rae_jax import presets
from rae_jax.interop import diffusers_rae, stats as stats_lib
from rae_jax.interop.common import StateDictError, flatten
from rae_jax.interop.hf_encoders import load_hf_encoder
from rae_jax.models.rae import RAE
from rae_jax.pipeline import builders, release, snapshots
from rae_jax.pipeline.diffusers_export import export_diffusers

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
# diffusers' fixed encoder geometry at width 64 (one 64-d head): image_size and patch sizes of
# its transformers configs; a 16x16 latent grid (its decoder_pos_embed equals ours only there).
ENCODERS = {
    "dinov2_reg": dict(cfg=lambda: transformers.Dinov2WithRegistersConfig(
        hidden_size=64, num_attention_heads=1, num_hidden_layers=1, patch_size=14, image_size=518),
        cls="Dinov2WithRegistersModel", input_size=224, patch=14),
    "siglip2": dict(cfg=lambda: transformers.SiglipVisionConfig(
        hidden_size=64, num_attention_heads=1, num_hidden_layers=1, patch_size=16, image_size=256),
        cls="SiglipVisionModel", input_size=256, patch=16),
    "mae": dict(cfg=lambda: transformers.ViTMAEConfig(
        hidden_size=64, num_attention_heads=1, num_hidden_layers=1, patch_size=16, image_size=224),
        cls="ViTMAEModel", input_size=256, patch=16),
}


def hf_encoder_folder(name, folder, seed=0):
  """A random tiny HF encoder folder in diffusers' geometry (LayerNorms non-trivial)."""
  spec = ENCODERS[name]
  torch.manual_seed(seed)
  model = getattr(transformers, spec["cls"])(spec["cfg"]())
  with torch.no_grad():
    for k, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * (0.1 if "norm" not in k else 0.05) + ("weight" in k and "norm" in k))
  model.save_pretrained(folder)
  s = spec["input_size"]
  (folder / "preprocessor_config.json").write_text(json.dumps(
      {"image_mean": MEAN, "image_std": STD, "size": {"height": s, "width": s}}))
  return folder


def rae_config(name, folder):
  spec = ENCODERS[name]
  c = presets.base_config()
  c.encoder.update(name=name, path=str(folder), input_size=spec["input_size"],
                   patch_size=spec["patch"], hidden_size=64)
  c.decoder.update(decoder_hidden_size=32, decoder_num_hidden_layers=1,
                   decoder_num_attention_heads=2, decoder_intermediate_size=64, patch_size=4,
                   layer_norm_eps=1e-12)
  c.data.image_size = 64
  c.model = presets.ditdh((32, 32), (1, 1), (2, 2), input_size=16, in_channels=64, num_classes=10)
  return c


def random_decoder(c, seed):
  """Random decoder params (decoder_pos_embed kept at its sin-cos table, as diffusers fixes it)."""
  dec = release.decoder_module(c)
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(dec.init, jax.random.PRNGKey(0),
                          np.zeros((1, dec.num_patches, dec.hidden_size), np.float32))["params"]
  params = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)
  params["decoder_pos_embed"] = dec.pos_embed().astype(np.float32)
  return params


def make_workdir(c, workdir, with_stats=True):
  params, ema = random_decoder(c, 1), random_decoder(c, 2)
  snapshots.save_weights(workdir, builders.STAGE1_DIR, params, ema, {"test": True})
  stats = None
  if with_stats:
    rng = np.random.default_rng(3)
    shape = builders.stage2_latent_shape(c)
    stats = {"mean": rng.normal(size=shape).astype(np.float32),
             "var": rng.uniform(0.5, 2.0, size=shape).astype(np.float32)}
    os.makedirs(os.path.join(workdir, "stats"), exist_ok=True)
    stats_lib.save_stats(stats, os.path.join(workdir, builders.STATS_FILE))
  return ema, stats


def our_rae(c, decoder_params, stats, encoder_path=None):
  enc = load_hf_encoder(encoder_path or c.encoder.path, c.encoder.name)
  rae = RAE(enc.module, release.decoder_module(c), c.encoder.input_size, enc.image_mean,
            enc.image_std, 0.0, c.stats.eps)
  variables = {"encoder": enc.params, "decoder": decoder_params}
  if stats:
    variables["stats"] = stats
  return rae, variables


def load_diffusers(folder):
  with diffusers_rae.siglip_compat():  # transformers 5 + diffusers 0.42 siglip2 (see module)
    model, info = diffusers.AutoencoderRAE.from_pretrained(str(folder), output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return model.eval()


def compare(model, rae, variables, size, seed=0):
  x = np.random.default_rng(seed).uniform(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    z_t = model.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent
    y_t = model.decode(z_t).sample.numpy()
  z = np.asarray(jax.jit(rae.encode)(variables, x))
  y = np.asarray(jax.jit(rae.decode)(variables, z_t.numpy().transpose(0, 2, 3, 1)))
  return rel_err(z, z_t.numpy().transpose(0, 2, 3, 1)), rel_err(y, y_t.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("name", ["dinov2_reg", "siglip2", "mae"])
def test_export_loads_in_diffusers_and_matches(name, tmp_path):
  c = rae_config(name, hf_encoder_folder(name, tmp_path / "enc"))
  workdir = str(tmp_path / "w")
  ema, stats = make_workdir(c, workdir)
  out = export_diffusers(c, workdir, "ema")
  assert out == os.path.join(workdir, "export", "diffusers")
  assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
  model = load_diffusers(out)
  rae, variables = our_rae(c, ema, stats)
  err_z, err_x = compare(model, rae, variables, c.encoder.input_size)
  print(f"{name}: diffusers vs jax encode {err_z:.2e}, decode {err_x:.2e}")
  assert err_z <= 1e-5 and err_x <= 1e-5

  # ... and back: import_torch from the diffusers folder reproduces the workdir's RAE.
  c2 = rae_config(name, c.encoder.path)
  c2.interop.decoder = out
  summary = release.import_release(c2, str(tmp_path / "back"))
  assert sorted(summary) == ["encoder", "stage1", "stats"]
  tree, _ = snapshots.load_weights(str(tmp_path / "back"), builders.STAGE1_DIR)
  for k, v in flatten(ema).items():
    np.testing.assert_array_equal(np.asarray(flatten(tree["ema_params"])[k]), v, err_msg=k)
  got = stats_lib.load_stats(tmp_path / "back" / builders.STATS_FILE)
  assert rel_err(got["mean"], stats["mean"]) <= 1e-7 and rel_err(got["var"], stats["var"]) <= 1e-5
  enc_back = load_hf_encoder(summary["encoder"]["written"], name)
  enc = load_hf_encoder(c.encoder.path, name)
  assert enc_back.image_mean == pytest.approx(enc.image_mean)
  for k, v in flatten(jax.device_get(enc.params)).items():
    np.testing.assert_array_equal(np.asarray(flatten(enc_back.params)[k]), v, err_msg=k)


def test_import_a_model_made_by_diffusers(tmp_path):
  """A diffusers-side AutoencoderRAE (random, with stats, saved by diffusers) -> our RAE."""
  torch.manual_seed(0)
  kw = dict(encoder_type="mae", encoder_hidden_size=64, encoder_patch_size=16,
            encoder_num_hidden_layers=1, decoder_hidden_size=32, decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2, decoder_intermediate_size=64, patch_size=4,
            encoder_input_size=256, encoder_norm_mean=MEAN, encoder_norm_std=STD,
            latents_mean=(torch.randn(64, 16, 16) * 0.3).tolist(),
            latents_std=(torch.rand(64, 16, 16) + 0.5).tolist())
  model = diffusers.AutoencoderRAE(**kw)
  with torch.no_grad():
    for k, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.1 + ("norm" in k and "weight" in k))
  model.save_pretrained(tmp_path / "hf_rae")
  model.eval()
  c = rae_config("mae", "")
  c.encoder.path = ""
  c.interop.decoder = str(tmp_path / "hf_rae")
  summary = release.import_release(c, str(tmp_path / "w"))
  tree, _ = snapshots.load_weights(str(tmp_path / "w"), builders.STAGE1_DIR)
  stats = stats_lib.load_stats(tmp_path / "w" / builders.STATS_FILE)
  rae, variables = our_rae(c, jax.device_get(tree["ema_params"]), stats,
                           encoder_path=summary["encoder"]["written"])
  err_z, err_x = compare(model, rae, variables, 256, seed=1)
  print(f"diffusers-made mae: encode {err_z:.2e}, decode {err_x:.2e}")
  assert err_z <= 1e-5 and err_x <= 1e-5


def test_unexportable_configurations_are_refused(ref_dir, tmp_path):
  # tiny_dinov2_reg: width 24 with 4 heads, diffusers fixes head_dim 64.
  c = rae_config("dinov2_reg", ref_dir / "tiny_dinov2_reg")
  c.encoder.update(input_size=16, patch_size=4, hidden_size=24)
  make_workdir(c, str(tmp_path / "w"), with_stats=False)
  with pytest.raises(StateDictError, match="num_attention_heads=4 .*head dimension at 64"):
    export_diffusers(c, str(tmp_path / "w"), "ema")
  c.encoder.name = "dinov3"
  with pytest.raises(StateDictError, match="config.encoder.name='dinov3'"):
    export_diffusers(c, str(tmp_path / "w"), "ema")
  # A decoder whose trained decoder_pos_embed moved off the sin-cos table diffusers fixes.
  c = rae_config("mae", hf_encoder_folder("mae", tmp_path / "enc"))
  params = random_decoder(c, 0)
  params["decoder_pos_embed"] = params["decoder_pos_embed"] + 0.01
  snapshots.save_weights(str(tmp_path / "p"), builders.STAGE1_DIR, params, params, {})
  with pytest.raises(StateDictError, match="decoder_pos_embed.*train_pos_embed=False"):
    export_diffusers(c, str(tmp_path / "p"), "ema")
  c.decoder.layer_norm_eps = 1e-6
  with pytest.raises(StateDictError, match="config.decoder.layer_norm_eps=1e-06"):
    export_diffusers(c, str(tmp_path / "p"), "ema")
  assert not os.path.exists(tmp_path / "p" / "export")


def test_import_checks_the_folder_against_the_config(tmp_path):
  folder = hf_encoder_folder("mae", tmp_path / "enc")
  c = rae_config("mae", folder)
  make_workdir(c, str(tmp_path / "w"), with_stats=False)
  out = export_diffusers(c, str(tmp_path / "w"), "params")
  cfg = json.loads(open(os.path.join(out, "config.json")).read())
  assert cfg["latents_std"][0][0][0] == pytest.approx(1 - 1e-5)  # no stats: identity
  c2 = rae_config("mae", folder)
  c2.decoder.decoder_hidden_size = 48
  c2.interop.decoder = out
  with pytest.raises(StateDictError, match="decoder_hidden_size=32 but config.decoder."
                                           "decoder_hidden_size=48"):
    release.import_release(c2, str(tmp_path / "x"))
  c2 = rae_config("mae", folder)
  c2.interop.decoder, c2.interop.stats = out, "stat.pt"
  with pytest.raises(ValueError, match="leave config.interop.stats"):
    release.import_release(c2, str(tmp_path / "x"))
  assert not os.path.exists(tmp_path / "x")
  # export_torch afterwards keeps the diffusers export.
  release.export_release(c, str(tmp_path / "w"), "ema")
  assert os.path.isdir(out) and os.path.exists(os.path.join(out, "config.json"))


def test_export_with_the_encoder_folder_on_gcs(gcs, tmp_path):
  """config.encoder.path on gs://: the export reads the folder through a local temporary copy and
  writes the same files as from the local folder."""
  from rae_jax import storage
  local = hf_encoder_folder("dinov2_reg", tmp_path / "enc")
  remote = gcs.url(f"diffusers-enc-{os.getpid()}-{tmp_path.name}")
  storage.copy_tree(str(local), remote)
  outs = []
  for path in (str(local), remote):
    c = rae_config("dinov2_reg", path)
    workdir = str(tmp_path / ("w_local" if path == str(local) else "w_gcs"))
    make_workdir(c, workdir)
    outs.append(export_diffusers(c, workdir, "ema"))
  for name in ("config.json", "diffusion_pytorch_model.safetensors"):
    with open(os.path.join(outs[0], name), "rb") as a, open(os.path.join(outs[1], name), "rb") as b:
      assert a.read() == b.read(), name
