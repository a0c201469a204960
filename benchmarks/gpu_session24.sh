#!/usr/bin/env bash
# Session 24's device steps: bash benchmarks/gpu_session24.sh STEP...
#   profile  benchmarks/fwd_profile.py at 64k: nsa()'s forward kernel by kernel as the op
#            runs it, for the three target specs (where the total differs from the branch sum)
#   any other step is session 23's (tune, verify, topncheck, bench64, h200): see
#            gpu_session23.sh
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=${NSA_GEN_LOG:-ERROR}
for step in "$@"; do case $step in
profile)
  timeout 300 python3 benchmarks/fwd_profile.py fla-compat deepseek-nsa small-group \
    --out "$OUT/profile" 2>&1 | quiet ;;
*)
  bash "$(dirname "$0")/gpu_session23.sh" "$step" ;;
esac; done
