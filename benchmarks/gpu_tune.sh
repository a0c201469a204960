#!/usr/bin/env bash
# One device call: tune KERNELS of each SPEC at SEQLENS into $OUT/db, then benchmark with it.
# Usage: bash benchmarks/gpu_tune.sh KERNELS SEQLENS TRIALS BENCH_SEQLENS SPEC...
set -o pipefail
source "$(dirname "$0")/device_env.sh"
kernels=$1 seqlens=$2 trials=$3 bench=$4; shift 4
cp -r tuning_db "$OUT/db"
for spec in "$@"; do
  python3 cli.py tune "$spec" --kernels "$kernels" --seqlens "$seqlens" --trials "$trials" \
    --db "$OUT/db" --timeout 60 --no-progress 2>&1 | tee -a "$OUT/tune.txt"
done
export NSA_GEN_DB=$OUT/db
python3 cli.py bench "$@" --seqlens $bench --out "$OUT/bench" 2>&1 | grep -v "no tuned config\|UserWarning\|scaled_dot_product" | tee "$OUT/bench.txt"
