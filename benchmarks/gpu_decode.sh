#!/usr/bin/env bash
# Decode on the GPU (session 16's device calls): bash benchmarks/gpu_decode.sh STEP...
#   verify   bf16 and fp32 verification of decode_select, decode_attend and nsa_decode
#            (four built-in specs, T = 4096, B = 4)
#   profile  host time of an eager deepseek-nsa step (B = 8, T = 64k)
#   tune     10-trial studies of both decode kernels at T = 64k, B = 1, 8, 64, into
#            tuning_db (returned as $OUT/db.tar.gz)
#   bench    the decode benchmark, B = 1, 8, 64 at T = 8k and 64k, against SDPA
#   graph    tests/test_decode.py's CUDA-graph test (needs pytest's wheels in .whl)
#   fb       fla-compat's forward + backward at 64k, no baselines
#   all      bf16 verification of every kernel and op of the four built-in specs at 2k
# Calls 1-5 ran: verify bench; verify profile bench; verify bench tune (into a copy of the
# DB, B = 64 and 8); tune (B = 64 and 1) bench fb; bench.
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=ERROR
gpu_info
for step in "$@"; do case $step in
verify)
  timeout 150 python3 cli.py verify deepseek-nsa fla-compat small-group mqa -T 4096 -B 4 \
    --kernels decode_select decode_attend nsa_decode --dtype bfloat16 float32 2>&1 | quiet > "$OUT/verify.txt"
  grep -c pass "$OUT/verify.txt"; grep -v pass "$OUT/verify.txt" | grep "^| [a-z]" | grep -v "| spec" | head ;;
profile)
  timeout 60 python3 benchmarks/decode_profile.py deepseek-nsa 8 65536 2>&1 | quiet > "$OUT/profile.txt"
  head -45 "$OUT/profile.txt" ;;
tune)
  for B in 64 8 1; do for S in deepseek-nsa small-group fla-compat; do
    timeout 70 python3 cli.py tune $S --kernels decode_select,decode_attend --seqlens 65536 --batch $B \
      --trials 10 --db tuning_db --jobs 8 --timeout 60 --no-progress 2>&1 | quiet | grep "T=65536"
  done; done
  tar -czf "$OUT/db.tar.gz" --exclude='.*.lock' tuning_db ;;
bench)
  timeout 280 python3 cli.py bench deepseek-nsa fla-compat small-group --seqlens 8192 65536 --decode 1 8 64 \
    --out "$OUT/bench" 2>&1 | quiet | tail -22 ;;
graph)
  TRITON_INTERPRET=0 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_decode.py -k graph 2>&1 | tail -5 ;;
all)
  timeout 400 python3 cli.py verify deepseek-nsa fla-compat small-group mqa -T 2048 -B 2 --dtype bfloat16 \
    2>&1 | quiet > "$OUT/verify_all.txt"
  echo "pass $(grep -c '| pass' "$OUT/verify_all.txt")"; grep "^| [a-z]" "$OUT/verify_all.txt" | grep -v "| pass\|| spec" | head -20 ;;
fb)
  timeout 150 python3 cli.py bench fla-compat --seqlens 65536 --backward --no-baselines \
    --out "$OUT/bench_fb" 2>&1 | quiet | tail -8 ;;
*) echo "unknown step $step"; exit 2 ;;
esac; done
