#!/usr/bin/env bash
# s26 call 5: build; test_grouped_gemm_int4 + memcheck (7 tiles); int4 ping-pong tiles vs cooperative vs bf16; model prefill
set -u
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
t0=$(date +%s)
OUT=$OUT bash bench/gpu_check.sh build > $OUT/build_tail.txt 2>&1; tail -3 $OUT/build_tail.txt
unset CC CXX; export PYTHONPATH=/tmp/site:$PWD
L=$OUT/log.txt
stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)" >> $L; }
stamp "test_grouped_gemm_int4 + memcheck"
( timeout 200 python3 -m pytest -q tests/test_grouped_gemm_int4.py > $OUT/t_grouped_gemm_int4.txt 2>&1; echo "test rc=$?: $(tail -1 $OUT/t_grouped_gemm_int4.txt)" >> $L ) &
( DOTS1_SANITIZE_SMALL=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 200 compute-sanitizer --tool memcheck python3 tests/sanitize_grouped_gemm_int4.py > $OUT/memcheck_grouped_gemm_int4.txt 2>&1; echo "memcheck rc=$?: $(tail -1 $OUT/memcheck_grouped_gemm_int4.txt)" >> $L ) &
wait
grep -h "FAILED\|Error" $OUT/t_grouped_gemm_int4.txt | head -10 >> $L
stamp "tiles"
timeout 330 python3 .ab/s26_pp.py > $OUT/pp.txt 2>&1
echo "tiles rc=$?" >> $L
stamp end
cat $L; cat $OUT/pp.txt | grep -v Warn
