#!/usr/bin/env bash
# One device call: install the carried wheels (../shared/device/wheels.sh --with-fla fills
# .whl/), verify kernels against the reference in bf16, then benchmark.
# Usage (device tool, carry [".whl"]): bash benchmarks/gpu_check.sh "KERNELS" SPEC... [-- bench args]
set -o pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
kernels=$1; shift
if [ -n "$kernels" ]; then
  python3 cli.py verify deepseek-nsa fla-compat small-group mqa --kernels $kernels 2>&1 | tee "$OUT/verify.txt"
fi
if [ $# -gt 0 ]; then
  python3 cli.py bench "$@" --out "$OUT/bench" 2>&1 | grep -v "no tuned config" | tee "$OUT/bench.txt"
fi
