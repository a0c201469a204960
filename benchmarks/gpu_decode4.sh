#!/usr/bin/env bash
# Device call 4 (session 16): decode tuning at T = 64k for B = 64 and B = 1, the decode
# benchmark with the tuned DB, and fla-compat's forward + backward at 64k (not measured
# since session 15's compress_mean backward fix).
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=ERROR
gpu_info
for B in 64 1; do for S in deepseek-nsa small-group fla-compat; do
  timeout 70 python3 cli.py tune $S --kernels decode_select,decode_attend --seqlens 65536 --batch $B \
    --trials 10 --db tuning_db --jobs 8 --timeout 60 --no-progress 2>&1 | quiet | grep "T=65536"
done; done
tar -czf "$OUT/db.tar.gz" --exclude='.*.lock' tuning_db
timeout 200 python3 cli.py bench deepseek-nsa fla-compat small-group --seqlens 8192 65536 --decode 1 8 64 \
  --out "$OUT/bench" 2>&1 | quiet | tail -22
timeout 150 python3 cli.py bench fla-compat --seqlens 65536 --backward --no-baselines \
  --out "$OUT/bench_fb" 2>&1 | quiet | tail -8
