#!/usr/bin/env bash
# Device call 5 (session 16): the decode benchmark with the tuned DB, SDPA timed both ways.
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=ERROR
gpu_info
timeout 280 python3 cli.py bench deepseek-nsa fla-compat small-group --seqlens 8192 65536 --decode 1 8 64 \
  --out "$OUT/bench" 2>&1 | quiet | tail -22
