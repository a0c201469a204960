# Sourced by every benchmarks/gpu_*.sh device script: installs the wheels of .whl/ (optuna,
# fla-core: ../shared/device/wheels.sh) into /tmp/site and sets the environment the device
# calls run under. $OUT (the folder the device returns) defaults to ./out.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD TRITON_INTERPRET=0 NSA_GEN_CACHE_DIR=/tmp/nsa-cache PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
