#!/usr/bin/env bash
# Device call (session 16): decode on the H200. bf16 (and fp32) verification of the decode
# kernels and nsa_decode on the four built-in specs, then the decode benchmark against SDPA
# over the whole cache (flash, cuDNN), B = 1, 8, 64 at T = 8k and 64k.
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=ERROR
gpu_info
timeout 150 python3 cli.py verify deepseek-nsa fla-compat small-group mqa -T 4096 -B 4 \
  --kernels decode_select decode_attend nsa_decode --dtype bfloat16 float32 2>&1 | quiet > "$OUT/verify.txt"
cat "$OUT/verify.txt" | tail -40
timeout 300 python3 cli.py bench deepseek-nsa fla-compat small-group --seqlens 8192 65536 --decode 1 8 64 \
  --out "$OUT/bench" 2>&1 | quiet | tail -40
ls -R "$OUT"
