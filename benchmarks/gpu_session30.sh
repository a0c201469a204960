#!/usr/bin/env bash
# Session 30's device steps: bash benchmarks/gpu_session30.sh STEP...
#   qb16     benchmarks/nsa_variant_probe.py at 64k: nsa() with the query-batched selected
#            kernel (BLOCK_Q 4 and 8, FORCED 64) at G = 16, deepseek-nsa and fla-compat,
#            against the shipped group-centric one: last measured in session 4 (run 8), before
#            TMA, FORCED, the gated combine and the lists built ahead; and deepseek-nsa's
#            group-centric kernel after the forced pass (FORCED 64, SHARE 1)
#   chunk    benchmarks/chunk_probe.py at 64k: small-group and mqa's nsa() with the
#            query-batched forward's row chunk at 2048 (shipped) down to 128 MiB of partials:
#            do the queries' gathers come from HBM, and do smaller chunks keep them in L2?
#   any other step is session 28's (h200, tunegated, launch) or older: see gpu_session28.sh
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=${NSA_GEN_LOG:-ERROR}
for step in "$@"; do case $step in
qb16)
  timeout 300 python3 benchmarks/nsa_variant_probe.py --out "$OUT/qb16" \
    deepseek-nsa:selection_fwd:BLOCK_Q=4,FORCED=64,SHARE=1,num_warps=4 \
    deepseek-nsa:selection_fwd:BLOCK_Q=8,FORCED=64,SHARE=1,num_warps=4 \
    fla-compat:selection_fwd:BLOCK_Q=4,FORCED=64,BLOCK_N=64,num_warps=4 \
    fla-compat:selection_fwd:BLOCK_Q=8,FORCED=64,BLOCK_N=64,num_warps=4 \
    deepseek-nsa:selection_fwd:FORCED=64,SHARE=1 2>&1 | quiet ;;
chunk)
  timeout 300 python3 benchmarks/chunk_probe.py --out "$OUT/chunk" small-group mqa 2>&1 | quiet ;;
*)
  bash "$(dirname "$0")/gpu_session28.sh" "$step" ;;
esac; done
