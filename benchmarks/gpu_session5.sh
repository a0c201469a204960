#!/usr/bin/env bash
# Session 5-9 device calls (plans/session5.md, session6.md). Steps, each on if its
# variable is set:
#   VERIFY=1  bf16 verify at 2k (every structural variant) of VERIFY_KERNELS (default: topn,
#             selection_fwd, nsa);
#   PROBE=1   benchmarks/topn_probe.py at 64k: the bitonic DB config against the rank merge;
#   WS="SPEC:STEM ..."  benchmarks/ws_probe.py at 64k: warp-specialized main loops;
#   VARIANTS="SPEC:STEM:P=V[,P=V] ..."  benchmarks/variant_probe.py at 64k: the dispatcher's
#             config against it with those params changed (VARIANTS_S seconds);
#   TUNE="KERNELS|SPECS|SEQLENS|TRIALS|SECONDS ..."  gpu_tune_all.sh runs (one per word, in
#             order, each within its seconds and resuming the DB and studies of the one
#             before; RESUME=DIR for the first; lists comma-separated);
#   FORCED="SPEC:P=V[,P=V] ..."  benchmarks/forced_probe.py at 64k: selection_fwd's FORCED
#             variant, its forced pass and group-centric kernel timed apart;
#   OVERLAP="SPEC:STEM+STEM ..."  benchmarks/overlap_probe.py at 64k: kernels on two streams;
#   NCU="SPEC:STEM ..."  benchmarks/ncu_probe.py under Nsight Compute: one launch's counters
#             (NCU_SECTIONS), each report in $OUT/ncu_SPEC_STEM.txt;
#   BENCH="SEQLENS"  nsa-gen bench of deepseek-nsa, fla-compat and small-group with the tuned DB.
# Usage: [BUDGET_S=560] VERIFY=1 PROBE=1 TUNE=... BENCH=65536 bash benchmarks/gpu_session5.sh
set -o pipefail
source "$(dirname "$0")/device_env.sh"
BUDGET_S=${BUDGET_S:-560}
gpu_info
if [ -n "$VERIFY" ]; then
  timeout ${VERIFY_S:-200} python3 cli.py verify deepseek-nsa fla-compat small-group mqa -T 2048 \
    --kernels ${VERIFY_KERNELS:-topn selection_fwd nsa} 2>&1 | quiet > "$OUT/verify.txt"
  grep -v "| pass" "$OUT/verify.txt" | grep -v "^| spec\|^|--" | head -20
  echo "verify: exit ${PIPESTATUS[0]} after ${SECONDS}s, $(grep -c '| pass' "$OUT/verify.txt") pass"
  grep "FAIL" "$OUT/verify.txt"
fi
if [ -n "$PROBE" ]; then
  timeout 200 python3 benchmarks/topn_probe.py --out "$OUT" deepseek-nsa:4 deepseek-nsa:4:rank \
    deepseek-nsa:8:rank deepseek-nsa:16:rank fla-compat:4:rank fla-compat:8:rank small-group:16:rank \
    small-group:8:rank mqa:64:rank 2>&1 | quiet | cut -c1-300
  echo "probe done after ${SECONDS}s"
fi
if [ -n "$WS" ]; then
  timeout ${WS_S:-150} python3 benchmarks/ws_probe.py --out "$OUT" $WS 2>&1 | quiet | cut -c1-400
  echo "ws probe done after ${SECONDS}s"
fi
if [ -n "$VARIANTS" ]; then
  timeout ${VARIANTS_S:-200} python3 benchmarks/variant_probe.py --out "$OUT" $VARIANTS 2>&1 | quiet | cut -c1-500
  echo "variant probe done after ${SECONDS}s"
fi
if [ -n "$FORCED" ]; then
  timeout ${FORCED_S:-200} python3 benchmarks/forced_probe.py --out "$OUT" $FORCED 2>&1 | quiet | cut -c1-900
  echo "forced probe done after ${SECONDS}s"
fi
if [ -n "$OVERLAP" ]; then
  timeout ${OVERLAP_S:-200} python3 benchmarks/overlap_probe.py --out "$OUT" $OVERLAP 2>&1 | quiet | cut -c1-500
  echo "overlap probe done after ${SECONDS}s"
fi
if [ -n "$NCU" ]; then
  ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
  sections=""; for sec in ${NCU_SECTIONS:-SpeedOfLight MemoryWorkloadAnalysis ComputeWorkloadAnalysis Occupancy LaunchStats WarpStateStats SchedulerStats}; do sections="$sections --section $sec"; done
  for run in $NCU; do
    stem=${run#*:}; f="$OUT/ncu_${run/:/_}.txt"
    timeout ${NCU_S:-120} "$ncu_bin" --clock-control none --kernel-name regex:nsa_${stem}_kernel \
      --launch-skip 1 --launch-count 1 $sections python3 benchmarks/ncu_probe.py $run > "$f" 2>&1
    echo "ncu $run: exit $? after ${SECONDS}s"
    grep -E "Duration|Memory Throughput|L2 Cache Throughput|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Issue Slots Busy|No Eligible" "$f" | head -24
  done
fi
mkdir -p /tmp/r
[ -n "$RESUME" ] && cp "$RESUME"/db.tar.gz "$RESUME"/data.tar.gz /tmp/r/
for run in $TUNE; do
  IFS='|' read -r kernels specs seqlens trials secs <<< "$run"
  res=; [ -f /tmp/r/db.tar.gz ] && [ -f /tmp/r/data.tar.gz ] && res=/tmp/r
  STEPS=tune KERNELS="$kernels" SEQLENS=$seqlens TRIALS=$trials JOBS=12 BUDGET_S=$secs RESUME=$res \
    bash "$(dirname "$0")/gpu_tune_all.sh" ${specs//,/ } > /dev/null
  grep "T=\|skipped\|exit status" "$OUT/log.txt" | cut -c1-160; cat "$OUT/log.txt" >> /tmp/r/log_all.txt
  rm -f "$OUT/log.txt"
  mv "$OUT/db.tar.gz" "$OUT/data.tar.gz" /tmp/r/ 2>/dev/null
  rm -rf "$OUT/db"
done
[ -f /tmp/r/log_all.txt ] && mv /tmp/r/log_all.txt "$OUT/log.txt"
[ -f /tmp/r/db.tar.gz ] && cp /tmp/r/db.tar.gz "$OUT/"
[ -f /tmp/r/data.tar.gz ] && cp /tmp/r/data.tar.gz "$OUT/"
if [ -n "$BENCH" ]; then
  if [ -f /tmp/r/db.tar.gz ]; then
    mkdir -p /tmp/final && tar -xzf /tmp/r/db.tar.gz -C /tmp/final && export NSA_GEN_DB=/tmp/final/db
  fi
  export NSA_GEN_LOG=ERROR
  timeout $((BUDGET_S + 20 - SECONDS)) python3 cli.py bench deepseek-nsa fla-compat small-group \
    --seqlens $BENCH ${BENCH_ARGS} --out /tmp/bench 2>&1 | quiet | tail -14
  tar -czf "$OUT/bench.tar.gz" -C /tmp bench
fi
echo "done after ${SECONDS}s"; ls -la "$OUT"
