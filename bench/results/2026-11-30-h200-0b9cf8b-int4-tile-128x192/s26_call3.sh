#!/usr/bin/env bash
# s26 call 3: build; 62-layer int4 prefill tiles A/B; bf16 coop/pingpong tune; 8-layer bf16 prefill COOP_MIN_ROWS A/B
set -u
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
t0=$(date +%s)
OUT=$OUT bash bench/gpu_check.sh build > $OUT/build_tail.txt 2>&1; tail -1 $OUT/build_tail.txt
unset CC CXX; export PYTHONPATH=/tmp/site:$PWD
L=$OUT/log.txt
stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)" >> $L; }
stamp "62-layer int4 prefill tiles"
MODE=int4 TS=2048,4096,8192 timeout 200 python3 .ab/s26_prefill_ab.py > $OUT/prefill62_int4_tiles.txt 2>&1; echo "rc=$?" >> $L
stamp "bf16 tune"
timeout 200 python3 -m bench.tune_grouped_gemm --json $OUT/tune.json > $OUT/tune.log 2>&1; echo "rc=$?" >> $L
stamp "8-layer bf16 prefill coop min rows"
MODE=bf16 TS=2048,4096,8192,16384 timeout 150 python3 .ab/s26_prefill_ab.py > $OUT/prefill8_bf16_coop.txt 2>&1; echo "rc=$?" >> $L
stamp end
cat $L; grep -v Warn $OUT/prefill62_int4_tiles.txt $OUT/tune.log $OUT/prefill8_bf16_coop.txt
