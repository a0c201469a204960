#!/usr/bin/env bash
# Session 28's device steps: bash benchmarks/gpu_session28.sh STEP...
#   h200      stop (exit 3) unless the GPU is an H200: the targets are the H200's
#   tunegated selection_fwd_gated's studies at 64k (the selected kernel storing the gated
#             sum, as nsa() runs it without autograd): fla-compat (BLOCK_N 64 tried, session
#             27's probe), then deepseek-nsa and small-group; each seeded with selection_fwd's
#             entry, which it keeps unless beaten by 1%. The DB returned as $OUT/db.tar.gz
#   launch    benchmarks/launch_probe.py at 64k: nsa() with the combine kernel's warps and
#             stages and the forced pass's warps changed (launch options outside the tuned
#             config), small-group (both kernels) and fla-compat (forced pass)
#   any other step is session 27's (ahead, gated) or older: see gpu_session27.sh
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=${NSA_GEN_LOG:-ERROR}
for step in "$@"; do case $step in
h200)
  gpu_info
  nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 || { echo "not an H200"; exit 3; } ;;
tunegated)
  for S in ${GATED_SPECS:-fla-compat deepseek-nsa small-group}; do
    tries=(); trials=8
    [ "$S" = fla-compat ] && { tries=(--try BLOCK_N=64); trials=12; }
    timeout 200 python3 cli.py tune $S --kernels selection_fwd_gated --seqlens 64k \
      --trials $trials "${tries[@]}" --db tuning_db --jobs 8 --timeout 60 --no-progress 2>&1 \
      | quiet | tail -4
  done
  tar -czf "$OUT/db.tar.gz" --exclude='.*.lock' tuning_db ;;
launch)
  timeout 240 python3 benchmarks/launch_probe.py --out "$OUT/launch" small-group:combine_warps=8 \
    small-group:combine_warps=2 small-group:combine_stages=2 small-group:combine_stages=3 \
    small-group:forced_warps=8 small-group:forced_warps=2 fla-compat:forced_warps=8 fla-compat:FORCED=128,forced_warps=8 \
    small-group:FORCED=128,forced_warps=8 2>&1 | quiet ;;
*)
  bash "$(dirname "$0")/gpu_session27.sh" "$step" ;;
esac; done
