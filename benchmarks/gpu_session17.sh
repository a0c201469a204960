#!/usr/bin/env bash
# The compressed attention through cuDNN (sessions 17-18): bash benchmarks/gpu_session17.sh STEP...
#   probe    benchmarks/cudnn_cmp_probe.py at 64k (three specs) and 16k (two)
#   test     the CUDNN tests of compression_fwd and compression_bwd on the GPU (cuDNN, fp16)
#   verify   bf16 verification of compression_fwd and compression_bwd (each CUDNN = 1 variant a
#            row of its own) and nsa, four built-in specs, T = 4096
#   tune     compression_fwd studies (4 trials, CUDNN = 1 among them) at 8k-64k, four specs,
#            into tuning_db (returned as $OUT/db.tar.gz)
#   tunebwd  the same for compression_bwd (3 trials)
#            (both tune steps take their lengths from $SEQLENS, default 8k,16k,32k,64k, and
#            their specs from $SPECS, default deepseek-nsa small-group fla-compat mqa)
#   benchfb  forward + backward of three specs at 64k with the baselines
#   bench    the forward benchmark of three specs at 8k-64k with the baselines
#   bench64  the same at 64k only
#   swa      benchmarks/cudnn_swa_probe.py at 64k: the window through cuDNN in chunks of C,
#            forward and backward
#   fewin    benchmarks/cudnn_fe_window_probe.py at 64k: the window through cuDNN's own sliding
#            window (the cuDNN frontend's graph API), forward and backward. Needs the frontend
#            wheel in .whl: python3 -m pip download --no-deps --only-binary=:all:
#            --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl
#            nvidia-cudnn-frontend==1.32.0
#   flexwin  benchmarks/flex_window_probe.py at 64k: the window through torch's FlexAttention
#            (block mask of the band), forward and backward
#   wintest  the CUDNN tests of window_fwd and window_bwd on the GPU (cuDNN's band, fp16; needs
#            the frontend wheel in .whl, as fewin)
#   winverify  bf16 verification of window_fwd and window_bwd (each CUDNN = 1 variant a row of
#            its own), deepseek-nsa and small-group, T = 4096
#   wintune  window_fwd (3 trials) and window_bwd (3 trials) studies with CUDNN = 1 tried, at
#            $SEQLENS for $SPECS, into tuning_db (returned as $OUT/db.tar.gz)
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=${NSA_GEN_LOG:-ERROR}
SEQLENS=${SEQLENS:-8k,16k,32k,64k}
SPECS=${SPECS:-deepseek-nsa small-group fla-compat mqa}
# tune_cudnn KERNEL TRIALS TIMEOUT TRIAL_TIMEOUT: studies with CUDNN = 1 tried, for each of
# $SPECS, into tuning_db, returned as $OUT/db.tar.gz (rewritten after each spec, so a call cut
# short still returns what finished)
tune_cudnn() {
  for S in $SPECS; do
    [ -n "$NEED" ] && ! grep -q "$NEED" "nsa_gen/specs/$S.yaml" && continue
    timeout "$3" python3 cli.py tune $S --kernels "$1" --seqlens "$SEQLENS" --trials "$2" \
      --try CUDNN=1 --db tuning_db --jobs 8 --timeout "$4" --no-progress 2>&1 | quiet | tail -6
    tar -czf "$OUT/db.tar.gz" --exclude='.*.lock' tuning_db
  done
}
gpu_info
for step in "$@"; do case $step in
probe)
  timeout 200 python3 benchmarks/cudnn_cmp_probe.py fla-compat deepseek-nsa small-group --out "$OUT/p64" 2>&1 | quiet
  timeout 100 python3 benchmarks/cudnn_cmp_probe.py fla-compat small-group --seqlen 16384 --out "$OUT/p16" 2>&1 | quiet ;;
test)
  TRITON_INTERPRET=0 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_compression.py \
    tests/test_compression_bwd.py -k cudnn 2>&1 | tail -4 ;;
verify)
  timeout 200 python3 cli.py verify deepseek-nsa fla-compat small-group mqa -T 4096 \
    --kernels compression_fwd compression_bwd nsa --dtype bfloat16 2>&1 | quiet > "$OUT/verify.txt"
  echo "pass $(grep -c '| pass' "$OUT/verify.txt")"; grep "^| [a-z]" "$OUT/verify.txt" | grep -v "| pass\|| spec" | head ;;
tune)
  tune_cudnn compression_fwd 4 140 60 ;;
tunebwd)
  tune_cudnn compression_bwd 3 170 90 ;;
benchfb)
  timeout 400 python3 cli.py bench deepseek-nsa fla-compat small-group --seqlens 65536 --backward \
    --out "$OUT/benchfb" 2>&1 | quiet | tail -12 ;;
bench)
  timeout 400 python3 cli.py bench deepseek-nsa fla-compat small-group --seqlens 8192 16384 32768 65536 \
    --out "$OUT/bench" 2>&1 | quiet | tail -22 ;;
bench64)
  timeout 250 python3 cli.py bench deepseek-nsa fla-compat small-group --seqlens 65536 \
    --out "$OUT/bench" 2>&1 | quiet | tail -12 ;;
swa)
  timeout 200 python3 benchmarks/cudnn_swa_probe.py deepseek-nsa:64 deepseek-nsa:128 deepseek-nsa:256 \
    small-group:128 --backward --out "$OUT/swa" 2>&1 | quiet ;;
fewin)
  if ls .whl/nvidia_cudnn_frontend-*.whl >/dev/null 2>&1; then
    timeout 200 python3 benchmarks/cudnn_fe_window_probe.py deepseek-nsa small-group --backward \
      --out "$OUT/fewin" 2>&1 | quiet
  else echo "fewin: no nvidia-cudnn-frontend wheel in .whl"; fi ;;
flexwin)
  timeout 300 python3 benchmarks/flex_window_probe.py deepseek-nsa small-group --backward \
    --out "$OUT/flexwin" 2>&1 | quiet ;;
wintest)
  TRITON_INTERPRET=0 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_window.py \
    tests/test_window_bwd.py -k cudnn 2>&1 | tail -4 ;;
winverify)
  timeout 200 python3 cli.py verify deepseek-nsa small-group -T 4096 --kernels window_fwd window_bwd \
    --dtype bfloat16 2>&1 | quiet > "$OUT/winverify.txt"
  echo "pass $(grep -c '| pass' "$OUT/winverify.txt")"; grep "^| [a-z]" "$OUT/winverify.txt" | grep -v "| pass\|| spec" | head ;;
wintune)
  NEED=swa tune_cudnn window_fwd 3 100 40
  NEED=swa tune_cudnn window_bwd 3 140 60 ;;
esac; done
