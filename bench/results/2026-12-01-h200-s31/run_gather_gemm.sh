#!/usr/bin/env bash
# A copy of the session's .ab/ script (an ignored folder), run on the device from the repository root as
# OUT=$OUT bash .ab/<name>.sh with carry [".whl", ".ab"(, ".peers")]; kept here as the record of what ran.
set -u
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/o}; mkdir -p $O
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/nvidia_cutlass*.whl > /dev/null 2>&1
C=/tmp/site/cutlass_library/source/include
/usr/local/cuda/bin/nvcc -O3 -std=c++17 -arch=sm_90a --expt-relaxed-constexpr -Icsrc -I$C -o /tmp/gather_gemm bench/probes/gather_gemm.cu > $O/gather_gemm_build.txt 2>&1 || { tail -20 $O/gather_gemm_build.txt; exit 1; }
timeout 150 /tmp/gather_gemm > $O/gather_gemm.txt 2>&1; echo "rc=$?" >> $O/gather_gemm.txt
cat $O/gather_gemm.txt
