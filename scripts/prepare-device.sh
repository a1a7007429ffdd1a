#!/usr/bin/env bash
# Puts what a GPU-machine call needs into .device/ (ignored by git; name it in `carry`):
#   .device/quant-robust.xz           (from scripts/build-cuda.sh)
#   .device/data/cifar10-jpeg.tar.gz  (../shared does not travel)
#   .device/pytorch_baseline.py       (PyTorch on the same card, for same-call ratios)
#   plus any checkpoints given as arguments, under .device/checkpoints/.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .device/quant-robust.xz ] || { echo "run scripts/build-cuda.sh first" >&2; exit 1; }
mkdir -p .device/data .device/checkpoints
cp ../shared/data/cifar10-jpeg.tar.gz .device/data/
cp ../shared/bench/pytorch_baseline.py .device/ 2>/dev/null || true
for c in "$@"; do
  cp "$c" .device/checkpoints/
  for side in "${c%.safetensors}.json" "${c%.safetensors}.train.safetensors"; do
    [ -f "$side" ] && cp "$side" .device/checkpoints/
  done
done
du -sh .device
