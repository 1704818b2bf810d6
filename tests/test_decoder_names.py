"""Decoder name map: exact round trip, full-size manifest equality, clear errors."""
import json

import jax
import numpy as np
import pytest

from rae_jax.interop import decoder_names as dn
from rae_jax.interop.common import StateDictError
from rae_jax.interop.hf_encoders import read_tensors
from rae_jax.models.decoder import decoder_from_hf_config

XL_CONFIG = {  # /work/ref_rae/configs/decoder/ViTXL/config.json (the fields the decoder reads)
    "decoder_hidden_size": 1152, "decoder_intermediate_size": 4096,
    "decoder_num_attention_heads": 16, "decoder_num_hidden_layers": 28, "hidden_act": "gelu",
    "hidden_size": 768, "layer_norm_eps": 1e-12, "num_channels": 3, "qkv_bias": True,
    "patch_size": "SHOULD BE RELOADED",
}


def _tiny(ref_dir):
  cfg = json.loads((ref_dir / "decoder_tiny.json").read_text())
  dec = decoder_from_hf_config(cfg["config"], num_patches=cfg["num_patches"])
  return dec, read_tensors(ref_dir / "decoder_tiny.weights.safetensors")


def test_round_trip_is_exact(ref_dir, tmp_path):
  dec, sd = _tiny(ref_dir)
  params = dn.from_state_dict(dec, sd)
  back = dn.to_state_dict(dec, params)
  assert set(back) == set(sd)
  for k in sd:
    assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape, k
    assert np.array_equal(back[k], sd[k]), k
  # and through torch.save / torch.load as the official model.pt
  dn.save_decoder_state_dict(dec, params, tmp_path / "model.pt")
  again = dn.load_decoder_params(dec, tmp_path / "model.pt")
  for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(params)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_xl_manifest(ref_dir):
  # The RAE wrapper sets hidden_size to the encoder width (DINOv2-B: 768), patch 16, 256 patches.
  dec = decoder_from_hf_config(XL_CONFIG, hidden_size=768, patch_size=16, num_patches=256)
  want = {k: tuple(v) for k, v in
          json.loads((ref_dir / "decoder_vitxl_dinov2b.state_dict.json").read_text()).items()}
  assert dn.state_dict_shapes(dec) == want


def test_wrong_shape_names_key_and_shapes(ref_dir):
  dec, sd = _tiny(ref_dir)
  bad = dict(sd)
  bad["decoder_layers.1.intermediate.dense.weight"] = np.zeros((65, 32), np.float32)
  with pytest.raises(StateDictError, match=r"decoder_layers\.1\.intermediate\.dense\.weight.*"
                     r"\(65, 32\).*\(64, 32\)"):
    dn.from_state_dict(dec, bad)


def test_missing_and_unexpected_keys(ref_dir):
  dec, sd = _tiny(ref_dir)
  missing = {k: v for k, v in sd.items() if k != "decoder_norm.bias"}
  with pytest.raises(StateDictError, match="decoder_norm.bias"):
    dn.from_state_dict(dec, missing)
  with pytest.raises(StateDictError, match="mask_token"):
    dn.from_state_dict(dec, {**sd, "mask_token": np.zeros((1, 1, 32), np.float32)})
