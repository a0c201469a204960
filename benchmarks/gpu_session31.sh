#!/usr/bin/env bash
# Session 31's device steps: bash benchmarks/gpu_session31.sh STEP...
#   persist  benchmarks/nsa_variant_probe.py at 64k: nsa() with the query-batched forward's
#            partials kernel persistent (PERSIST programs an SM looping over segments, the
#            next segment's loads pipelined under the current one's dots): small-group's DB
#            config with PERSIST 2 (ptxas: 2 programs an SM fit), 3 and 1, and at G = 16
#            (deepseek-nsa, fla-compat) the query-batched kernel with FORCED 64 and BLOCK_Q 4,
#            persistent. (small-group and mqa with QUERY_PERSIST are also in `chunk`'s modes.)
#   any other step is session 30's (qb16, chunk) or older: see gpu_session30.sh
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=${NSA_GEN_LOG:-ERROR}
for step in "$@"; do case $step in
persist)
  timeout 300 python3 benchmarks/nsa_variant_probe.py --out "$OUT/persist" \
    small-group:selection_fwd:PERSIST=2 \
    small-group:selection_fwd:PERSIST=3 \
    small-group:selection_fwd:PERSIST=1 \
    deepseek-nsa:selection_fwd:BLOCK_Q=4,FORCED=64,SHARE=1,num_warps=4,PERSIST=2 \
    fla-compat:selection_fwd:BLOCK_Q=4,FORCED=64,BLOCK_N=64,num_warps=4,PERSIST=2 2>&1 | quiet ;;
*)
  bash "$(dirname "$0")/gpu_session30.sh" "$step" ;;
esac; done
