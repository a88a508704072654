"""Probe: permute and unpermute at real shape (E=128, top-6, H=4096, bf16, balanced routing) for Nsight
Compute: why unpermute moved its bytes at ~0.67 of copy bandwidth at T=16384 while permute's row scatter,
its mirror image, reaches ~0.9 (bench/results/2026-12-01-h200-s29/summary.md). Answered in s30: 64
registers, 4 blocks per SM (309 µs); 39 registers since (214 µs, bench/results/2026-12-01-h200-s30).

    PYTHONPATH=. ncu --clock-control none -k regex:"permute_scatter|unpermute" --launch-skip 4 --launch-count 2 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \\
        --section WarpStateStats --section LaunchStats python bench/probes/dispatch_ncu.py [T]

Two warm-up calls of each (4 launches of the two kernels), then one call of each. unpermute reads
the permuted rows as the chain's down GEMM leaves them (random values here).
"""

from __future__ import annotations

import sys

import torch

from bench.common import make_routing
from dots1_ext import ops

E, K, H = 128, 6, 4096


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("dispatch_ncu: needs a CUDA GPU")
    T = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
    ids, weights = make_routing("balanced", T, K, E, seed=0)
    ids, weights = ids.cuda(), weights.cuda()
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    expert_out = torch.randn(T * K, H, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        permuted, offsets, row_map = ops.permute(x, ids, E)
        ops.unpermute(expert_out, row_map, weights)
    torch.cuda.synchronize()
    print(f"dispatch_ncu: T={T} done")


if __name__ == "__main__":
    main()
