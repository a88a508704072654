#!/usr/bin/env bash
# A copy of the session's .ab/ script (an ignored folder), run on the device from the repository root as
# OUT=$OUT bash .ab/<name>.sh with carry [".whl", ".ab"(, ".peers")]; kept here as the record of what ran.
# Session 31, call 1: the probes (gather_a_tiles, the two refactored dispatch probes), build, peer T=8,64 and T=16384 (60 s sweep).
set -u
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/o}; mkdir -p $O
unset CC CXX
{ git log --oneline -1; git status --short | head; nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv; } > $O/call1.txt 2>&1
( for p in gather_a_tiles unpermute_variants permute_scatter_variants; do
    /usr/local/cuda/bin/nvcc -O3 -arch=sm_90a -std=c++17 -Xptxas -v -o /tmp/$p bench/probes/$p.cu > /tmp/$p.build 2>&1 || echo "nvcc $p failed" ; done ) &
cpid=$!
OUT=/tmp/gc bash bench/gpu_check.sh build >> $O/call1.txt 2>&1
wait $cpid
for p in gather_a_tiles unpermute_variants permute_scatter_variants; do
  echo "=== $p" >> $O/probes.txt; grep -E "registers|spill" /tmp/$p.build | head -12 >> $O/probes.txt
  timeout 120 /tmp/$p >> $O/probes.txt 2>&1; echo "rc=$?" >> $O/probes.txt
done
export PYTHONPATH=/tmp/site:$PWD:$PWD/.peers
python3 -c "import dots1_ext, torch; print(torch.__version__)" >> $O/call1.txt 2>&1
DOTS1_BENCH_MOE_PEER_TS=8,64 DOTS1_EXT_PEER_SWEEP_S=12 timeout 200 python3 -m bench.run --only moe_peer --json $O/peer_8_64.json --md $O/peer_8_64.md >> $O/call1.txt 2>&1
DOTS1_BENCH_MOE_PEER_TS=16384 DOTS1_EXT_PEER_SWEEP_S=60 timeout 220 python3 -m bench.run --only moe_peer --json $O/peer_16384.json --md $O/peer_16384.md >> $O/call1.txt 2>&1
echo done >> $O/call1.txt
