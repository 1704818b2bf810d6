"""Side by side with the official PyTorch code on this machine, in one run. Prints a table.

  git clone https://github.com/bytetriper/RAE /tmp/RAE    # never copied into this repo
  python bench/compare_official.py --official_src=/tmp/RAE/src

Rows (same shapes, float32, random weights: timing does not depend on them):
  DiTDH-S train step  batch --batch: forward, flow-matching loss, backward, clip 1.0, AdamW.
  DiTDH-S forward     batch --batch.
  Euler+CFG sampling  --num_images latents, --steps Euler steps of the CFG model (scale 1.5,
                      batch doubled), as the official Sampler's fixed-grid Euler; decode not
                      included (see --decoder below).
  data loading        bench/data.py's ours vs official-equivalent DataLoader, 256px JPEGs.
The official side imports DiTwDDTHead from --official_src. Its few third-party imports that do
not install beside this venv's torch build (timm -> torchvision) are stubbed in a temporary
folder: timm's PatchEmbed (conv + flatten) and Mlp (fc-act-fc), the classes it uses.
Not measured here (need torchvision's VGG16 / pytorch-fid, which do not import beside this
torch): the stage-1 decoder step with LPIPS + GAN and Inception pool3 features; the table says so.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

S = dict(hidden_size=(384, 2048), depth=(12, 2), num_heads=(6, 16))
COMMON = dict(input_size=16, patch_size=1, in_channels=768, mlp_ratio=4.0,
              class_dropout_prob=0.1, num_classes=1000, use_qknorm=False, use_swiglu=True,
              use_rope=True, use_rmsnorm=True, wo_shift=False, use_pos_embed=True)

TIMM_STUB = '''
import torch
from torch import nn


class PatchEmbed(nn.Module):
  def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None,
               flatten=True, bias=True, **kw):
    super().__init__()
    img = img_size if isinstance(img_size, tuple) else (img_size, img_size)
    p = patch_size if isinstance(patch_size, tuple) else (patch_size, patch_size)
    self.img_size, self.patch_size = img, p
    self.grid_size = (img[0] // p[0], img[1] // p[1])
    self.num_patches = self.grid_size[0] * self.grid_size[1]
    self.flatten = flatten
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=p, stride=p, bias=bias)
    self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

  def forward(self, x):
    x = self.proj(x)
    if self.flatten:
      x = x.flatten(2).transpose(1, 2)
    return self.norm(x)


class Mlp(nn.Module):
  def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU,
               norm_layer=None, bias=True, drop=0.0, **kw):
    super().__init__()
    hidden_features = hidden_features or in_features
    out_features = out_features or in_features
    self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
    self.act = act_layer()
    self.drop1 = nn.Dropout(drop)
    self.norm = norm_layer(hidden_features) if norm_layer else nn.Identity()
    self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
    self.drop2 = nn.Dropout(drop)

  def forward(self, x):
    return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Attention(nn.Module):  # imported by model_utils, unused by the stage-2 models
  pass
'''


def median_time(fn, repeats, warmup=True):
  if warmup:
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def official_model(src):
  try:
    import timm.models.vision_transformer  # noqa: F401  pylint: disable=g-import-not-at-top
  except Exception:  # pylint: disable=broad-except
    stub = tempfile.mkdtemp(prefix="rae_official_stubs_")
    os.makedirs(os.path.join(stub, "timm", "models"))
    for d in ("timm", os.path.join("timm", "models")):
      open(os.path.join(stub, d, "__init__.py"), "w").close()
    with open(os.path.join(stub, "timm", "models", "vision_transformer.py"), "w") as f:
      f.write(TIMM_STUB)
    sys.path.insert(0, stub)
  sys.path.insert(0, os.path.abspath(src))
  from stage2.models.DDT import DiTwDDTHead  # pylint: disable=g-import-not-at-top
  return DiTwDDTHead(**COMMON, **{k: list(v) for k, v in S.items()})


def torch_rows(args):
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = official_model(args.official_src)
  b = args.batch
  x = torch.randn(b, 768, 16, 16)
  y = torch.randint(0, 1000, (b,))
  opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0)

  def train_step():
    model.train()
    t = torch.sigmoid(torch.randn(b))
    noise = torch.randn_like(x)
    te = t.view(-1, 1, 1, 1)
    loss = ((model(te * x + (1 - te) * noise, t, y) - (x - noise)) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  def forward():
    with torch.no_grad():
      model.eval()
      model(x, torch.full((b,), 0.5), y)

  n = args.num_images
  z0 = torch.randn(n, 768, 16, 16)
  yc = torch.randint(0, 1000, (n,))

  def sample():
    with torch.no_grad():
      model.eval()
      z = torch.cat([z0, z0])
      yy = torch.cat([yc, torch.full_like(yc, 1000)])
      ts = torch.linspace(0.0, 1.0, args.steps + 1)
      for i in range(args.steps):
        v = model.forward_with_cfg(z, ts[i].expand(2 * n), yy, 1.5)
        z = z + (ts[i + 1] - ts[i]) * v
  out = {"train": median_time(train_step, args.repeats),
         "forward": median_time(forward, args.repeats)}
  print(f"official: train {out['train']:.2f} s, forward {out['forward']:.2f} s", flush=True)
  out["sample"] = median_time(sample, 1, warmup=False)  # eager PyTorch: nothing to warm up
  print(f"official: sampling {out['sample']:.2f} s", flush=True)
  return out


def jax_rows(args):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from rae_jax.diffusion import sampling, transport  # pylint: disable=g-import-not-at-top
  from rae_jax.models.ditdh import DiTDH  # pylint: disable=g-import-not-at-top
  model = DiTDH(**COMMON, **S)
  b = args.batch
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (b, 16, 16, 768))
  y = jax.random.randint(k[1], (b,), 0, 1000)
  params = jax.jit(model.init)(k[2], x[:1], jnp.zeros((1,)), y[:1])["params"]
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(2e-4, 0.9, 0.95, weight_decay=0.0))
  opt = tx.init(params)

  @jax.jit
  def train_step(params, opt, key):
    kt, kn, kd = jax.random.split(key, 3)
    t = jax.nn.sigmoid(jax.random.normal(kt, (b,)))
    noise = jax.random.normal(kn, x.shape)
    te = t[:, None, None, None]

    def loss_fn(p):
      out = model.apply({"params": p}, te * x + (1 - te) * noise, t, y, train=True,
                        rngs={"label_dropout": kd})
      return jnp.mean((out - (x - noise)) ** 2)
    grads = jax.grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  fwd = jax.jit(lambda p: model.apply({"params": p}, x, jnp.full((b,), 0.5), y))
  n = args.num_images
  z0 = jax.random.normal(k[3], (n, 16, 16, 768))
  yc = jax.random.randint(k[1], (n,), 0, 1000)
  tr = transport.create_transport()

  @jax.jit
  def sample(params):
    def model_fn(z, t):
      zz = jnp.concatenate([z, z])
      yy = jnp.concatenate([yc, jnp.full_like(yc, 1000)])
      tt = jnp.broadcast_to(t, (n,))
      out = model.apply({"params": params}, zz, jnp.concatenate([tt, tt]), yy)
      cond, uncond = jnp.split(out, 2)
      return uncond + 1.5 * (cond - uncond)
    return sampling.sample_ode(tr, model_fn, z0, sampling_method="euler",
                               num_steps=args.steps + 1)

  state = [params, opt]

  def step():
    state[0], state[1] = train_step(state[0], state[1], k[0])
    jax.block_until_ready(state[0])
  out = {"train": median_time(step, args.repeats),
         "forward": median_time(lambda: jax.block_until_ready(fwd(params)), args.repeats)}
  print(f"rae-jax: train {out['train']:.2f} s, forward {out['forward']:.2f} s", flush=True)
  compiled = sample.lower(params).compile()  # compile outside the timed run
  out["sample"] = median_time(lambda: jax.block_until_ready(compiled(params)), 1, warmup=False)
  print(f"rae-jax: sampling {out['sample']:.2f} s", flush=True)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--official_src", required=True, help="the official repo's src/ folder")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--num_images", type=int, default=8)
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--data_workers", type=int, default=2)
  ap.add_argument("--skip_data", action="store_true")
  args = ap.parse_args()
  if not os.path.isfile(os.path.join(args.official_src, "stage2", "models", "DDT.py")):
    raise SystemExit(f"--official_src={args.official_src!r} has no stage2/models/DDT.py: pass the "
                     "official repo's src/ folder")
  import platform  # pylint: disable=g-import-not-at-top
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
  ref = torch_rows(args)
  ours = jax_rows(args)
  rows = [(f"DiTDH-S train step, batch {args.batch}", "train"),
          (f"DiTDH-S forward, batch {args.batch}", "forward"),
          (f"{args.steps}-step Euler + CFG, {args.num_images} latents (no decode)", "sample")]
  print("\n| benchmark (fp32, CPU) | official PyTorch | rae-jax | speed-up |\n|---|---|---|---|")
  for name, key in rows:
    print(f"| {name} | {ref[key]:.2f} s | {ours[key]:.2f} s | {ref[key] / ours[key]:.2f}x |")
  if not args.skip_data:
    import data as data_bench  # pylint: disable=g-import-not-at-top  (bench/data.py)
    folder = os.path.join(tempfile.gettempdir(), "rae_bench_jpegs", "images")
    data_bench.make_jpegs(folder, 500)
    d_ours = data_bench.bench_ours(folder, args.data_workers, 64, 6, 256)
    d_ref = data_bench.bench_official(folder, args.data_workers, 64, 6, 256)
    print(f"| 256px JPEG loading, {args.data_workers} workers (img/s) | {d_ref:.0f} | "
          f"{d_ours:.0f} | {d_ours / d_ref:.2f}x |")
  print("| stage-1 decoder step, LPIPS + GAN | not measured: official LPIPS needs torchvision's "
        "VGG16 | | |")
  print("| Inception pool3 (vs pytorch-fid) | not measured: pytorch-fid needs torchvision | | |")


if __name__ == "__main__":
  main()
