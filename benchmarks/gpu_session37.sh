#!/usr/bin/env bash
# Session 37's device steps: bash benchmarks/gpu_session37.sh STEP...
#   combine  selection_fwd's COMBINE = 1 (a (token, kv head) a combine program, its slots as
#            one tile; commit daea85e, taken out after this step measured it 36% slower,
#            RESULTS run 53): nsa-gen verify's bf16 check of the structural variants at 4k
#            for small-group and mqa; nsa() at 64k with COMBINE 1 against the DB's configs
#   profile8k  benchmarks/fwd_profile.py at 8k and 16k for small-group and deepseek-nsa: is
#            the host (8.8 ms a call at small-group, 64k, run 53) the bound where the GPU
#            time is short?
#   any other step is session 35's or older: see gpu_session35.sh
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=${NSA_GEN_LOG:-ERROR}
for step in "$@"; do case $step in
combine)
  timeout 90 python3 cli.py verify small-group mqa --kernels selection_fwd selection_fwd_gated \
    --dtype bfloat16 -T 4096 2>&1 | quiet | tee "$OUT/combinecheck.txt"
  timeout 150 python3 benchmarks/nsa_variant_probe.py --seqlen 65536 --out "$OUT/combine" \
    small-group:selection_fwd:COMBINE=1 mqa:selection_fwd:COMBINE=1 2>&1 | quiet ;;
profile8k)
  for T in 8192 16384; do
    timeout 90 python3 benchmarks/fwd_profile.py small-group deepseek-nsa --seqlen $T \
      --out "$OUT/profile$T" 2>&1 | quiet | grep "^##"
  done ;;
*)
  bash "$(dirname "$0")/gpu_session35.sh" "$step" ;;
esac; done
