#!/usr/bin/env bash
# On the GPU machine: unpacks the CUDA binary carried in .device/ and runs it with the
# carried data as the default. Usage (in a `device` call, carrying .device):
#   bash scripts/gpu-run.sh train --device cuda --epochs 3 --checkpoint $OUT/m.safetensors
#   bash scripts/gpu-run.sh reproduce --preset fast --device cuda --out runs/study-fast \
#       --time-budget 420; bash scripts/pack-study.sh runs/study-fast $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=/tmp/quant-robust
if [ ! -x "$BIN" ] || [ .device/quant-robust.xz -nt "$BIN" ]; then
  xz -dc .device/quant-robust.xz > "$BIN"
  chmod +x "$BIN"
fi
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
cmd=$1; shift
# Commands that read data get the carried archive unless the arguments name --data.
has_data=no
for a in "$@"; do case "$a" in --data|--data=*) has_data=yes ;; esac; done
case "$cmd" in
  train|eval|attack|ptq|qat|reproduce)
    if [ "$has_data" = no ]; then
      exec "$BIN" "$cmd" --data .device/data/cifar10-jpeg.tar.gz "$@"
    fi
    exec "$BIN" "$cmd" "$@" ;;
  *) exec "$BIN" "$cmd" "$@" ;;
esac
