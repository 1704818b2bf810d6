"""Encoders vs transformers' PyTorch models (tiny random configs saved as HF folders)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_err
from safetensors.numpy import load_file, save_file

from rae_jax.interop import hf_encoders as hfe
from rae_jax.interop.common import StateDictError
from rae_jax.models.vit_encoders import build_encoder, canonical_encoder_name

transformers = pytest.importorskip("transformers")
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def _randomise(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * 0.1
      p.copy_(1.0 + noise if name.endswith(("norm1.weight", "norm2.weight", "before.weight",
                                             "after.weight")) else noise * 2)
  return model.eval()


def _drop_final_affine(norm):
  # What the official wrappers do: weight/bias None -> LayerNorm without affine.
  norm.weight, norm.bias = None, None


def _save(model, folder, size):
  model.save_pretrained(folder)
  (folder / "preprocessor_config.json").write_text(json.dumps(
      {"image_mean": MEAN, "image_std": STD, "do_center_crop": True,
       "crop_size": {"height": size, "width": size}, "size": {"shortest_edge": size}}))
  return folder


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _images(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
  cfg = transformers.Dinov2WithRegistersConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=16,
      patch_size=4, num_register_tokens=4, layerscale_value=0.5, attn_implementation="eager")
  model = _randomise(transformers.Dinov2WithRegistersModel(cfg), 0)
  folder = _save(model, tmp_path_factory.mktemp("dinov2"), 16)
  _drop_final_affine(model.layernorm)
  return model, folder


# 16: checkpoint grid (no interpolation); 24: upsampled; 12x20: non-square, rows downsampled
# (the antialiased branch of HF's bicubic).
@pytest.mark.parametrize("hw", [(16, 16), (24, 24), (12, 20)])
def test_dinov2_reg_matches_hf(dinov2, hw):
  model, folder = dinov2
  enc = hfe.load_hf_encoder(str(folder), "Dinov2withNorm")
  assert enc.name == "dinov2_reg" and enc.input_size == 16
  assert enc.image_mean == tuple(MEAN) and enc.image_std == tuple(STD)
  x = _images((2, *hw, 3))
  with torch.no_grad():
    ref = model(_nchw(x)).last_hidden_state[:, 5:].numpy()  # drop CLS + 4 registers
  out = jax.jit(enc.module.apply)({"params": enc.params}, jnp.asarray(x))
  assert out.shape == ref.shape == (2, hw[0] // 4 * (hw[1] // 4), 32)
  assert rel_err(out, ref) <= 1e-5


def test_dinov2_normalize_false_keeps_final_affine(dinov2):
  # Dinov2withNorm(normalize=False) keeps the checkpoint's final LayerNorm weight and bias.
  model, folder = dinov2
  enc = hfe.load_hf_encoder(str(folder), "dinov2_reg", normalize=False)
  sd = load_file(str(folder / "model.safetensors"))
  x = _images((2, 16, 16, 3), 3)
  with torch.no_grad():
    ref = model(_nchw(x)).last_hidden_state[:, 5:].numpy()
  ref = ref * sd["layernorm.weight"] + sd["layernorm.bias"]
  assert rel_err(jax.jit(enc.module.apply)({"params": enc.params}, jnp.asarray(x)), ref) <= 1e-5


@pytest.mark.parametrize("hw", [(20, 20)])
def test_siglip2_matches_hf(tmp_path, hw):
  cfg = transformers.SiglipVisionConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
      image_size=16, patch_size=4, attn_implementation="eager")
  model = _randomise(transformers.SiglipVisionModel(cfg), 1)
  folder = _save(model, tmp_path, 16)
  _drop_final_affine(model.post_layernorm)
  enc = hfe.load_hf_encoder(str(folder))  # name inferred from model_type
  assert enc.name == "siglip2"
  x = _images((2, *hw, 3), 1)
  with torch.no_grad():
    ref = model(_nchw(x), interpolate_pos_encoding=True).last_hidden_state.numpy()
  out = jax.jit(enc.module.apply)({"params": enc.params}, jnp.asarray(x))
  assert out.shape == ref.shape
  assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("hw", [(12, 12)])
def test_mae_matches_hf(tmp_path, hw):
  cfg = transformers.ViTMAEConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
      image_size=16, patch_size=4, attn_implementation="eager")
  model = _randomise(transformers.ViTMAEModel(cfg), 2)
  folder = _save(model, tmp_path, 16)
  _drop_final_affine(model.layernorm)
  # MAEwNorm: mask_ratio 0 and noise = arange keep every patch in order.
  model.config.mask_ratio = 0.0
  model.embeddings.config.mask_ratio = 0.0
  enc = hfe.load_hf_encoder(str(folder), "MAEwNorm")
  x = _images((2, *hw, 3), 2)
  n = (hw[0] // 4) * (hw[1] // 4)
  noise = torch.arange(n, dtype=torch.float32)[None].expand(2, -1)
  with torch.no_grad():
    ref = model(_nchw(x), noise=noise, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
  out = jax.jit(enc.module.apply)({"params": enc.params}, jnp.asarray(x))
  assert out.shape == tuple(ref.shape) == (2, n, 32)
  assert rel_err(out, ref.numpy()) <= 1e-5


def test_wrapper_prefixes_are_stripped(dinov2):
  # SiglipModel / ViTMAEForPreTraining checkpoints nest the tower under a prefix.
  _, folder = dinov2
  sd = load_file(str(folder / "model.safetensors"))
  module = build_encoder("dinov2_reg", json.loads((folder / "config.json").read_text()))
  a = hfe.params_from_hf("dinov2_reg", module, sd)
  b = hfe.params_from_hf("dinov2_reg", module, {"vit." + k: v for k, v in sd.items()})
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
  back = hfe.params_to_hf("dinov2_reg", module, a)
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k])


def test_missing_tensor_names_key(dinov2, tmp_path):
  _, folder = dinov2
  sd = load_file(str(folder / "model.safetensors"))
  del sd["encoder.layer.1.mlp.fc2.weight"]
  save_file(sd, str(tmp_path / "model.safetensors"))
  for f in ("config.json", "preprocessor_config.json"):
    (tmp_path / f).write_text((folder / f).read_text())
  with pytest.raises(StateDictError, match=r"missing key 'encoder\.layer\.1\.mlp\.fc2\.weight'"):
    hfe.load_hf_encoder(str(tmp_path), "dinov2_reg")


def test_wrong_shape_names_key_and_both_shapes(dinov2):
  _, folder = dinov2
  sd = load_file(str(folder / "model.safetensors"))
  sd["embeddings.position_embeddings"] = np.zeros((1, 10, 32), np.float32)
  module = build_encoder("dinov2_reg", json.loads((folder / "config.json").read_text()))
  with pytest.raises(StateDictError,
                     match=r"embeddings\.position_embeddings.*\(1, 10, 32\).*\(1, 17, 32\)"):
    hfe.params_from_hf("dinov2_reg", module, sd)


def test_missing_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hfe.load_hf_encoder(str(tmp_path))


def test_registry():
  assert canonical_encoder_name("Dinov2withNorm") == "dinov2_reg"
  assert canonical_encoder_name("SigLIP2wNorm") == "siglip2"
  assert canonical_encoder_name("MAEwNorm") == "mae"
  with pytest.raises(ValueError, match=r"unknown encoder 'clip'.*dinov2_reg.*mae.*siglip2"):
    build_encoder("clip")
  with pytest.raises(ValueError, match="no fields"):
    build_encoder("mae", bogus=1)
  toy = build_encoder("toy_vit", hidden_size=16, num_attention_heads=2)
  out = jax.eval_shape(lambda x: toy.init_with_output(jax.random.PRNGKey(0), x)[0],
                       jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  assert out.shape == (2, 64, 16)


def _dinov3(tmp_path_factory, seed, **kw):
  cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             image_size=16, patch_size=4, num_register_tokens=2, layerscale_value=0.5,
             attn_implementation="eager")
  cfg.update(kw)
  model = _randomise(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**cfg)), seed)
  folder = _save(model, tmp_path_factory.mktemp(f"dinov3_{seed}"), 16)
  _drop_final_affine(model.norm)
  return model, folder


@pytest.fixture(scope="module")
def dinov3(tmp_path_factory):
  # The release's layout: no key bias, plain GELU MLP, registers; pos_embed_rescale=2 (train only).
  return _dinov3(tmp_path_factory, 3)


def _dinov3_ref(model, x):
  with torch.no_grad():  # drop CLS + registers, as the RAE wrapper does
    return model(_nchw(x)).last_hidden_state[:, 1 + model.config.num_register_tokens:].numpy()


# 16: the config's size; 24x20: a non-default, non-square grid (RoPE from the actual grid).
@pytest.mark.parametrize("hw", [(16, 16), (24, 20)])
def test_dinov3_matches_hf(dinov3, hw):
  model, folder = dinov3
  enc = hfe.load_hf_encoder(str(folder))  # name inferred from model_type 'dinov3_vit'
  assert enc.name == "dinov3" and enc.input_size == 16
  assert enc.image_mean == tuple(MEAN) and enc.image_std == tuple(STD)
  x = _images((2, *hw, 3), 4)
  ref = _dinov3_ref(model, x)
  out = jax.jit(enc.module.apply)({"params": enc.params}, jnp.asarray(x))
  assert out.shape == ref.shape == (2, hw[0] // 4 * (hw[1] // 4), 32)
  assert rel_err(out, ref) <= 1e-5


def test_dinov3_swiglu_biases_no_registers_match_hf(tmp_path_factory):
  # The larger checkpoints' options: gated SiLU MLP, key bias on, no MLP bias, no registers.
  model, folder = _dinov3(tmp_path_factory, 5, use_gated_mlp=True, hidden_act="silu",
                          key_bias=True, mlp_bias=False, num_register_tokens=0, rope_theta=50.0)
  enc = hfe.load_hf_encoder(str(folder), "dinov3")
  x = _images((2, 20, 20, 3), 5)
  assert rel_err(jax.jit(enc.module.apply)({"params": enc.params}, jnp.asarray(x)),
                 _dinov3_ref(model, x)) <= 1e-5


def test_dinov3_names_round_trip_and_module_layout(dinov3):
  # Hub files name layers 'layer.{i}.', transformers>=5 modules 'model.layer.{i}.': both load to
  # the same params, and export writes the hub names back bit-exactly.
  model, folder = dinov3
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  hub = {k[len("model."):] if k.startswith("model.layer.") else k: v for k, v in sd.items()}
  module = build_encoder("dinov3", json.loads((folder / "config.json").read_text()))
  a, b = hfe.params_from_hf("dinov3", module, sd), hfe.params_from_hf("dinov3", module, hub)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
  back = hfe.params_to_hf("dinov3", module, a)
  assert "layer.1.mlp.down_proj.weight" in back and "layer.0.attention.k_proj.bias" not in back
  for k, v in back.items():
    np.testing.assert_array_equal(v, hub[k])
  del hub["layer.1.layer_scale2.lambda1"]
  with pytest.raises(StateDictError, match=r"missing key 'layer\.1\.layer_scale2\.lambda1'"):
    hfe.params_from_hf("dinov3", module, hub)


def test_dinov3_registry_and_config_sizes():
  assert canonical_encoder_name("dinov3_vit") == "dinov3"
  # DINOv3ViTConfig allows [h, w] sizes; square ones become ints, others are refused by name.
  assert hfe.square_sizes({"patch_size": [16, 16], "image_size": 224}, "c.json") == {
      "patch_size": 16, "image_size": 224}
  with pytest.raises(ValueError, match=r"c\.json: config\.json image_size=\[224, 256\]"):
    hfe.square_sizes({"image_size": [224, 256]}, "c.json")


def test_dinov3_through_the_config_builder(dinov3, tmp_path):
  # encoder.name='dinov3' + an HF folder through builders.build_rae, as every mode loads the RAE:
  # mean/std from the preprocessor, CLS + registers dropped, tokens = the wrapper's (at 24px,
  # a non-default size, after the RAE's (x - mean) / std).
  from rae_jax import presets
  from rae_jax.pipeline import builders
  model, folder = dinov3
  c = presets.base_config()
  c.encoder = presets.dinov3_b_encoder(input_size=24)
  c.encoder.update(path=str(folder), hidden_size=32, patch_size=4)
  c.decoder.update(patch_size=2, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                   decoder_num_attention_heads=2, decoder_intermediate_size=32)
  rae, variables = builders.build_rae(c, str(tmp_path), with_stats=False)
  assert rae.latent_shape == (6, 6, 32) and rae.image_size == 12
  assert (rae.image_mean, rae.image_std) == (tuple(MEAN), tuple(STD))
  x = np.random.default_rng(6).uniform(size=(2, 24, 24, 3)).astype(np.float32)
  z = jax.jit(rae.encode)(variables, jnp.asarray(x))
  ref = _dinov3_ref(model, ((x - np.array(MEAN)) / np.array(STD)).astype(np.float32))
  assert rel_err(np.asarray(z).reshape(2, 36, 32), ref) <= 1e-5
  assert jax.jit(rae.decode)(variables, z).shape == (2, 12, 12, 3)


def test_dinov3_normalize_false_keeps_final_affine(dinov3):
  model, folder = dinov3
  enc = hfe.load_hf_encoder(str(folder), "dinov3", normalize=False)
  sd = load_file(str(folder / "model.safetensors"))
  x = _images((2, 16, 16, 3), 7)
  ref = _dinov3_ref(model, x) * sd["norm.weight"] + sd["norm.bias"]
  assert rel_err(jax.jit(enc.module.apply)({"params": enc.params}, jnp.asarray(x)), ref) <= 1e-5


def test_one_record_per_encoder():
  """Every encoder's record is complete and consistent: its name table exists and covers the
  module's parameters, names / aliases / HF model types each point at one encoder, and the
  tables derived from the records (aliases, model types, diffusers types) agree with them."""
  from rae_jax.interop import diffusers_rae
  from rae_jax.interop import vit_names as vn
  from rae_jax.models import vit_encoders as ve
  names = list(ve.ENCODERS) + list(ve.ALIASES)
  assert len(names) == len(set(names)), names
  model_types = [t for spec in ve.ENCODERS.values() for t in spec.hf_model_types]
  assert len(model_types) == len(set(model_types)), model_types
  for name, spec in ve.ENCODERS.items():
    assert spec.name_table in hfe.NAME_TABLES and spec.probe_key, name
    for alias in spec.aliases:
      assert ve.encoder_spec(alias) is spec
    for t in spec.hf_model_types:
      assert hfe.infer_encoder_name({"model_type": t}) == name
    assert diffusers_rae.ENCODER_TYPES.get(name) == spec.diffusers_type
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64, patch_size=8, image_size=16)
    module = ve.build_encoder(name, small)
    vn.check_table(hfe.encoder_table(name, module), hfe.param_shapes(module, 16), name)
  with pytest.raises(ValueError, match="unknown encoder 'clip'"):
    ve.encoder_spec("clip")
