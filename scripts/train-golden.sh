#!/bin/bash
# Trains (or resumes) the golden full-precision checkpoints with the project's own `train`,
# on the full cifar10-jpeg training split, evaluated on all 10,000 test images every epoch:
#   natural: the default recipe (STUDY.md: 30 epochs, one-cycle, peak 0.1, batch 128, seed 0)
#   robust:  PGD-AT, eps 8/255, step 2/255, 5 steps, 15 epochs, otherwise the same
# Runs in chunks across sessions: the resume points live in golden/checkpoints/in-progress/
# (commit them when a session must stop; this script picks them up). A finished checkpoint
# is moved to golden/checkpoints/<name>.{safetensors,json} with its per-epoch log
# (<name>.log.json) and its resource usage (<name>.time.txt, GNU time -v).
#
# usage: scripts/train-golden.sh [natural|robust]...   (default: both, natural first)
# Start it in the background, niced:  nohup nice -n 10 scripts/train-golden.sh > LOG 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${QR_BIN:-target/release/quant-robust}
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
# The run keeps its own copy of the binary: rebuilding while it trains does not touch it.
WORK=runs/golden-train
mkdir -p "$WORK" golden/checkpoints/in-progress
cp "$BIN" "$WORK/quant-robust"
BIN=$WORK/quant-robust
DATA=${QR_DATA:-../shared/data/cifar10-jpeg.tar.gz}

args_of() {
  case $1 in
    natural) echo "" ;;
    robust) echo "--adv pgd --adv-eps 8/255 --adv-step 2/255 --adv-steps 5 --epochs 15" ;;
    *) echo "unknown checkpoint $1 (natural or robust)" >&2; exit 2 ;;
  esac
}

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(natural robust)
for n in "${names[@]}"; do
  {
    final=golden/checkpoints/$n.safetensors
    if [ -f "$final" ]; then echo "$final exists: done"; continue; fi
    prog=golden/checkpoints/in-progress/$n
    cmd="quant-robust train --device cpu --data $DATA $(args_of "$n") --checkpoint $prog.safetensors --out $prog.log.json"
    if [ -f "$prog.train.safetensors" ]; then
      cmd="quant-robust train --device cpu --data $DATA --resume $prog.safetensors --out $prog.log.json"
    fi
    echo "$(date -u +%FT%TZ) $cmd" | tee -a "$prog.commands.txt"
    # shellcheck disable=SC2086
    /usr/bin/time -v -a -o "$prog.time.txt" "$BIN" ${cmd#quant-robust }
    for ext in safetensors json log.json time.txt commands.txt; do
      mv "$prog.$ext" "golden/checkpoints/$n.$ext"
    done
    rm -f "$prog.train.safetensors"
    sha256sum "golden/checkpoints/$n.safetensors" | tee "golden/checkpoints/$n.sha256"
  }
done
