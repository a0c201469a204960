#!/usr/bin/env bash
# Session 23's device steps: bash benchmarks/gpu_session23.sh STEP...
#   probe    benchmarks/variant_probe.py at 64k: top-n variants of the three specs, each
#            against the dispatched config in one process. fla-compat: IMP "mma" / "tsum" on
#            64-block chunks (BJ 64 puts BC = 64 compressed blocks on the transposed tile's
#            M side, which wgmma needs; at BJ 32 it was 2x slower). deepseek-nsa and
#            small-group: the merge, insertion and register-cap neighbours of the DB entry.
#   tune     top-n studies at $SEQLENS (default 64k) for $SPECS, $TRIALS trials, each with
#            the configs in $TRY (space-separated P=V,... sets) tried first; into tuning_db,
#            returned as $OUT/db.tar.gz after each spec
#   verify   bf16 verification of topn and nsa, four built-in specs, T = 4096
#   topncheck  fla-compat's 64k top-n entry (IMP "mma", BJ 64) against the reference in bf16
#            at 8k and 16k (the dispatched configs there do not use it, so verify does not)
#   bench64  the forward benchmark of three specs at 64k with the baselines
#   h200     what session 23 could not run on an H200: fla-compat's top-n studies at 16k, 32k
#            and 64k with IMP mma / tsum at BJ 64 tried, topncheck, bench64 (on an H100 it
#            stops: the H100 has those entries)
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=${NSA_GEN_LOG:-ERROR}
SEQLENS=${SEQLENS:-64k}
SPECS=${SPECS:-fla-compat}
TRIALS=${TRIALS:-8}
gpu_info
for step in "$@"; do case $step in
probe)
  timeout 420 python3 benchmarks/variant_probe.py --seqlen 65536 --out "$OUT/probe" \
    fla-compat:topn:IMP=mma,BJ=64 fla-compat:topn:IMP=mma,BJ=64,INSERT=4 \
    fla-compat:topn:IMP=tsum,BJ=64 fla-compat:topn:IMP=mma,BJ=64,MERGE=bitonic \
    fla-compat:topn:IMP=mma,BJ=64,BLOCK_T=8 fla-compat:topn:IMP=sum,BJ=64 \
    small-group:topn:MAXNREG=96,num_stages=1 small-group:topn:MERGE=rank \
    small-group:topn:INSERT=2 deepseek-nsa:topn:MERGE=rank 2>&1 | quiet ;;
tune)
  for S in $SPECS; do
    tries=()
    for t in ${TRY:-}; do tries+=(--try "$t"); done
    timeout 300 python3 cli.py tune $S --kernels topn --seqlens "$SEQLENS" --trials "$TRIALS" \
      "${tries[@]}" --db tuning_db --jobs 8 --timeout 60 --no-progress 2>&1 | quiet | tail -6
    tar -czf "$OUT/db.tar.gz" --exclude='.*.lock' tuning_db
  done ;;
verify)
  timeout 240 python3 cli.py verify deepseek-nsa fla-compat small-group mqa -T 4096 \
    --kernels topn nsa --dtype bfloat16 2>&1 | quiet > "$OUT/verify.txt"
  echo "pass $(grep -c '| pass' "$OUT/verify.txt")"; grep "^| [a-z]" "$OUT/verify.txt" | grep -v "| pass\|| spec" | head ;;
topncheck)
  for T in 8192 16384; do
    timeout 100 python3 cli.py verify fla-compat --kernels topn --dtype bfloat16 -T $T \
      --db-seqlens 64k --no-variants 2>&1 | quiet
  done | tee "$OUT/topncheck.txt" ;;
h200)
  nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 || { echo "not an H200"; exit 2; }
  SPECS=fla-compat SEQLENS=16k,32k,64k TRIALS=6 \
    TRY="IMP=mma,BJ=64,INSERT=8,MERGE=sort,TMA=1,BLOCK_T=4 IMP=tsum,BJ=64,INSERT=8,MERGE=sort,TMA=1,BLOCK_T=4" \
    bash "$0" tune topncheck bench64 ;;
bench64)
  timeout 250 python3 cli.py bench deepseek-nsa fla-compat small-group --seqlens 65536 \
    --out "$OUT/bench" 2>&1 | quiet | tail -12 ;;
esac; done
