#!/bin/bash
cd "$(dirname "$0")"
timeout 420 python benchmarks/gluon_check.py --dims 64 --ns 1024,2048,4096,8192,16384 --variants "wsp 128/4,wsp3 192/4" \
  --full wsp3 --fp16 "wsp3 192/4" --bench nosoftcap --rounds 3 --no-warm --limit 200 --bench-limit 300 > $OUT/gluon_call36.log 2>&1
grep -E "^(FAIL|SKIP)|TIMEOUT" $OUT/gluon_call36.log | head
grep -c "^PASS" $OUT/gluon_call36.log
sed -n '/^Numerics/,$p' $OUT/gluon_call36.log | grep -v "^Numerics" | tail -14
