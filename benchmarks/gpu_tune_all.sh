#!/usr/bin/env bash
# One device call: tune fla-compat's compression_fwd with 40 trials and exhaustively (its
# whole pruned space, at EXH_SEQLENS, default T = 8k and 32k: bounded, so it runs first;
# step "sampled" runs only the 40-trial studies, to compare with recorded EXH_DATA),
# tune every kernel of each SPEC at SEQLENS into a copy of tuning_db/ with what is left of
# the budget, then write the evidence tables (benchmarks/tune_evidence.py).
#
# Usage: [SEQLENS=1024,4096,16384,65536,131072] [KERNELS=stem,stem] [TRIALS=12] [JOBS=8] [TIMEOUT=60]
#        [STEPS="tune exhaustive evidence"] [BUDGET_S=560] [RESUME=DIR] [EXH_DATA=DIR]
#        bash benchmarks/gpu_tune_all.sh [SPEC...]        (default SPECs: every built-in)
#
# SEQLENS is a comma list as `nsa-gen tune --seqlens` takes it ('k' = 1024 allowed).
# STEPS picks the parts to run: tune, exhaustive, sampled, evidence. BUDGET_S bounds the whole call: the device stops a command
# at 10 minutes, so each tuning command gets only what is left of the budget and is then
# interrupted (SIGINT: its studies record the cut trials as interrupted and resume cleanly),
# leaving time to pack the results. RESUME=DIR continues an earlier call: DIR holds that
# call's db.tar.gz and data.tar.gz (copied into the working tree), whose DB and Optuna
# studies are unpacked first, so the studies go on where they stopped.
#
# Leaves at most 4 files in $OUT: log.txt (every command's output), evidence.md (the
# tables), db.tar.gz (the tuning DB: tuning_db/ plus this run's winners) and data.tar.gz
# (evidence.json, the Optuna studies tune.db, t40.db, tall.db and the DBs db40/, dball/).
set -o pipefail
source "$(dirname "$0")/device_env.sh"
SEQLENS=${SEQLENS:-1024,4096,16384,65536,131072}
TRIALS=${TRIALS:-12}
JOBS=${JOBS:-8}
TIMEOUT=${TIMEOUT:-60}
STEPS=${STEPS:-tune exhaustive evidence}
EXH_SEQLENS=${EXH_SEQLENS:-8192,32768}
BUDGET_S=${BUDGET_S:-560}
PACK_S=30  # kept back from the budget for packing the results
if [ $# -eq 0 ]; then
  set -- $(python3 -c "from nsa_gen.spec import builtin_specs; print(*builtin_specs())")
fi
mkdir -p "$OUT"
LOG=$OUT/log.txt
log() { echo "== $*" | tee -a "$LOG"; }
has_step() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
left() { echo $((BUDGET_S - PACK_S - SECONDS)); }

# run CMD... under what is left of the budget; SIGINT first (a clean, resumable stop),
# SIGKILL 20 s later. Output goes to the log.
run() {
  local t; t=$(left)
  if [ "$t" -le 10 ]; then log "skipped (budget spent): $*"; return 124; fi
  log "$* (limit ${t}s)"
  timeout -s INT -k 20 "$t" "$@" 2>&1 | grep --line-buffered -v "UserWarning\|warnings.warn" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ $rc -eq 0 ] || log "exit status $rc: $*"
  return $rc
}

if [ -n "$RESUME" ]; then
  log "resuming from $RESUME"
  tar -xzf "$RESUME/db.tar.gz" -C "$OUT" || exit 1
  tar -xzf "$RESUME/data.tar.gz" -C /tmp || exit 1
  rm -f /tmp/evidence.json
else
  cp -r tuning_db "$OUT/db"
fi
log "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
log "specs: $*; seqlens $SEQLENS; trials $TRIALS; jobs $JOBS; steps: $STEPS"

if has_step exhaustive || has_step sampled; then
  # Same studies twice: 40 trials, and more trials than the pruned space holds (the tuner
  # stops when every config was measured). The second reuses the first's compiled kernels.
  runs=("40 t40 db40")
  has_step exhaustive && runs+=("100000 tall dball")
  for what in "${runs[@]}"; do
    read -r trials name db <<< "$what"
    run python3 cli.py tune fla-compat --kernels compression_fwd --seqlens "$EXH_SEQLENS" \
      --trials "$trials" --storage "sqlite:////tmp/$name.db" --db "/tmp/$db" --jobs "$JOBS" \
      --timeout "$TIMEOUT" --no-progress
  done
fi

if has_step tune; then
  # Shape by shape in the order given, every spec at each: a budget cut then leaves whole
  # shapes untuned (dispatched to their nearest tuned neighbour), not whole specs.
  for T in ${SEQLENS//,/ }; do
    for spec in "$@"; do
      run python3 cli.py tune "$spec" ${KERNELS:+--kernels $KERNELS} --seqlens "$T" --trials "$TRIALS" --db "$OUT/db" \
        --storage sqlite:////tmp/tune.db --jobs "$JOBS" --timeout "$TIMEOUT" --no-progress
    done
  done
fi

if has_step evidence; then
  # Without this run's exhaustive step, table b uses recorded studies if EXH_DATA names a
  # folder holding t40.db and tall.db (e.g. benchmarks/results/session2).
  if ! has_step exhaustive && [ -n "$EXH_DATA" ] && [ ! -f /tmp/tall.db ]; then
    cp "$EXH_DATA/tall.db" /tmp/ || log "no recorded studies in $EXH_DATA"
    [ -f /tmp/t40.db ] || cp "$EXH_DATA/t40.db" /tmp/
  fi
  args=(--out "$OUT/evidence")
  [ -f /tmp/tune.db ] && args+=(--storage sqlite:////tmp/tune.db)
  [ -f /tmp/t40.db ] && [ -f /tmp/tall.db ] &&
    args+=(--sampled-storage sqlite:////tmp/t40.db --exhaustive-storage sqlite:////tmp/tall.db)
  args+=(--db "$OUT/db" --loo)
  run python3 benchmarks/tune_evidence.py "${args[@]}"
fi

# Pack: the device returns at most 8 files, at most 2 folders deep.
log "packing"
tar -czf "$OUT/db.tar.gz" --exclude='.*.lock' -C "$OUT" db && rm -rf "$OUT/db"
[ -f "$OUT/evidence.json" ] && mv "$OUT/evidence.json" /tmp/evidence.json
data=()
for f in tune.db t40.db tall.db db40 dball evidence.json; do [ -e "/tmp/$f" ] && data+=("$f"); done
[ ${#data[@]} -gt 0 ] && tar -czf "$OUT/data.tar.gz" --exclude='.*.lock' -C /tmp "${data[@]}"
ls -la "$OUT" | tee -a "$LOG"
