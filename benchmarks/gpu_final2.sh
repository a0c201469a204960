#!/usr/bin/env bash
# One device call (session 2): bf16 verification of every kernel and the composed op,
# forward and forward+backward benchmark against the baselines, leave-one-shape-out check
# of the shipped DB, then a short tuning of deepseek-nsa's slowest kernels at 64k with what
# is left. Each step has its own limit; 8 files come back in $OUT (the most the device returns).
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=ERROR
gpu_info
timeout 170 python3 cli.py verify deepseek-nsa fla-compat small-group mqa -T 2048 2>&1 | quiet > "$OUT/verify.txt"
tail -3 "$OUT/verify.txt"
timeout 280 python3 cli.py bench deepseek-nsa fla-compat small-group --seqlens 16384 65536 --backward \
  --out "$OUT/bench" 2>&1 | quiet | tail -30
timeout 50 python3 benchmarks/tune_evidence.py --db tuning_db --loo --out "$OUT/loo" 2>&1 | quiet | tail -5
cp -r tuning_db "$OUT/db"
timeout 100 python3 cli.py tune deepseek-nsa --kernels topn,compression_bwd,selection_bwd --seqlens 65536 \
  --trials 6 --db "$OUT/db" --jobs 8 --timeout 60 --no-progress 2>&1 | quiet | tail -8
tar -czf "$OUT/db.tar.gz" --exclude='.*.lock' -C "$OUT" db && rm -rf "$OUT/db"
ls -R "$OUT"
