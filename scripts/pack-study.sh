#!/usr/bin/env bash
# Packs a study directory for the trip back from the GPU machine, within the device tool's
# limits (at most 8 files of 16 MiB in $OUT): the configuration and every stage's
# record.json (all that `merge` needs to rebuild results and report), with results.json,
# report.md, plots/ and cells/ when present, in one small archive, and the
# checkpoints (with their manifests and resume points) in archives split at 15 MiB.
# Usage: bash scripts/pack-study.sh STUDY_DIR OUT_DIR [--records-only]
# Unpack here with: cat OUT/study-checkpoints.tgz.* | tar xzf - ; tar xzf OUT/study-records.tgz
set -euo pipefail
dir=$1; out=$2; mode=${3:-all}
mkdir -p "$out"
( cd "$dir" && find . \( -name record.json -o -name study.json -o -name results.json \
    -o -name report.md -o -path './plots/*' -o -path './cells/*' \) -type f | sort ) > /tmp/records.list
tar czf "$out/study-records.tgz" -C "$dir" -T /tmp/records.list
if [ "$mode" != "--records-only" ]; then
  ( cd "$dir" && find cache -name '*.safetensors' -o -name 'model.json' | sort ) > /tmp/ckpt.list
  tar czf - -C "$dir" -T /tmp/ckpt.list | split -b 15M -d -a 1 - "$out/study-checkpoints.tgz."
fi
ls -la "$out"
