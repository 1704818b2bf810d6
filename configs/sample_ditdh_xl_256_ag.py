"""Sampling / eval: DiTDH-XL 256px with autoguidance (DiTDH-S guide, scale 1.42), Euler 50 steps.

Official configs/stage2/sampling/ImageNet256/DiTDHXL-DINOv2-B_AG.yaml; paper gFID-50k 1.13.
Import the official releases first (stage2_model.pt of XL and of the S guide, decoder, stat.pt):

  python main.py --config=configs/sample_ditdh_xl_256_ag.py --workdir=$W --mode=import_torch \
      --config.interop.stage2_model=.../DiTDH-XL/stage2_model.pt \
      --config.interop.guide_model=.../DiTDH-S_ep14/stage2_model.pt \
      --config.interop.decoder=.../ViTXL_n08/model.pt --config.interop.stats=.../stat.pt
  python main.py --config=configs/sample_ditdh_xl_256_ag.py --workdir=$W --mode=eval
"""
from rae_jax import presets


def get_config():
  c = presets.base_config()
  c.model = presets.ditdh_xl()
  c.transport.time_dist_type = "uniform"
  c.guidance.method = "autoguidance"
  c.guidance.scale = 1.42
  c.guidance.guide_model = presets.ditdh_s()
  return c
