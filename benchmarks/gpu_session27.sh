#!/usr/bin/env bash
# Session 27's device steps: bash benchmarks/gpu_session27.sh STEP...
#   ahead    benchmarks/ahead_ab.py at 64k: small-group's query-batched forward with its
#            block lists built ahead on a side stream against built in line, in one process:
#            selection_fwd alone and the whole nsa() forward; selection_bwd with its inverted
#            selection built while the dq kernel runs (small-group, fla-compat); outputs
#            compared bit for bit
#   gated    benchmarks/nsa_variant_probe.py at 64k: nsa() (the selected kernel storing the
#            gated sum) with selection_fwd's tile, warps, stages, FORCED or SHARE changed,
#            fla-compat and deepseek-nsa: does the gated kernel prefer another config than the
#            ungated one the tuner timed?
#   any other step is session 26's (slc, ab) or older: see gpu_session26.sh
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=${NSA_GEN_LOG:-ERROR}
for step in "$@"; do case $step in
ahead)
  timeout 300 python3 benchmarks/ahead_ab.py --out "$OUT/ahead" small-group fla-compat 2>&1 | quiet ;;
gated)
  timeout 400 python3 benchmarks/nsa_variant_probe.py --out "$OUT/gated" \
    fla-compat:selection_fwd:BLOCK_N=64 fla-compat:selection_fwd:num_warps=4 \
    fla-compat:selection_fwd:num_stages=3 fla-compat:selection_fwd:FORCED=128 \
    fla-compat:selection_fwd:FORCED=0 deepseek-nsa:selection_fwd:SHARE=1 \
    deepseek-nsa:selection_fwd:num_warps=4 deepseek-nsa:selection_fwd:BLOCK_N=32 2>&1 | quiet ;;
*)
  bash "$(dirname "$0")/gpu_session26.sh" "$step" ;;
esac; done
