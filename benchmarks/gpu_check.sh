#!/usr/bin/env bash
# One device call: install the carried wheels (../shared/device/wheels.sh --with-fla fills
# .whl/), verify kernels against the reference in bf16, then benchmark.
# Usage (device tool, carry [".whl"]): bash benchmarks/gpu_check.sh "KERNELS" SPEC... [-- bench args]
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD TRITON_INTERPRET=0 NSA_GEN_CACHE_DIR=/tmp/nsa-cache PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
kernels=$1; shift
if [ -n "$kernels" ]; then
  python3 cli.py verify deepseek-nsa fla-compat small-group mqa --kernels $kernels 2>&1 | tee "$OUT/verify.txt"
fi
if [ $# -gt 0 ]; then
  python3 cli.py bench "$@" --out "$OUT/bench" 2>&1 | grep -v "no tuned config" | tee "$OUT/bench.txt"
fi
