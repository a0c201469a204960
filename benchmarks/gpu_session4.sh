#!/usr/bin/env bash
# Last device call of session 4: finish the tuning left by the earlier calls (selection_fwd
# at 128k for the query-batched specs, small-group at 1k, 8k for three specs; RESUME=DIR
# holds the earlier call's db.tar.gz and data.tar.gz), then benchmark against the baselines
# with the resulting DB: the forward at 8k, 16k and 32k, forward + backward at 64k.
# Usage: RESUME=DIR [TUNE_S=290] bash benchmarks/gpu_session4.sh
set -o pipefail
source "$(dirname "$0")/device_env.sh"
TUNE_S=${TUNE_S:-290}
SECONDS=0
STEPS=tune KERNELS=selection_fwd SEQLENS=131072 TRIALS=6 JOBS=12 BUDGET_S=110 \
  bash "$(dirname "$0")/gpu_tune_all.sh" mqa small-group > /dev/null
mkdir -p /tmp/r && mv "$OUT/db.tar.gz" "$OUT/data.tar.gz" /tmp/r/
STEPS=tune SEQLENS=1024 TRIALS=5 JOBS=12 BUDGET_S=60 RESUME=/tmp/r \
  bash "$(dirname "$0")/gpu_tune_all.sh" small-group > /dev/null
mv "$OUT/db.tar.gz" "$OUT/data.tar.gz" /tmp/r/
STEPS=tune SEQLENS=8192 TRIALS=4 JOBS=12 BUDGET_S=$((TUNE_S - SECONDS)) RESUME=/tmp/r \
  bash "$(dirname "$0")/gpu_tune_all.sh" fla-compat small-group mqa > /dev/null
grep "T=\|skipped\|exit status" "$OUT/log.txt" | cut -c1-140
mkdir -p /tmp/final && tar -xzf "$OUT/db.tar.gz" -C /tmp/final
export NSA_GEN_DB=/tmp/final/db NSA_GEN_LOG=ERROR
timeout 90 python3 cli.py bench deepseek-nsa fla-compat small-group --seqlens 8192 16384 32768 \
  --out /tmp/bench/fwd 2>&1 | quiet | tail -14
timeout $((590 - SECONDS)) python3 cli.py bench deepseek-nsa fla-compat small-group --seqlens 65536 \
  --backward --out /tmp/bench/bwd 2>&1 | quiet | tail -14
tar -czf "$OUT/bench.tar.gz" -C /tmp bench
ls -la "$OUT"
