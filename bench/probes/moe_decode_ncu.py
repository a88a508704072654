"""Probe: one real-shape MoE decode layer at T tokens (default 1), bf16 experts then int4 experts, for
Nsight Compute: where the int4 decode kernels' time goes next to the bf16 ones'.

    ncu --clock-control none -k regex:moe_ --launch-skip 12 --launch-count 4 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \\
        python bench/probes/moe_decode_ncu.py [T]

Three warm-up calls of each (12 kernel launches: gate_up and down per call), then one call of each
(bf16 gate_up, bf16 down, int4 gate_up, int4 down). Shapes and weights as bench/bench_moe_decode.py
(E=128, top-6, H=4096, I=1408, shared Is=2816; the int4 experts quantized from the bf16 ones).
"""

from __future__ import annotations

import sys

import torch

from bench.bench_moe_decode import REAL, draw_ids, make_weights, ours, ours_int4


def main() -> None:
    T = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    torch.manual_seed(0)
    s = REAL
    w = make_weights(s, "cuda", torch.bfloat16)
    x = torch.randn(T, s["H"], device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    ids = draw_ids(T, s["k"], s["E"]).cuda()
    weights = torch.rand(T, s["k"], device="cuda")
    for fn in (ours, ours_int4):
        for _ in range(3):
            fn(x, w, ids, weights, residual)
    torch.cuda.synchronize()
    for fn in (ours, ours_int4):
        fn(x, w, ids, weights, residual)
    torch.cuda.synchronize()
    print("done", T)


if __name__ == "__main__":
    main()
