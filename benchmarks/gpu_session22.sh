#!/usr/bin/env bash
# Top-n's group sum on the tensor cores (IMP "mma", session 22): bash benchmarks/gpu_session22.sh STEP...
#   verify   bf16 verification of topn (the default and each structural variant, IMP "mma"
#            among them) and nsa, four built-in specs, T = 4096: the GPU check of mma (the
#            top-n tests in tests/test_selection.py build CPU tensors; call 1 ran them here
#            and no kernel ran)
#   probe    benchmarks/variant_probe.py at 64k: the dispatched top-n against IMP "mma" at
#            several tiles, three specs
#   tune     topn studies at $SEQLENS (default 64k) for $SPECS (default deepseek-nsa
#            small-group fla-compat), $TRIALS trials (default 6) with IMP "mma" tried at the
#            entry's tiles and at $MMA_TRY (default BLOCK_T=4 and BLOCK_T=16), into tuning_db
#            (returned as $OUT/db.tar.gz, rewritten after each spec)
#   capprobe benchmarks/variant_probe.py at 64k: IMP "mma" with ptxas' register cap (MAXNREG)
#            and one stage, so that 3-4 programs share an SM, deepseek-nsa and small-group
#            (MMA_TRY holds space-separated P=V,... sets, each tried with IMP=mma)
#   bench64  the forward benchmark of three specs at 64k with the baselines
#   benchfb  forward + backward of three specs at 64k with the baselines
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=${NSA_GEN_LOG:-ERROR}
SEQLENS=${SEQLENS:-64k}
SPECS=${SPECS:-deepseek-nsa small-group fla-compat}
TRIALS=${TRIALS:-6}
gpu_info
for step in "$@"; do case $step in
verify)
  timeout 240 python3 cli.py verify deepseek-nsa fla-compat small-group mqa -T 4096 \
    --kernels topn nsa --dtype bfloat16 2>&1 | quiet > "$OUT/verify.txt"
  echo "pass $(grep -c '| pass' "$OUT/verify.txt")"; grep "^| [a-z]" "$OUT/verify.txt" | grep -v "| pass\|| spec" | head ;;
probe)
  timeout 300 python3 benchmarks/variant_probe.py --seqlen 65536 --out "$OUT/probe" \
    deepseek-nsa:topn:IMP=mma deepseek-nsa:topn:IMP=mma,BLOCK_T=4 deepseek-nsa:topn:IMP=mma,BLOCK_T=16 \
    small-group:topn:IMP=mma small-group:topn:IMP=mma,BLOCK_T=16 \
    fla-compat:topn:IMP=mma fla-compat:topn:IMP=mma,BLOCK_T=8 2>&1 | quiet ;;
capprobe)
  timeout 300 python3 benchmarks/variant_probe.py --seqlen 65536 --out "$OUT/capprobe" \
    deepseek-nsa:topn:IMP=mma deepseek-nsa:topn:IMP=mma,num_stages=1,MAXNREG=168 \
    deepseek-nsa:topn:IMP=mma,BLOCK_T=4,num_stages=1,MAXNREG=128 \
    small-group:topn:IMP=mma,BLOCK_T=16 small-group:topn:IMP=mma,BLOCK_T=16,MAXNREG=128 2>&1 | quiet ;;
tune)
  for S in $SPECS; do
    tries=(--try IMP=mma)
    for t in ${MMA_TRY:-BLOCK_T=4 BLOCK_T=16}; do tries+=(--try "IMP=mma,$t"); done
    timeout 200 python3 cli.py tune $S --kernels topn --seqlens "$SEQLENS" --trials "$TRIALS" \
      "${tries[@]}" --db tuning_db --jobs 8 --timeout 60 --no-progress 2>&1 | quiet | tail -6
    tar -czf "$OUT/db.tar.gz" --exclude='.*.lock' tuning_db
  done ;;
bench64)
  timeout 250 python3 cli.py bench deepseek-nsa fla-compat small-group --seqlens 65536 \
    --out "$OUT/bench" 2>&1 | quiet | tail -12 ;;
benchfb)
  timeout 400 python3 cli.py bench deepseek-nsa fla-compat small-group --seqlens 65536 --backward \
    --out "$OUT/benchfb" 2>&1 | quiet | tail -12 ;;
esac; done
