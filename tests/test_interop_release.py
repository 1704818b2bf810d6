"""import_torch / export_torch: official files <-> workdir, round trips, parity, error cases."""
import hashlib
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import rel_err
from safetensors.numpy import load_file as load_safetensors
from safetensors.torch import load_file as load_safetensors_torch
from safetensors.torch import save_file as save_safetensors_torch

from rae_jax import presets
from rae_jax import atomic
from rae_jax.interop import decoder_names, ditdh_names, stats as stats_lib, torch_io
from rae_jax.pipeline import release
from rae_jax.interop.common import StateDictError, flatten
from rae_jax.interop.hf_encoders import load_hf_encoder
from rae_jax.models.rae import RAE
from rae_jax.pipeline import builders, snapshots
from rae_jax.train import mesh as mesh_lib

TINY_DITDH = dict(hidden=(32, 64), depth=(2, 1), heads=(2, 4))  # ditdh_tiny.json


def tiny_config():
  c = presets.base_config()
  c.encoder.update(name="toy_vit", path="", input_size=16, patch_size=4, hidden_size=16, depth=1,
                   num_heads=2)
  c.decoder.update(decoder_hidden_size=32, decoder_num_hidden_layers=1,
                   decoder_num_attention_heads=2, decoder_intermediate_size=64, patch_size=2)
  c.model = presets.ditdh((32, 48), (2, 1), (2, 4), input_size=4, in_channels=16, num_classes=10)
  c.guidance.guide_model = presets.ditdh((32, 32), (1, 1), (2, 2), input_size=4, in_channels=16,
                                         num_classes=10)
  c.data.image_size = 4 * c.decoder.patch_size
  c.transport.shift_dim = 4 * 4 * 16
  return c


def ditdh_ref_config():
  c = tiny_config()
  c.model = presets.ditdh(TINY_DITDH["hidden"], TINY_DITDH["depth"], TINY_DITDH["heads"],
                          input_size=4, in_channels=16, num_classes=10)
  return c


def tree_equal(a, b):
  fa, fb = flatten(a), flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def digest(folder):
  """Hashes of the deterministic files (torch.save embeds a per-save serialization id)."""
  return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
          for f in sorted(os.listdir(folder)) if not f.endswith(".pt")}


def random_params(init, *args, seed=0):
  """Random weights of the right tree and shapes, without running (slow, eager) init."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0), *args)["params"]
  return jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir as training leaves it: stage2 + guide + stage1 snapshots (EMA != params), stats."""
  c = tiny_config()
  workdir = str(tmp_path_factory.mktemp("trained"))
  shape = builders.stage2_latent_shape(c)
  x, t, y = np.zeros((1, *shape), np.float32), np.zeros((1,), np.float32), np.zeros((1,), np.int32)
  dec = release.decoder_module(c)
  inits = {
      builders.STAGE2_DIR: (builders.build_stage2_model(c.model).init, x, t, y),
      builders.GUIDE_DIR: (builders.build_stage2_model(c.guidance.guide_model).init, x, t, y),
      builders.STAGE1_DIR: (dec.init, np.zeros((1, dec.num_patches, dec.hidden_size), np.float32)),
  }
  out = {}
  for i, (stage, (init, *args)) in enumerate(inits.items()):
    params, ema = random_params(init, *args, seed=2 * i), random_params(init, *args, seed=2 * i + 1)
    snapshots.save_weights(workdir, stage, params, ema, {"test": True})
    out[stage] = (params, ema)
  rng = np.random.default_rng(0)
  stats = {"mean": rng.normal(size=shape).astype(np.float32),
           "var": rng.uniform(0.5, 2.0, size=shape).astype(np.float32)}
  os.makedirs(os.path.join(workdir, "stats"))
  stats_lib.save_stats(stats, os.path.join(workdir, builders.STATS_FILE))
  out["stats"] = stats
  return c, workdir, out


@pytest.fixture(scope="module")
def exported(trained):
  c, workdir, _ = trained
  return release.export_release(c, workdir, "ema")


def test_round_trip_export_import_is_bit_identical(trained, exported, tmp_path):
  c, _, ref = trained
  assert sorted(os.listdir(exported)) == sorted(
      ["README.txt"] + [f"{s}.{e}" for s in ("stage2_model", "guide_model", "decoder", "stat")
                        for e in ("pt", "safetensors")])
  c2 = tiny_config()
  for field, stem in (("stage2_model", "stage2_model"), ("guide_model", "guide_model"),
                      ("decoder", "decoder"), ("stats", "stat")):
    c2.interop[field] = os.path.join(exported, f"{stem}.pt")
  summary = release.import_release(c2, str(tmp_path))
  assert {k: v["entry"] for k, v in summary.items()} == {
      "stage2": "plain", "guide": "plain", "stage1": "plain", "stats": "plain"}
  for stage in (builders.STAGE2_DIR, builders.GUIDE_DIR, builders.STAGE1_DIR):
    tree, meta = snapshots.load_weights(str(tmp_path), stage)
    tree_equal(tree["params"], ref[stage][1])  # the EMA weights were exported
    tree_equal(tree["ema_params"], ref[stage][1])
    stem = {"stage2": "stage2_model", "guide": "guide_model", "stage1": "decoder"}[stage]
    assert meta["source"] == os.path.join(exported, f"{stem}.pt") and meta["entry"] == "plain"
  got = stats_lib.load_stats(tmp_path / builders.STATS_FILE)
  tree_equal(got, ref["stats"])
  assert sorted(os.listdir(tmp_path)) == ["guide", "stage1", "stage2", "stats"]  # no staging left


def test_exported_files_load_with_torch_and_match_official_names(trained, exported):
  c, _, ref = trained
  manifest = release.export_manifest(c)
  for stem in ("stage2_model", "guide_model", "decoder", "stat"):
    sd = torch.load(os.path.join(exported, f"{stem}.pt"), map_location="cpu", weights_only=True)
    assert {k: tuple(v.shape) for k, v in sd.items()} == manifest[f"{stem}.pt"]
    twin = load_safetensors(os.path.join(exported, f"{stem}.safetensors"))
    assert twin.keys() == sd.keys()
    for k in sd:
      np.testing.assert_array_equal(twin[k], sd[k].numpy())
  sd = load_safetensors(os.path.join(exported, "stage2_model.safetensors"))
  model = builders.build_stage2_model(c.model)
  want = ditdh_names.ditdh_to_torch(ref["stage2"][1], model)
  for k in want:
    np.testing.assert_array_equal(sd[k], want[k])
  assert sd["x_embedder.proj.weight"].shape == (48, 16, 1, 1)  # torch conv layout
  stat = torch.load(os.path.join(exported, "stat.pt"), weights_only=True)
  np.testing.assert_array_equal(stat["mean"].numpy(), ref["stats"]["mean"].transpose(2, 0, 1))
  readme = open(os.path.join(exported, "README.txt")).read()
  assert ("DiTwDDTHead(input_size=4, patch_size=1, in_channels=16, hidden_size=[32, 48], "
          "depth=[2, 1], num_heads=[2, 4], mlp_ratio=4.0") in readme
  assert "GeneralDecoder(ViTMAEConfig(hidden_size=16, decoder_hidden_size=32" in readme
  assert "num_patches=16)" in readme and readme.count("strict=True") == 3
  assert "scan_layers" not in readme and "remat" not in readme


def test_export_which_params(trained, tmp_path):
  _, trained_dir, ref = trained
  workdir = str(tmp_path / "w")
  shutil.copytree(trained_dir, workdir, ignore=shutil.ignore_patterns("export*", "stats"))
  c = tiny_config()
  c.stats.path = os.path.join(trained_dir, builders.STATS_FILE)
  out = release.export_release(c, workdir, "params")
  sd = load_safetensors(os.path.join(out, "decoder.safetensors"))
  want = decoder_names.to_state_dict(release.decoder_module(c), ref["stage1"][0])
  assert sd.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(sd[k], want[k])
  with pytest.raises(ValueError, match="which='last'"):
    release.export_release(c, workdir, "last")


def test_full_size_export_names_equal_official(ref_dir):
  """DINOv2-B (224/14 -> 16x16x768), ViT-XL decoder, DiTDH-XL with a DiTDH-S guide."""
  manifest = release.export_manifest(presets.base_config())
  for name, ref_file in (("stage2_model.pt", "ditdh_xl.state_dict.json"),
                         ("guide_model.pt", "ditdh_s.state_dict.json"),
                         ("decoder.pt", "decoder_vitxl_dinov2b.state_dict.json")):
    want = {k: tuple(v) for k, v in json.loads((ref_dir / ref_file).read_text()).items()}
    assert manifest[name] == want, name
  assert manifest["stat.pt"] == {"mean": (768, 16, 16), "var": (768, 16, 16)}


def test_import_reference_ditdh_reproduces_forward(ref_dir, tmp_path):
  sd = load_safetensors_torch(ref_dir / "ditdh_tiny.weights.safetensors")
  torch.save(sd, tmp_path / "plain.pt")
  # An official training checkpoint: its EMA must be taken, not the raw weights.
  fixed = ("pos_embed", "enc_feat_rope.freqs_cos", "enc_feat_rope.freqs_sin",
           "dec_feat_rope.freqs_cos", "dec_feat_rope.freqs_sin")  # buffers, same in both entries
  torch.save({"model": {k: v if k in fixed else torch.zeros_like(v) for k, v in sd.items()},
              "ema": sd, "step": 7},
             tmp_path / "wrapped.pt")
  c = ditdh_ref_config()
  mesh = mesh_lib.make_mesh()
  got = {}
  for name in ("plain", "wrapped"):
    c.interop.stage2_model = str(tmp_path / f"{name}.pt")
    summary = release.import_release(c, str(tmp_path / name))
    assert summary["stage2"]["entry"] == {"plain": "plain", "wrapped": "ema"}[name]
    assert summary["stage2"]["kind"] == "DiTDH"
    got[name], _ = snapshots.load_params(str(tmp_path / name), builders.STAGE2_DIR, mesh, "ema")
  tree_equal(got["wrapped"], got["plain"])
  io = np.load(ref_dir / "ditdh_tiny.io.npz")
  model = builders.build_stage2_model(c.model)
  params = jax.device_get(got["plain"])  # one-device compile: much cheaper than the 8-way SPMD one
  out = jax.jit(model.apply)({"params": params}, io["x"].transpose(0, 2, 3, 1), io["t"], io["y"])
  err = rel_err(np.asarray(out).transpose(0, 3, 1, 2), io["out"])
  print(f"ditdh import: forward rel err {err:.2e}")
  assert err <= 1e-5


def assert_files_bit_identical(original, exported_path):
  want = load_safetensors(original)
  for got in (load_safetensors(exported_path + ".safetensors"),
              {k: v.numpy() for k, v in torch.load(exported_path + ".pt",
                                                   weights_only=True).items()}):
    assert got.keys() == want.keys()
    for k in want:
      assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
      assert got[k].tobytes() == want[k].tobytes(), f"{k} differs after import -> export"


def test_import_then_export_of_official_files_is_bit_identical(ref_dir, tmp_path):
  """Every tensor, RoPE / pos_embed buffers included, comes back bit-identical."""
  c = ditdh_ref_config()
  c.guidance.guide_model = presets.lightning_dit(32, 2, 2, input_size=4, in_channels=16,
                                                 num_classes=10)
  c.interop.stage2_model = str(ref_dir / "ditdh_tiny.weights.safetensors")
  c.interop.guide_model = str(ref_dir / "lightningdit_tiny.weights.safetensors")
  release.import_release(c, str(tmp_path / "w"))
  out = release.export_release(c, str(tmp_path / "w"), "ema")
  assert_files_bit_identical(ref_dir / "ditdh_tiny.weights.safetensors", f"{out}/stage2_model")
  assert_files_bit_identical(ref_dir / "lightningdit_tiny.weights.safetensors",
                             f"{out}/guide_model")
  c = rae_ref_config(ref_dir)
  release.import_release(c, str(tmp_path / "r"))
  out = release.export_release(c, str(tmp_path / "r"), "params")
  assert_files_bit_identical(ref_dir / "rae_tiny.decoder.safetensors", f"{out}/decoder")
  want = torch.load(ref_dir / "tiny_stat.pt", weights_only=True)
  got = load_safetensors(f"{out}/stat.safetensors")
  for k in want:
    assert got[k].tobytes() == want[k].numpy().tobytes(), k


def test_training_checkpoint_keeps_model_and_ema_apart(ref_dir, tmp_path):
  """params = 'model', ema_params = 'ema'; export which=params/ema gives back each one."""
  sd = load_safetensors_torch(ref_dir / "ditdh_tiny.weights.safetensors")
  raw = {k: v if "rope" in k or k == "pos_embed" else v * 0.5 for k, v in sd.items()}
  torch.save({"model": raw, "ema": sd, "step": 3}, tmp_path / "both.pt")
  torch.save({"model": raw, "step": 3}, tmp_path / "model_only.pt")
  c = ditdh_ref_config()
  c.interop.stage2_model = str(tmp_path / "both.pt")
  summary = release.import_release(c, str(tmp_path / "w"))
  assert summary["stage2"]["entries"] == {"params": "model", "ema_params": "ema"}
  _, meta = snapshots.load_weights(str(tmp_path / "w"), builders.STAGE2_DIR)
  assert meta["entries"] == {"params": "model", "ema_params": "ema"}
  for which, want in (("params", raw), ("ema", sd)):
    out = release.export_release(c, str(tmp_path / "w"), which)
    got = load_safetensors(f"{out}/stage2_model.safetensors")
    for k in want:
      assert got[k].tobytes() == want[k].numpy().tobytes(), (which, k)
  c.interop.stage2_model = str(tmp_path / "model_only.pt")
  summary = release.import_release(c, str(tmp_path / "m"))
  assert summary["stage2"]["entries"] == {"params": "model", "ema_params": "model"}


def test_published_files_get_umask_permissions(trained, tmp_path):
  """User-facing files are 0644 under umask 022, not mkstemp's 0600."""
  from rae_jax.pipeline import images
  c, trained_dir, _ = trained
  old = os.umask(0o022)
  try:
    out = release.export_release(c, trained_dir, "ema")
    images.write_png(np.zeros((4, 4, 3), np.uint8), str(tmp_path / "samples.png"))
    atomic.write_file(str(tmp_path / "x.txt"), lambda f: f.write(b"x"))
  finally:
    os.umask(old)
  files = [os.path.join(out, f) for f in os.listdir(out)]
  files += [str(tmp_path / "samples.png"), str(tmp_path / "x.txt")]
  assert {f: oct(os.stat(f).st_mode & 0o777) for f in files} == {f: "0o644" for f in files}
  assert oct(os.stat(out).st_mode & 0o777) == "0o755"


def rae_ref_config(ref_dir):
  c = tiny_config()
  hf = json.loads((ref_dir / "tiny_dinov2_reg" / "config.json").read_text())
  dec = json.loads((ref_dir / "tiny_decoder_config" / "config.json").read_text())
  c.encoder.update(name="dinov2_reg", path=str(ref_dir / "tiny_dinov2_reg"), input_size=16,
                   patch_size=hf["patch_size"], hidden_size=hf["hidden_size"])
  c.decoder.update(patch_size=5, **{k: dec[k] for k in (
      "decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads",
      "decoder_intermediate_size", "layer_norm_eps")})
  c.data.image_size = 20
  c.interop.decoder = str(ref_dir / "rae_tiny.decoder.safetensors")
  c.interop.stats = str(ref_dir / "tiny_stat.pt")
  return c


def test_import_reference_rae_reproduces_decode(ref_dir, tmp_path):
  c = rae_ref_config(ref_dir)
  workdir = str(tmp_path)
  summary = release.import_release(c, workdir)
  assert summary["stats"]["keys"] == ["mean", "var"] and summary["stage1"]["entry"] == "plain"
  # What build_rae assembles, minus its (slow, eager) random decoder init.
  enc = load_hf_encoder(c.encoder.path, "dinov2_reg")
  rae = RAE(enc.module, release.decoder_module(c), c.encoder.input_size, tuple(enc.image_mean),
            tuple(enc.image_std), 0.0, c.stats.eps)
  params, _ = snapshots.load_params(workdir, builders.STAGE1_DIR, mesh_lib.make_mesh(), "ema")
  variables = {"encoder": enc.params, "decoder": jax.device_get(params),
               "stats": stats_lib.load_stats(os.path.join(workdir, builders.STATS_FILE))}
  io = np.load(ref_dir / "rae_tiny.io.npz")
  recon = jax.jit(rae.decode)(variables, io["latent"].transpose(0, 2, 3, 1))
  err = rel_err(np.asarray(recon).transpose(0, 3, 1, 2), io["recon"])
  print(f"rae import: recon rel err {err:.2e}")
  assert err <= 1e-5


def test_import_decoder_from_training_checkpoint_and_bf16(ref_dir, tmp_path):
  """Official stage-1 checkpoints hold the whole RAE (DDP 'module.' prefixes); bf16 files work."""
  c = rae_ref_config(ref_dir)
  c.interop.stats = ""
  sd = load_safetensors_torch(ref_dir / "rae_tiny.decoder.safetensors")
  want = decoder_names.from_state_dict(release.decoder_module(c), load_safetensors(
      ref_dir / "rae_tiny.decoder.safetensors"))
  rae_sd = {f"module.decoder.{k}": v for k, v in sd.items()}
  rae_sd["module.encoder.model.embeddings.cls_token"] = torch.zeros(1, 1, 24)
  torch.save({"step": 3, "model": {k: v * 0 for k, v in rae_sd.items()}, "ema": rae_sd},
             tmp_path / "ep-0000003.pt")
  save_safetensors_torch({k: v.to(torch.bfloat16) for k, v in sd.items()}, tmp_path / "bf16.safetensors")
  for name, expect in (("ep-0000003.pt", want),
                       ("bf16.safetensors", jax.tree.map(
                           lambda a: np.asarray(a.astype(ml_dtypes.bfloat16), np.float32), want))):
    c.interop.decoder = str(tmp_path / name)
    summary = release.import_release(c, str(tmp_path / f"w_{name}"))
    assert summary["stage1"]["entry"] == ("ema" if name.endswith(".pt") else "plain")
    tree, _ = snapshots.load_weights(str(tmp_path / f"w_{name}"), builders.STAGE1_DIR)
    tree_equal(tree["ema_params"], expect)
    # A training checkpoint keeps its raw 'model' weights apart: params = model (zeros here).
    tree_equal(tree["params"], jax.tree.map(np.zeros_like, expect) if name.endswith(".pt")
               else expect)


# ----------------------------------------------------------------------------------------------
# Errors: clear messages, nothing written.


def expect_import_error(c, workdir, match):
  with pytest.raises(StateDictError, match=match) as e:
    release.import_release(c, str(workdir))
  assert not os.path.exists(workdir), f"import wrote into {workdir} despite the error"
  return str(e.value)


def test_decoder_file_given_as_stage2_model(ref_dir, tmp_path):
  c = ditdh_ref_config()
  c.interop.stage2_model = str(ref_dir / "rae_tiny.decoder.safetensors")
  msg = expect_import_error(c, tmp_path / "w", "config.interop.stage2_model must be a DiTwDDTHead")
  assert "rae_tiny.decoder.safetensors" in msg and "GeneralDecoder" in msg
  assert "did you mean config.interop.decoder?" in msg
  c = ditdh_ref_config()
  c.interop.decoder = str(ref_dir / "tiny_stat.pt")
  msg = expect_import_error(c, tmp_path / "w", "config.interop.decoder must be a GeneralDecoder")
  assert "tiny_stat.pt" in msg and "did you mean config.interop.stats?" in msg
  c.interop.decoder = ""
  c.model.name = "LightningDiT"
  c.interop.stage2_model = str(ref_dir / "ditdh_tiny.weights.safetensors")
  expect_import_error(c, tmp_path / "w", r"holds a DiTwDDTHead .*set config.model.name='DiTDH'")


def test_config_sizes_disagree_with_file(ref_dir, tmp_path):
  c = tiny_config()  # decoder width 48, the file's is 64
  path = str(ref_dir / "ditdh_tiny.weights.safetensors")
  c.interop.stage2_model = path
  msg = expect_import_error(c, tmp_path / "w", "tensor\\(s\\) disagree with the config")
  assert path in msg
  assert "key 'blocks.2.attn.proj.weight' has shape (64, 64) in the file, expected (48, 48)" in msg
  assert "config.model: DiTDH" in msg and "hidden_size=(32, 48)" in msg
  c = rae_ref_config(ref_dir)
  c.encoder.update(name="toy_vit", path="", hidden_size=16)
  c.interop.decoder = ""
  msg = expect_import_error(c, tmp_path / "w", "tiny_stat.pt")
  assert "key 'mean' has shape (24, 4, 4) in the file, expected (16, 4, 4)" in msg


def test_missing_and_unexpected_keys(ref_dir, tmp_path):
  sd = load_safetensors_torch(ref_dir / "ditdh_tiny.weights.safetensors")
  sd["bogus.weight"] = sd.pop("y_embedder.embedding_table.weight")
  torch.save({"model": sd}, tmp_path / "broken.pt")
  c = ditdh_ref_config()
  c.interop.stage2_model = str(tmp_path / "broken.pt")
  msg = expect_import_error(c, tmp_path / "w", "broken.pt \\['model'\\]")
  assert "missing keys (1): ['y_embedder.embedding_table.weight']" in msg
  assert "unexpected keys (1): ['bogus.weight']" in msg


def test_late_failure_leaves_existing_workdir_untouched(ref_dir, tmp_path):
  """stage2 converts fine, the guide's fixed buffer is wrong: the staged stage2 is dropped too."""
  sd = load_safetensors_torch(ref_dir / "ditdh_tiny.weights.safetensors")
  torch.save(sd, tmp_path / "good.pt")
  sd["pos_embed"] = sd["pos_embed"] + 1.0
  torch.save(sd, tmp_path / "bad_buffer.pt")
  c = ditdh_ref_config()
  c.guidance.guide_model = c.model
  c.interop.stage2_model = str(tmp_path / "good.pt")
  c.interop.guide_model = str(tmp_path / "bad_buffer.pt")
  c.interop.stats = str(ref_dir / "tiny_stat.pt")
  c.encoder.hidden_size = 24
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "keep.txt").write_text("x")
  with pytest.raises(StateDictError, match="bad_buffer.pt: buffer 'pos_embed' differs"):
    release.import_release(c, str(workdir))
  assert os.listdir(workdir) == ["keep.txt"]


def test_hf_paths_and_missing_files(monkeypatch, tmp_path):
  calls = []

  def fake_download(repo_id, filename, revision=None):
    calls.append((repo_id, filename, revision))
    return str(tmp_path / "stat.pt")

  import huggingface_hub
  monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
  spec = "hf://nyu-visionx/RAE-collections/models/stats/dinov2/stat.pt"
  assert release.resolve_path(spec, "stats") == str(tmp_path / "stat.pt")
  release.resolve_path("hf://org/repo@v1/a.pt", "decoder")
  assert calls == [("nyu-visionx/RAE-collections", "models/stats/dinov2/stat.pt", None),
                   ("org/repo", "a.pt", "v1")]
  with pytest.raises(ValueError, match="config.interop.decoder='hf://org/repo'"):
    release.resolve_path("hf://org/repo", "decoder")
  with pytest.raises(FileNotFoundError, match="config.interop.stats='/nonexistent/stat.pt'"):
    release.resolve_path("/nonexistent/stat.pt", "stats")
  with pytest.raises(ValueError, match="config.interop names no file"):
    release.import_release(tiny_config(), str(tmp_path / "w"))


def test_interrupted_export_keeps_previous_export(trained, exported, monkeypatch):
  c, workdir, _ = trained
  before, names = digest(exported), sorted(os.listdir(exported))

  def killed_while_writing(sd, path):
    with open(path, "wb") as f:
      f.write(b"half a file")
    raise KeyboardInterrupt("simulated kill")

  real = torch_io.save_torch
  monkeypatch.setattr(torch_io, "save_torch", killed_while_writing)
  with pytest.raises(KeyboardInterrupt):
    release.export_release(c, workdir, "params")
  assert digest(exported) == before and sorted(os.listdir(exported)) == names
  assert not os.path.exists(exported + ".tmp")
  monkeypatch.setattr(torch_io, "save_torch", real)
  # A hard kill leaves the temp dir behind: the next export clears it and publishes.
  os.makedirs(exported + ".tmp", exist_ok=True)
  open(os.path.join(exported + ".tmp", "junk"), "w").close()
  assert release.export_release(c, workdir, "ema") == exported
  assert digest(exported) == before  # same weights -> same bytes
  assert sorted(os.listdir(exported)) == names
  assert not os.path.exists(exported + ".tmp")


def test_export_of_empty_workdir_says_what_is_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing to export"):
    release.export_release(tiny_config(), str(tmp_path), "ema")


def test_replace_dir_recovers_from_a_kill_between_renames(tmp_path):
  dst = tmp_path / "export"
  (tmp_path / "export.old").mkdir()  # killed after moving the previous export aside
  (tmp_path / "export.old" / "a.pt").write_text("previous")
  atomic.recover_dir(str(dst))  # what export_release does first
  assert (dst / "a.pt").read_text() == "previous"
  assert sorted(os.listdir(tmp_path)) == ["export"]
  (tmp_path / "new").mkdir()
  (tmp_path / "new" / "a.pt").write_text("new")
  atomic.replace_dir(str(tmp_path / "new"), str(dst))
  assert (dst / "a.pt").read_text() == "new"
  assert sorted(os.listdir(tmp_path)) == ["export"]
