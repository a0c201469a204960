#!/usr/bin/env bash
# Session 24's device steps: bash benchmarks/gpu_session24.sh STEP...
#   profile  benchmarks/fwd_profile.py at 64k: nsa()'s forward kernel by kernel as the op
#            runs it, for the three target specs (where the total differs from the branch sum)
#   parts    benchmarks/topn_probe.py at 64k: top-n's time without its merge, and
#            without merge and exp2, for the three target specs (and fla-compat with IMP mma
#            at BJ 64), to size what a cheaper merge could gain
#   list     benchmarks/variant_probe.py at 64k: top-n's LIST = 1 (the running list S wide,
#            not BJ) against the dispatched config, fla-compat's entries and wider chunks
#   tune64   fla-compat's top-n study at 64k (6 trials) with IMP mma at BJ 64 (INSERT 8 and 4)
#            tried first (session 26: LIST = 1 lost 28-38% on the H100, so it is not tried); the DB returned as $OUT/db.tar.gz
#   any other step is session 23's (tune, verify, topncheck, bench64, h200): see
#            gpu_session23.sh
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=${NSA_GEN_LOG:-ERROR}
M64=IMP=mma,BJ=64,INSERT=8,MERGE=sort,TMA=1,BLOCK_T=4  # fla-compat's 64k entry on the H100
for step in "$@"; do case $step in
profile)
  timeout 300 python3 benchmarks/fwd_profile.py fla-compat deepseek-nsa small-group \
    --out "$OUT/profile" 2>&1 | quiet ;;
parts)
  timeout 240 python3 benchmarks/topn_probe.py --out "$OUT/parts" fla-compat deepseek-nsa \
    small-group fla-compat:$M64 2>&1 | quiet ;;
list)
  timeout 300 python3 benchmarks/variant_probe.py --out "$OUT/list" fla-compat:topn:LIST=1 \
    fla-compat:topn:LIST=1,INSERT=8 fla-compat:topn:$M64 fla-compat:topn:$M64,LIST=1 \
    fla-compat:topn:$M64,LIST=1,MERGE=bitonic fla-compat:topn:$M64,LIST=1,INSERT=4 \
    small-group:topn:BJ=32,LIST=1 deepseek-nsa:topn:BJ=32,LIST=1 2>&1 | quiet ;;
tune64)
  SPECS=fla-compat SEQLENS=64k TRIALS=6 TRY="$M64 $M64,INSERT=4" \
    bash "$(dirname "$0")/gpu_session23.sh" tune ;;
*)
  bash "$(dirname "$0")/gpu_session23.sh" "$step" ;;
esac; done
