#!/usr/bin/env bash
# Session 35's device steps: bash benchmarks/gpu_session35.sh STEP...
#   clocks   benchmarks/clock_probe.py at 64k: deepseek-nsa's top-n (compute-bound) and
#            selected forward (L2-bound), each timed as the tuner and as the benchmark time it,
#            cold and after 3 s of load, with the SM clock and power nvidia-smi sampled
#   any other step is session 34's or older: see gpu_session34.sh
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=${NSA_GEN_LOG:-ERROR}
for step in "$@"; do case $step in
clocks)
  timeout 150 python3 benchmarks/clock_probe.py --seqlen 65536 --out "$OUT/clocks" \
    deepseek-nsa:topn deepseek-nsa:selection_fwd 2>&1 | quiet ;;
*)
  bash "$(dirname "$0")/gpu_session34.sh" "$step" ;;
esac; done
