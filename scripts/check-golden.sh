#!/bin/bash
# Sanity checks of a finished golden checkpoint, each result (with its manifest) written to
# golden/checkpoints/checks/<name>-<check>.json and summarized on stdout:
#   clean accuracy on all 10,000 test images (`eval`);
#   PTQ on all test images, PWLQ and uniform, at w8a8 (within 0.5 pp of FP expected),
#   w4a8, w4a4 and w3a8 (PWLQ at least as accurate as uniform expected at ≤ 4-bit weights);
#   robust only: PGD-10 (ε 8/255, step 2/255) on all 10,000 test images, and APGD-CE (100
#   iterations) and Square (5,000 queries) at 8/255 on a seeded, stratified 1,000.
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
if [ "$n" = robust ]; then
  "$BIN" attack --device cpu --data "$DATA" --checkpoint "$ck" --attacks pgd --steps 10 \
    --eps 8/255 --n 10000 --out "$out/$n-pgd10-10k.json"
  "$BIN" attack --device cpu --data "$DATA" --checkpoint "$ck" --attacks apgd-ce,square \
    --eps 8/255 --n 1000 --seed 0 --out "$out/$n-apgd-square-1k.json"
fi
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
for p in sorted(glob.glob(f"{out}/{n}-pgd10-*.json") + glob.glob(f"{out}/{n}-apgd-*.json")):
    rep = json.load(open(p))["report"]
    for a in rep["attacks"] + ([dict(attack="worst case", per_eps=rep["worst_case"])] if len(rep["attacks"]) > 1 else []):
        for e in a["per_eps"]:
            lo, hi = e["ci95"]
            print(f"  {a['attack']} eps {255*e['eps']:.0f}/255: "
                  f"{100*e['accuracy']:.2f}% ({e['correct']}/{e['total']}, 95% CI {100*lo:.1f}-{100*hi:.1f})")
PY
