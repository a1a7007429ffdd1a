#!/usr/bin/env bash
# Builds the CUDA binary of quant-robust on a machine with no GPU and no CUDA toolkit
# (../shared/docs/GPU.md), and packs it for the GPU machine:
#   .device/quant-robust.xz   the stripped binary, xz-compressed (~6 MB)
#
# - nvcc 13.0 comes from PyPI wheels into .cuda/toolkit (ignored by git);
# - candle-core is patched, for this build only, to load the CUDA libraries at run time
#   (cudarc "dynamic-loading" instead of "dynamic-linking"): a copy of the registry crate
#   with that one word changed, in .cuda/candle-core, applied with --config patch;
# - the binary targets sm_90 (H100/H200) and looks for cuBLAS/cuRAND/NVRTC in
#   /usr/local/cuda at run time (rpath).
# The CPU build and CI never run this. Output goes to target/cuda (its own target dir).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CUDA_DIR=$ROOT/.cuda
TK=$CUDA_DIR/toolkit
CH=$TK/nvidia/cu13
COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

if [ ! -x "$CH/bin/nvcc" ]; then
  echo "installing nvcc 13.0 from PyPI into $TK" >&2
  python3 -m pip install --quiet --no-deps --target "$TK" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
[ -e "$CH/lib64" ] || ln -s lib "$CH/lib64"
# cicc and libdevice live in nvvm/ of the nvvm wheel; nvcc expects them beside bin/.
mkdir -p "$CUDA_DIR/link"
ln -sf "$CH/lib/libcudart_static.a" "$CUDA_DIR/link/libcudart.a"

# The patched candle-core copy.
cargo fetch --quiet
CORE_SRC=$(cargo metadata --format-version 1 --quiet | python3 -c '
import json, sys, os
m = json.load(sys.stdin)
p = [p for p in m["packages"] if p["name"] == "candle-core"][0]
print(os.path.dirname(p["manifest_path"]))')
PATCHED=$CUDA_DIR/candle-core
if [ ! -f "$PATCHED/.patched-from" ] || [ "$(cat "$PATCHED/.patched-from")" != "$CORE_SRC" ]; then
  rm -rf "$PATCHED"
  cp -r "$CORE_SRC" "$PATCHED"
  sed -i 's/"dynamic-linking"/"dynamic-loading"/' "$PATCHED/Cargo.toml"
  grep -q '"dynamic-loading"' "$PATCHED/Cargo.toml" || { echo "patching candle-core failed" >&2; exit 1; }
  echo "$CORE_SRC" > "$PATCHED/.patched-from"
fi

export CUDA_HOME=$CH CUDA_PATH=$CH CUDA_ROOT=$CH CUDA_TOOLKIT_ROOT_DIR=$CH
export PATH=$CH/bin:$PATH NVCC=$CH/bin/nvcc
export CUDA_COMPUTE_CAP=$COMPUTE_CAP CUDARC_CUDA_VERSION=13000
export RUSTFLAGS="-L native=$CUDA_DIR/link -C link-arg=-Wl,-rpath,/usr/local/cuda/lib64 -C link-arg=-Wl,-rpath,/usr/local/cuda/targets/x86_64-linux/lib"

# The patch rewrites Cargo.lock's source of candle-core: keep the tracked lock file as it is.
cp Cargo.lock "$CUDA_DIR/Cargo.lock.orig"
trap 'cp "$CUDA_DIR/Cargo.lock.orig" Cargo.lock' EXIT
cargo --config "patch.crates-io.candle-core.path=\"$PATCHED\"" build --release \
  --features cuda --target-dir target/cuda --bin quant-robust

mkdir -p .device
strip -o .device/quant-robust target/cuda/release/quant-robust
xz -6 -f -T2 .device/quant-robust
ls -la .device/quant-robust.xz
echo "CUDA binary: .device/quant-robust.xz (run it on the GPU machine with scripts/gpu-run.sh)"
