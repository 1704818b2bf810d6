#!/usr/bin/env bash
# Issue 15 on an accelerator, in one run: bf16 parity, fused-attention parity, DiTDH-XL train-step
# MFU and sampling images/s. Run from the repo root on a GPU (or TPU) host whose venv has a JAX
# that sees the accelerator (e.g. pip install "jax[cuda12]"):
#
#   bash bench/accelerator_check.sh [out_dir]        # ~5-10 min on one H100/H200
#
# Writes <out_dir>/*.txt (default ./accelerator_check) and prints a summary to paste into the
# README's benchmark section. Nothing here is asserted on timing; the parity checks fail loudly.
# Sizes: XL_BATCH (64), S1_BATCH (32), STEPS (10), SAMPLE_BATCH (64), SAMPLE_STEPS (50).
# ALLOW_CPU=1 runs the same plumbing on a CPU host (xla attention only; use tiny sizes, e.g.
# ALLOW_CPU=1 XL_BATCH=1 S1_BATCH=1 STEPS=1 SAMPLE_BATCH=1 SAMPLE_STEPS=2): a dry run of the script.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-accelerator_check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
unset JAX_PLATFORMS XLA_FLAGS  # the test conftest forces CPU only when these are unset there

BACKEND=$($PY -c 'import jax; print(jax.default_backend())')
KIND=$($PY -c 'import jax; print(jax.devices()[0].device_kind)')
echo "backend=$BACKEND device=$KIND" | tee "$OUT/device.txt"
STEPS=${STEPS:-10}
if [[ "$BACKEND" == "cpu" && "${ALLOW_CPU:-0}" == "1" ]]; then
  IMPL=xla; PLAT=cpu; echo "ALLOW_CPU=1: dry run on the CPU (xla attention only)"
elif [[ "$BACKEND" != "gpu" && "$BACKEND" != "cuda" && "$BACKEND" != "tpu" ]]; then
  echo "No accelerator visible to JAX (backend=$BACKEND): install jax[cuda12] / jax[tpu]." >&2
  exit 2
else
  IMPL=cudnn; PLAT=cuda; [[ "$BACKEND" == "tpu" ]] && IMPL=splash && PLAT=tpu
fi

echo "== 1. fused attention vs xla on $KIND ($IMPL, bf16): forward, gradients, DiTDH-XL forward"
$PY - "$IMPL" <<'EOF' | tee "$OUT/attention_parity.txt"
import sys
import jax, jax.numpy as jnp, numpy as np
from rae_jax.models import attention
from rae_jax.models.ditdh import DiTDH
impl = sys.argv[1]
worst = 0.0
for b, n, h, d in [(8, 256, 16, 72), (8, 256, 16, 128), (4, 261, 12, 64), (2, 1024, 16, 128)]:
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = (jax.random.normal(kk, (b, n, h, d), jnp.bfloat16) for kk in ks)
  f = lambda impl: jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, impl=impl))
  o_f, o_x = f(impl)(q, k, v), f("xla")(q, k, v)
  ref = np.asarray(o_x, np.float32)
  err = float(np.abs(np.asarray(o_f, np.float32) - ref).max() / np.abs(ref).max())
  loss = lambda impl: jax.jit(jax.grad(lambda q, k, v: jnp.sum(
      attention.dot_product_attention(q, k, v, impl=impl).astype(jnp.float32) * g), (0, 1, 2)))
  gf, gx = loss(impl)(q, k, v), loss("xla")(q, k, v)
  gerr = max(float(np.abs(np.asarray(a, np.float32) - np.asarray(c, np.float32)).max() /
                   np.abs(np.asarray(c, np.float32)).max()) for a, c in zip(gf, gx))
  worst = max(worst, err, gerr)
  print(f"attention {impl} vs xla (B,N,H,D)=({b},{n},{h},{d}): fwd {err:.2e}, grads {gerr:.2e}")
x = jax.random.normal(jax.random.key(1), (8, 16, 16, 768))
t, y = jnp.linspace(0.1, 0.9, 8), jnp.arange(8)
xl = lambda impl: DiTDH(input_size=16, in_channels=768, dtype=jnp.bfloat16, attention_impl=impl)
params = jax.jit(xl("xla").init)(jax.random.key(2), x, t, y)
leaves, tree = jax.tree.flatten(params)  # random everywhere: zero-init heads would output 0
params = tree.unflatten([0.02 * jax.random.normal(jax.random.key(i), l.shape)
                         for i, l in enumerate(leaves)])
o_f = jax.jit(xl(impl).apply)(params, x, t, y)
o_x = jax.jit(xl("xla").apply)(params, x, t, y)
err = float(jnp.linalg.norm(o_f - o_x) / jnp.linalg.norm(o_x))
print(f"DiTDH-XL bf16 forward, {impl} vs xla: relative L2 {err:.2e}")
# bf16 rounding is 2^-9 ~ 2e-3 per op; two kernels summing in different orders differ by a few.
assert worst < 3e-2 and err < 3e-2, (worst, err)
print("PASS attention parity")
EOF

echo "== 2. bf16 precision tests on the accelerator (dtype audit, demo bf16 vs float32 <= 2%)"
JAX_PLATFORMS=$PLAT $PY -m pytest -q -p no:cacheprovider tests/test_precision.py 2>&1 \
  | tail -3 | tee "$OUT/precision_tests.txt"
if [[ -f tests/test_train_parity.py ]]; then  # the official trajectory replay, bf16 variant
  JAX_PLATFORMS=$PLAT $PY -m pytest -q -p no:cacheprovider tests/test_train_parity.py -k bfloat16 \
    2>&1 | tail -3 | tee "$OUT/train_parity_bf16.txt" || true
fi

echo "== 3. DiTDH-XL train step (256 tokens, bf16): xla vs $IMPL attention, FLOPs and MFU"
for impl in $(echo xla "$IMPL" | tr " " "\n" | sort -u); do
  $PY bench/train_step.py --rows=xl_step --dtype=bfloat16 --xl_batch=${XL_BATCH:-64} --steps=$STEPS \
    --attention_impl="$impl" 2>&1 | grep -v '^[IW][0-9]' | tee "$OUT/xl_step_$impl.txt"
done
$PY bench/train_step.py --rows=s_step --dtype=bfloat16 --batch=${XL_BATCH:-64} --steps=$STEPS 2>&1 \
  | grep -v '^[IW][0-9]' | tee "$OUT/s_step.txt"
$PY bench/train_step.py --rows=stage1_step --dtype=bfloat16 --s1_batch=${S1_BATCH:-32} --steps=$STEPS \
  2>&1 | grep -v '^[IW][0-9]' | tee "$OUT/stage1_step.txt" || true

echo "== 4. sampling: ${SAMPLE_STEPS:-50}-step Euler, DiTDH-XL, bf16, batch ${SAMPLE_BATCH:-64}"
$PY bench/sampling.py --model XL --batch "${SAMPLE_BATCH:-64}" --steps "${SAMPLE_STEPS:-50}" \
  --repeats 1 --dtype bfloat16 2>&1 \
  | grep -v '^[IW][0-9]' | tee "$OUT/sampling_xl.txt"

echo "== 5. host input pipeline (cores needed to feed the measured xl_step rate)"
RATE=$(grep -h 'images/s' "$OUT/xl_step_$IMPL.txt" | tail -1 | awk -F'|' '{print $4}' | tr -d ' ')
$PY bench/data.py --workers "$(nproc)" --step_rate "$($PY -c "print(${RATE:-0} / ${XL_BATCH:-64})")" \
  --global_batch "${XL_BATCH:-64}" 2>&1 | tee "$OUT/data.txt" || true

echo "== summary ($KIND)"
grep -h "PASS\|passed\|failed" "$OUT"/attention_parity.txt "$OUT"/precision_tests.txt || true
grep -h "| DiTDH-XL step\|| stage-1" "$OUT"/xl_step_*.txt "$OUT"/stage1_step.txt 2>/dev/null \
  | grep "step time\|images/s\|MFU" || true
grep -h "Euler total\|MFU\|latents / s" "$OUT/sampling_xl.txt" || true
