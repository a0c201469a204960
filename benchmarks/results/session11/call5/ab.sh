# A/B of fla-compat's 64k selection_fwd entry in the composed forward, alternating in one
# call: A = the shipped DB (FORCED 64, BLOCK_N 32), B = the same DB with the entry of before
# call 3 (SHARE 1, BLOCK_N 64, FORCED 0).
source benchmarks/device_env.sh
export NSA_GEN_LOG=ERROR
rm -rf /tmp/dbB && cp -r tuning_db /tmp/dbB
cp benchmarks/results/session11/call5/selection_fwd_before.json /tmp/dbB/sm90-132sm-140gib/selection_fwd.json
for i in 1 2 3; do
  for v in A B; do
    db=tuning_db; [ $v = B ] && db=/tmp/dbB
    NSA_GEN_DB=$db python3 cli.py bench fla-compat deepseek-nsa --seqlens 65536 --no-baselines --out /tmp/ab_$v$i 2>&1 | grep "T=65536"
    echo "$v$i"
  done
done
mkdir -p $OUT && for d in /tmp/ab_*; do cp $d/bench.json $OUT/$(basename $d).json; done
