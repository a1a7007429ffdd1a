#!/bin/bash
# Sanity checks of a finished golden checkpoint, each result (with its manifest) written to
# golden/checkpoints/checks/<name>-<check>.json and summarized on stdout:
#   clean accuracy on all 10,000 test images (`eval`);
#   PTQ on all test images, PWLQ and uniform, at w8a8 (within 0.5 pp of FP expected),
#   w4a8, w4a4 and w3a8 (PWLQ at least as accurate as uniform expected at ≤ 4-bit weights).
# usage: scripts/check-golden.sh natural|robust
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${QR_BIN:-target/release/quant-robust}
DATA=${QR_DATA:-../shared/data/cifar10-jpeg.tar.gz}
n=${1:?natural or robust}
ck=golden/checkpoints/$n.safetensors
[ -f "$ck" ] || { echo "$ck does not exist" >&2; exit 1; }
out=golden/checkpoints/checks
mkdir -p "$out"
# The quantized checkpoints themselves are not kept.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$BIN" eval --device cpu --data "$DATA" --checkpoint "$ck" --out "$out/$n-eval.json"
for bits in 8:8 4:8 4:4 3:8; do
  w=${bits%:*}; a=${bits#*:}
  for m in pwlq uniform; do
    "$BIN" ptq --device cpu --data "$DATA" --checkpoint "$ck" --method "$m" --wbits "$w" --abits "$a" \
      --out-checkpoint "$tmp/ptq.safetensors" --out "$out/$n-ptq-w${w}a${a}-$m.json"
  done
done
python3 - "$out" "$n" <<'PY'
import json, sys, glob, os
out, n = sys.argv[1], sys.argv[2]
def acc(p):
    r = json.load(open(p))
    for k in ("accuracy", "test_accuracy"):
        if k in r: return r[k]
    return r.get("clean", {}).get("accuracy")
print(f"{n}: clean {100*acc(f'{out}/{n}-eval.json'):.2f}%")
for p in sorted(glob.glob(f"{out}/{n}-ptq-*.json")):
    print(f"  {os.path.basename(p)[len(n)+1:-5]}: {100*acc(p):.2f}%")
PY
