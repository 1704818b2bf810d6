"""Sampling / eval: DiTDH-XL 256px with classifier-free guidance, Euler 50 steps.

Official configs/stage2/sampling/ImageNet256/DiTDHXL-DINOv2-B.yaml ships scale 1.0 (no guidance:
paper gFID-50k 1.51, and scale 1 costs no extra forward here). Raise the scale and narrow the
guidance interval from the command line, e.g.
  --config.guidance.scale=1.5 --config.guidance.t_min=0.0 --config.guidance.t_max=0.7

  python main.py --config=configs/sample_ditdh_xl_256_cfg.py --workdir=$W --mode=eval
"""
from rae_jax import presets


def get_config():
  c = presets.base_config()
  c.model = presets.ditdh_xl()
  c.transport.time_dist_type = "uniform"
  c.guidance.method = "cfg"
  c.guidance.scale = 1.0
  return c
