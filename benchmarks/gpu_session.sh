#!/usr/bin/env bash
# One device call (session 3): bf16 verification of every kernel and of the composed op
# (one sequence and packed), benchmarks/gpu_checks.py (determinism of the gradients, the
# compressed dk/dv split cap at 128k), then benchmarks/gpu_tune_all.sh with what is left of
# BUDGET_S (its environment variables pass through: SEQLENS, TRIALS, STEPS, RESUME, ...).
# Usage: [VERIFY=0] [VERIFY_ARGS="-T 2048 --kernels ..."] [CHECKS=0] [BUDGET_S=560]
#        bash benchmarks/gpu_session.sh [SPEC...]
set -o pipefail
source "$(dirname "$0")/device_env.sh"
BUDGET_S=${BUDGET_S:-560}
gpu_info
if [ "${VERIFY:-1}" != 0 ]; then
  timeout 240 python3 cli.py verify deepseek-nsa fla-compat small-group mqa ${VERIFY_ARGS:--T 2048} 2>&1 | quiet > "$OUT/verify.txt"
  echo "verify: exit ${PIPESTATUS[0]} after ${SECONDS}s"; grep -c "| pass" "$OUT/verify.txt"; grep "FAIL" "$OUT/verify.txt"
fi
if [ "${CHECKS:-1}" != 0 ]; then
  timeout 150 python3 benchmarks/gpu_checks.py --out "$OUT/checks" 2>&1 | quiet | tail -30
  echo "checks: exit ${PIPESTATUS[0]} after ${SECONDS}s"
fi
BUDGET_S=$((BUDGET_S - SECONDS)) bash "$(dirname "$0")/gpu_tune_all.sh" "$@"
