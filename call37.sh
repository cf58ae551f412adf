#!/bin/bash
cd "$(dirname "$0")"
timeout 420 python benchmarks/gluon_check.py --dims 64 --ns 2048,4096,8192,16384 --variants "wsp 128/4,wsp3 192/4" \
  --full "" --fp16 "wsp3 192/4" --bench nosoftcap,fp16 --rounds 3 --limit 200 --bench-limit 300 > $OUT/gluon_call37.log 2>&1
grep -E "^(FAIL|SKIP)|TIMEOUT|fwd \(gluon" $OUT/gluon_call37.log | head
grep -c "^PASS" $OUT/gluon_call37.log
sed -n '/^Numerics/,$p' $OUT/gluon_call37.log | tail -14
