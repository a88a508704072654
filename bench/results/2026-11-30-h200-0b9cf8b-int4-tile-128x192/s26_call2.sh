#!/usr/bin/env bash
# s26 call 2: build; tiles 192 vs 256 at T=8192..16384 + model prefill; 62-layer int4 row; fresh README main + int4 test files
set -u
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
t0=$(date +%s)
OUT=$OUT bash bench/gpu_check.sh build > $OUT/build_tail.txt 2>&1; tail -1 $OUT/build_tail.txt
unset CC CXX; export PYTHONPATH=/tmp/site:$PWD
L=$OUT/log.txt
stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)" >> $L; }
stamp "tiles large T"
TILES=128x128,128x192,128x256 TS=8192,12288,16384 MODEL_TS=4096,16384 timeout 240 python3 .ab/s25_tiles2.py > $OUT/tiles192_large.txt 2>&1
echo "tiles rc=$?" >> $L
stamp "62-layer int4"
DOTS1_BENCH_INT4_MODELS=62:int4 timeout 200 python3 -m bench.run --only int4_model --json $OUT/int4_model.json --md $OUT/int4_model.md > $OUT/int4_model_62.txt 2>&1
echo "int4_model rc=$?" >> $L
stamp "fresh"
( FILES='tests/test_grouped_gemm_int4.py tests/test_quant.py tests/test_model.py' P=3 timeout 330 bash .ab/full_suite.sh ) ; echo "fresh rc=$?" >> $L
stamp end
cat $L; grep -v Warn $OUT/tiles192_large.txt; grep -i "tok\|prefill\|GiB\|floor" $OUT/int4_model_62.txt | head -20; cat $OUT/fresh.txt | grep -v "^\s*$" | tail -12
