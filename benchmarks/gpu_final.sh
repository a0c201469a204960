#!/usr/bin/env bash
# One device call: bf16 verification of every kernel and the composed op (forward and
# backward), forward+backward benchmark, training check. Writes at most 8 files to $OUT.
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=ERROR
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 cli.py verify deepseek-nsa fla-compat small-group mqa -T 2048 2>&1 | quiet | tee "$OUT/verify.txt"
timeout 240 python3 cli.py bench deepseek-nsa fla-compat small-group --seqlens 16384 65536 --backward \
  --out "$OUT/bench" 2>&1 | quiet | tee "$OUT/bench.txt"
timeout 150 python3 benchmarks/train_check.py --steps 300 --out "$OUT/train" 2>&1 | quiet | tail -30
