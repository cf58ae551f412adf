set -x
M=sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_shared_cycles_active.avg.pct_of_peak_sustained_active,sm__cycles_active.min,sm__cycles_active.avg,sm__cycles_active.max,sm__cycles_elapsed.max
cd benchmarks
timeout 150 ncu --clock-control none --profile-from-start off --import-source yes --section SpeedOfLight --section WarpStateStats --section SourceCounters --metrics $M -o $OUT/r python ncu_forward.py --n 1024 --d 64 --causal --variant "wspstpdfq 128/4" --cudnn > $OUT/prof.log 2>&1
tail -3 $OUT/prof.log
ncu -i $OUT/r.ncu-rep > $OUT/ncu_call78.txt 2>&1
ncu -i $OUT/r.ncu-rep --page source --print-source sass --csv > $OUT/sass.csv 2>$OUT/sass.err
ncu -i $OUT/r.ncu-rep --page source --print-source cuda,sass --csv > $OUT/cuda_sass.csv 2>$OUT/cs.err
head -c 400 $OUT/cs.err; head -c 300 $OUT/cuda_sass.csv; echo
python ncu_sass.py $OUT/sass.csv --top 30 > $OUT/sass_summary.txt 2>&1
grep -n "sm__cycles\|Duration\|tensor_cycles\|Issued" $OUT/ncu_call78.txt
rm -f $OUT/r.ncu-rep
cd ..
timeout 380 python benchmarks/gluon_check.py --dims 64,128 --ns 1024,2048,4096,8192 \
  --variants "wspstpdfq 128/4,wspstpdfqb 128/4,wspstpdf 128/4,wspstpdfb 128/4,wsp3stpf 192/4,wsp3stpfb 192/4,wspstdf 128/2,wspstdfb 128/2,wspstpdf 128/2,wspstpdfb 128/2" \
  --full wspstpdfqb,wspstpdfb,wspstdfb,wsp3stpfb --fp16 "wspstpdfqb 128/4,wspstpdfb 128/2" \
  --limit 150 --rounds 3 --no-warm --bench nosoftcap,noplain,noportable --bench-limit 200 > $OUT/gluon_call79.log 2>&1
grep -v "^---\|^ROW\|^  " $OUT/gluon_call79.log | tail -40
