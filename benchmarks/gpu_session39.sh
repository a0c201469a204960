#!/usr/bin/env bash
# Session 39's device steps: bash benchmarks/gpu_session39.sh STEP...
#   mqahost  benchmarks/fwd_profile.py for mqa at 8k: its op was host-bound after the block
#            lists became kernels (run 56: eager 1.75 ms against 1.13 from a CUDA graph);
#            where does the host time go (host_top)?
#   rekeyed  nsa() at 64k with the re-keyed selection_fwd entries (the dispatcher's configs)
#            against the heuristic defaults that runs 56-57 ran, in one process
#            (benchmarks/nsa_variant_probe.py: the default's params as the variant)
#   any other step is session 38's or older: see gpu_session38.sh
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=${NSA_GEN_LOG:-ERROR}
for step in "$@"; do case $step in
mqahost)
  timeout 90 python3 benchmarks/fwd_profile.py mqa small-group --seqlen 8192 \
    --out "$OUT/mqahost" 2>&1 | quiet | grep "^##\|host" ;;
rekeyed)
  timeout 200 python3 benchmarks/nsa_variant_probe.py --seqlen 65536 --out "$OUT/rekeyed" \
    small-group:selection_fwd:FORCED=0 deepseek-nsa:selection_fwd:SHARE=1 \
    fla-compat:selection_fwd_gated:FORCED=0 2>&1 | quiet ;;
*)
  bash "$(dirname "$0")/gpu_session38.sh" "$step" ;;
esac; done
