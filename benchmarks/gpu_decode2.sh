#!/usr/bin/env bash
# Device call 2 (session 16): decode with the top-n kernel. bf16/fp32 verification of the
# decode kernels and nsa_decode, the decode benchmark, and a host-time profile of an eager step.
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=ERROR
gpu_info
timeout 150 python3 cli.py verify deepseek-nsa fla-compat small-group mqa -T 4096 -B 4 \
  --kernels decode_select decode_attend nsa_decode --dtype bfloat16 float32 2>&1 | quiet > "$OUT/verify.txt"
grep -c pass "$OUT/verify.txt"; grep -v pass "$OUT/verify.txt" | grep "^| [a-z]" | grep -v "| spec" | head
timeout 60 python3 benchmarks/decode_profile.py deepseek-nsa 8 65536 2>&1 | quiet > "$OUT/profile.txt"
head -45 "$OUT/profile.txt"
timeout 300 python3 cli.py bench deepseek-nsa fla-compat small-group --seqlens 8192 65536 --decode 1 8 64 \
  --out "$OUT/bench" 2>&1 | quiet | tail -24
