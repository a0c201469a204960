# Sourced by every benchmarks/gpu_*.sh device script: installs the wheels of .whl/ (optuna,
# fla-core: ../shared/device/wheels.sh) into /tmp/site and sets the environment the device
# calls run under. $OUT (the folder the device returns) defaults to ./out.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
# wheels.sh does not fetch the cuDNN frontend; without it the DB's window CUDNN entries run the
# generated kernel (session 34's first benchmark did, unnoticed until it printed the fallback).
ls .whl/nvidia_cudnn_frontend-*.whl >/dev/null 2>&1 || echo "note: no nvidia-cudnn-frontend wheel in" \
  ".whl (python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform" \
  "manylinux_2_28_x86_64 -d .whl nvidia-cudnn-frontend==1.32.0): window CUDNN entries will fall back"
export PYTHONPATH=/tmp/site:$PWD TRITON_INTERPRET=0 NSA_GEN_CACHE_DIR=/tmp/nsa-cache PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"

# The device scripts' shared helpers: quiet drops library warnings from a command's output;
# gpu_info writes the GPU, driver, torch and triton versions to $OUT/gpu.txt (and prints them).
quiet() { grep --line-buffered -v "UserWarning\|scaled_dot_product_attention\|return Variable\|warnings.warn\|no tuned config"; }
gpu_info() {
  { nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/gpu.txt"
}
