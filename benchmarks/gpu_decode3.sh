#!/usr/bin/env bash
# Device call 3 (session 16): decode after the one-pass decode_select. bf16/fp32 verification,
# the decode benchmark with default configs, then short tuning studies of the two decode
# kernels at T = 64k, B = 8 and 64, into $OUT/db (a copy of the shipped DB).
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=ERROR
gpu_info
timeout 150 python3 cli.py verify deepseek-nsa fla-compat small-group mqa -T 4096 -B 4 \
  --kernels decode_select decode_attend nsa_decode --dtype bfloat16 float32 2>&1 | quiet > "$OUT/verify.txt"
grep -c pass "$OUT/verify.txt"; grep -v pass "$OUT/verify.txt" | grep "^| [a-z]" | grep -v "| spec" | head
timeout 200 python3 cli.py bench deepseek-nsa fla-compat small-group --seqlens 8192 65536 --decode 1 8 64 \
  --out "$OUT/bench" 2>&1 | quiet | tail -22
cp -r tuning_db "$OUT/db"
for B in 64 8; do for S in deepseek-nsa small-group fla-compat; do
  timeout 75 python3 cli.py tune $S --kernels decode_select,decode_attend --seqlens 65536 --batch $B \
    --trials 10 --db "$OUT/db" --jobs 8 --timeout 60 --no-progress 2>&1 | quiet | grep -v "^$" | tail -4
done; done
tar -czf "$OUT/db.tar.gz" --exclude='.*.lock' -C "$OUT" db && rm -rf "$OUT/db"
