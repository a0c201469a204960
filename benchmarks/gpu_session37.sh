#!/usr/bin/env bash
# Session 37's device steps: bash benchmarks/gpu_session37.sh STEP...
#   combine  selection_fwd's COMBINE = 1 (a (token, kv head) a combine program, its slots as
#            one tile): nsa-gen verify's bf16 check of the structural variants (COMBINE 1
#            among them) at 4k for small-group and mqa; nsa() at 64k with COMBINE 1 against
#            the DB's configs (nsa_variant_probe.py)
#   tunecombine  3-trial studies (the default, the entry, the entry with COMBINE = 1) of
#            selection_fwd and selection_fwd_gated at 64k for small-group and mqa (a winner
#            passes the tuner's bf16 check and beats the entry by 1%); the DB comes back as
#            db.tar.gz, and the bench64 step of the same call runs with it
#   any other step is session 35's or older: see gpu_session35.sh
set -o pipefail
source "$(dirname "$0")/device_env.sh"
export NSA_GEN_LOG=${NSA_GEN_LOG:-ERROR}
keep_db() { rm -rf /tmp/db34 && cp -r tuning_db /tmp/db34 && tar -czf "$OUT/db.tar.gz" --exclude='.*.lock' tuning_db; }
for step in "$@"; do case $step in
tunecombine)
  for S in small-group mqa; do
    timeout 120 python3 cli.py tune $S --kernels selection_fwd,selection_fwd_gated --seqlens 64k \
      --trials 3 --try COMBINE=1 --storage memory --db tuning_db --jobs 8 --timeout 60 \
      --no-progress 2>&1 | quiet | tail -6
  done | tee "$OUT/tunecombine.txt"
  keep_db ;;
combine)
  timeout 90 python3 cli.py verify small-group mqa --kernels selection_fwd selection_fwd_gated \
    --dtype bfloat16 -T 4096 2>&1 | quiet | tee "$OUT/combinecheck.txt"
  timeout 150 python3 benchmarks/nsa_variant_probe.py --seqlen 65536 --out "$OUT/combine" \
    small-group:selection_fwd:COMBINE=1 mqa:selection_fwd:COMBINE=1 2>&1 | quiet ;;
*)
  bash "$(dirname "$0")/gpu_session35.sh" "$step" ;;
esac; done
