#!/usr/bin/env bash
# The official PyTorch side's extra packages, installed into a folder OUTSIDE the repo and outside
# this venv (bench/compare_official.py puts it on the official worker's sys.path only), so the
# project and its tests keep running without them.
#   bash bench/official_env.sh [/tmp/rae-official-env]
# torchvision is the build matching the installed torch (torch 2.M <-> torchvision 0.(M+15)),
# installed --no-deps so it cannot replace torch; its compiled ops do not load against a CPU-only
# torch, which the benchmark works around (it only needs the pure-Python models).
set -euo pipefail
TARGET="${1:-/tmp/rae-official-env}"
PY="${PYTHON:-python}"
TV="$("$PY" -c 'import torch; m = int(torch.__version__.split(".")[1]); print(f"0.{m + 15}.0")')"
"$PY" -m pip install --quiet --no-deps --target "$TARGET" \
  "torchvision==$TV" "pytorch-fid==0.3.0" torchdiffeq timm omegaconf "antlr4-python3-runtime==4.9.3"
echo "official env ready in $TARGET (torchvision $TV)"
