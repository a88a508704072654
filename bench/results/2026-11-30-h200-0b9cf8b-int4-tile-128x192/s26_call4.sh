#!/usr/bin/env bash
# s26 call 4: build; test_grouped_gemm + test_grouped_gemm_int4; the pair bf16 (new coop bound) vs int4
set -u
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
t0=$(date +%s)
OUT=$OUT bash bench/gpu_check.sh build > $OUT/build_tail.txt 2>&1; tail -1 $OUT/build_tail.txt
unset CC CXX; export PYTHONPATH=/tmp/site:$PWD
L=$OUT/log.txt
stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)" >> $L; }
stamp "tests"
( timeout 240 python3 -m pytest -q tests/test_grouped_gemm.py > $OUT/t_grouped_gemm.txt 2>&1; echo "test_grouped_gemm rc=$?: $(tail -1 $OUT/t_grouped_gemm.txt)" >> $L ) &
( timeout 240 python3 -m pytest -q tests/test_grouped_gemm_int4.py > $OUT/t_grouped_gemm_int4.txt 2>&1; echo "test_grouped_gemm_int4 rc=$?: $(tail -1 $OUT/t_grouped_gemm_int4.txt)" >> $L ) &
wait
grep -h "FAILED\|Error" $OUT/t_grouped_gemm*.txt | head -10 >> $L
stamp "pair"
timeout 200 python3 .ab/s26_pair.py > $OUT/pair_bf16_int4.txt 2>&1; echo "pair rc=$?" >> $L
stamp end
cat $L; grep -v Warn $OUT/pair_bf16_int4.txt
