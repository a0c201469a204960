#!/usr/bin/env bash
# Session 34's device steps: bash benchmarks/gpu_session34.sh STEP...
#   tunehcube top-n's studies at 64k that also measure each spec's entry at MERGE "hcube"
#            (and, for deepseek-nsa, hcube with wider chunks or more warps, since the merge's
#            share of a chunk fell); the tuned DB is kept in /tmp/db34 for a later call on the
#            same machine and returned as $OUT/db.tar.gz
#   bench64  the forward benchmark at 64k with /tmp/db34's entries where a previous call on
#            this machine left them
#   hcubecheck  each spec's 64k top-n entry (MERGE hcube since this session's studies) checked
#            in bf16 against the reference at 8k and 16k (as nsa-gen verify checks a kernel)
#   tiles    benchmarks/variant_probe.py at 64k: the new top-n entries (hcube) against other
#            tiles, stages and register caps the 4-6 trial studies may not have sampled
#   profile  benchmarks/fwd_profile.py at 64k (each kernel's GPU time inside nsa()) for
#            deepseek-nsa and small-group
#   any other step is session 33's or older: see gpu_session33.sh
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=${NSA_GEN_LOG:-ERROR}
keep_db() { rm -rf /tmp/db34 && cp -r tuning_db /tmp/db34 && tar -czf "$OUT/db.tar.gz" --exclude='.*.lock' tuning_db; }
for step in "$@"; do case $step in
tunehcube)
  for S in ${HCUBE_SPECS:-deepseek-nsa small-group fla-compat mqa}; do
    tries=(--try MERGE=hcube); trials=4
    [ "$S" = deepseek-nsa ] && { tries+=(--try MERGE=hcube,BJ=32 --try MERGE=hcube,num_warps=8); trials=6; }
    timeout 150 python3 cli.py tune $S --kernels topn --seqlens 64k --trials $trials "${tries[@]}" \
      --db tuning_db --jobs 8 --timeout 60 --no-progress 2>&1 | quiet | tail -4
  done
  keep_db ;;
tunegated)
  GATED_SPECS=fla-compat bash "$(dirname "$0")/gpu_session28.sh" tunegated
  keep_db ;;
bench64)
  [ -d /tmp/db34 ] && cp -r /tmp/db34/. tuning_db/
  gpu_info
  bash "$(dirname "$0")/gpu_session23.sh" bench64 ;;
hcubecheck)
  for T in 8192 16384; do
    timeout 100 python3 cli.py verify deepseek-nsa small-group fla-compat mqa --kernels topn \
      --dtype bfloat16 -T $T --db-seqlens 64k --no-variants 2>&1 | quiet
  done | tee "$OUT/hcubecheck.txt" ;;
tiles)
  timeout 240 python3 benchmarks/variant_probe.py --seqlen 65536 --out "$OUT/tiles" \
    deepseek-nsa:topn:num_stages=2 deepseek-nsa:topn:MAXNREG=0 deepseek-nsa:topn:BLOCK_T=16 \
    deepseek-nsa:topn:BLOCK_T=4 deepseek-nsa:topn:TMA=0 small-group:topn:BLOCK_T=32 \
    small-group:topn:BJ=32 small-group:topn:MAXNREG=168 2>&1 | quiet ;;
profile)
  timeout 200 python3 benchmarks/fwd_profile.py deepseek-nsa small-group --out "$OUT/profile" 2>&1 | quiet ;;
*)
  bash "$(dirname "$0")/gpu_session33.sh" "$step" ;;
esac; done
