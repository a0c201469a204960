#!/usr/bin/env bash
# One device call: run benchmarks/sweep.py on each PLAN given; output to $OUT/<plan>.json.
# Usage: bash benchmarks/gpu_sweep.sh PLAN.json...
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=ERROR
for plan in "$@"; do
  python3 benchmarks/sweep.py "$plan" --out "$OUT/$(basename "$plan")" 2>&1 \
    | grep -v "UserWarning\|warnings.warn"
done
