#!/usr/bin/env bash
# s26 call 6: build; bench_moe_peer at T=4096,16384 (the bf16 GEMM's new H200 coop bound) against the tuned Triton peer
set -u
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
t0=$(date +%s)
OUT=$OUT bash bench/gpu_check.sh build > $OUT/build_tail.txt 2>&1; tail -1 $OUT/build_tail.txt
unset CC CXX; export PYTHONPATH=/tmp/site:$PWD
echo "build $(( $(date +%s) - t0 )) s"
DOTS1_BENCH_MOE_PEER_TS=4096,16384 DOTS1_EXT_PEER_SWEEP_S=12 timeout 250 python3 -m bench.run --only moe_peer --json $OUT/moe_peer.json --md $OUT/moe_peer.md > $OUT/moe_peer.txt 2>&1; echo "moe_peer rc=$? at $(( $(date +%s) - t0 )) s"
grep -v Warn $OUT/moe_peer.md | tail -30
