#!/usr/bin/env bash
# Session 33's device steps: bash benchmarks/gpu_session33.sh STEP...
#   hcube    top-n's MERGE "hcube" (the bitonic merge's half-cleaners as compare-exchanges
#            along the axes of the key tile seen as a hypercube: no permute/split/join, so no
#            shared-memory round trips between steps; and the spill-over carry as a gather)
#            against each spec's 64k entry:
#            benchmarks/variant_probe.py (the kernel alone; outputs must be bit-identical,
#            the merges keep the same keys) and benchmarks/nsa_variant_probe.py (nsa()) for
#            deepseek-nsa
#   tunehcube top-n's studies at 64k (4 trials each) that also measure the entry's config at
#            MERGE "hcube" (H100, call 1: 8-14% faster, bit-identical); the DB returned as
#            $OUT/db.tar.gz
#   any other step is session 30's (qb16, chunk) or older: see gpu_session30.sh
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=${NSA_GEN_LOG:-ERROR}
for step in "$@"; do case $step in
hcube)
  gpu_info
  timeout 300 python3 benchmarks/variant_probe.py --seqlen 65536 --out "$OUT/hcube" \
    deepseek-nsa:topn:MERGE=hcube small-group:topn:MERGE=hcube fla-compat:topn:MERGE=hcube \
    fla-compat:topn:MERGE=hcube,LIST=1 mqa:topn:MERGE=hcube 2>&1 | quiet
  timeout 200 python3 benchmarks/nsa_variant_probe.py --out "$OUT/hcube_nsa" \
    deepseek-nsa:topn:MERGE=hcube 2>&1 | quiet ;;
tunehcube)
  for S in ${HCUBE_SPECS:-deepseek-nsa small-group fla-compat}; do
    timeout 120 python3 cli.py tune $S --kernels topn --seqlens 64k --trials 4 --try MERGE=hcube \
      --db tuning_db --jobs 8 --timeout 60 --no-progress 2>&1 | quiet | tail -4
  done
  tar -czf "$OUT/db.tar.gz" --exclude='.*.lock' tuning_db ;;
*)
  bash "$(dirname "$0")/gpu_session30.sh" "$step" ;;
esac; done
