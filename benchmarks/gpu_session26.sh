#!/usr/bin/env bash
# Session 26's device steps: bash benchmarks/gpu_session26.sh STEP...
#   slc      benchmarks/slc_breakdown.py at 64k: the query-batched selected forward of
#            small-group (its dispatched config) step by step, with block-numbered bins and
#            16-bit sort keys in the block lists
#   ab       benchmarks/lists_ab.py at 64k: the block lists by block (16-bit keys) against
#            session 25's by key row, small-group's query-batched forward, in one process;
#            then the row chunk at 1, 2, 4 and 8 GiB of partials (time, peak memory)
#   any other step is session 24's (profile, parts, list, tune64) or 23's: see
#            gpu_session24.sh
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=${NSA_GEN_LOG:-ERROR}
for step in "$@"; do case $step in
slc)
  timeout 200 python3 benchmarks/slc_breakdown.py --out "$OUT/slc" small-group 2>&1 | quiet ;;
ab)
  timeout 200 python3 benchmarks/lists_ab.py --out "$OUT/ab" small-group 2>&1 | quiet ;;
*)
  bash "$(dirname "$0")/gpu_session24.sh" "$step" ;;
esac; done
