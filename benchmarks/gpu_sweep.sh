#!/usr/bin/env bash
# One device call: run benchmarks/sweep.py on each PLAN given; output to $OUT/<plan>.json.
# Usage: bash benchmarks/gpu_sweep.sh PLAN.json...
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD TRITON_INTERPRET=0 NSA_GEN_CACHE_DIR=/tmp/nsa-cache PYTHONUNBUFFERED=1 NSA_GEN_LOG=ERROR
OUT=${OUT:-out}
mkdir -p "$OUT"
for plan in "$@"; do
  python3 benchmarks/sweep.py "$plan" --out "$OUT/$(basename "$plan")" 2>&1 \
    | grep -v "UserWarning\|warnings.warn"
done
