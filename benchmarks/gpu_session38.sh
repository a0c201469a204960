#!/usr/bin/env bash
# Session 38's device steps: bash benchmarks/gpu_session38.sh STEP...
#   lists  the query-batched forward's block lists as kernels (ops.selection._query_lists):
#          nsa-gen verify's bf16 check of selection_fwd and its gated key at 4k (small-group,
#          mqa), then benchmarks/lists_ab.py (kernels against the torch steps they replace, in
#          one process: the lists alone, nsa() eager both ways and from a CUDA graph) for
#          small-group at 8k, 16k and 64k and mqa at 8k
#   lists2 lists_ab.py again for small-group at 16k and 64k, after run 56 found the kernels'
#          way 0.2 ms (16k) and 0.75 ms (64k) slower than the torch steps: entries now int32
#   any other step is session 37's or older: see gpu_session37.sh
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=${NSA_GEN_LOG:-ERROR}
for step in "$@"; do case $step in
lists)
  gpu_info
  timeout 120 python3 cli.py verify small-group mqa --kernels selection_fwd selection_fwd_gated \
    --dtype bfloat16 -T 4096 2>&1 | quiet | tee "$OUT/listscheck.txt"
  for T in 8192 16384 65536; do
    runs="small-group"; [ $T = 8192 ] && runs="small-group mqa"
    timeout 150 python3 benchmarks/lists_ab.py $runs --seqlen $T --out "$OUT/lists$T" 2>&1 | quiet
  done ;;
lists2)
  gpu_info
  for T in ${LISTS_T:-16384 65536}; do
    timeout 120 python3 benchmarks/lists_ab.py small-group --seqlen $T --out "$OUT/lists$T" 2>&1 | quiet
  done ;;
*)
  bash "$(dirname "$0")/gpu_session37.sh" "$step" ;;
esac; done
