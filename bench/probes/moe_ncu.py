"""Probe: the MoE decode kernels (int4 experts, or bf16 with the word bf16) at real shape, called eagerly
(a few calls, fresh ids each) so that Nsight Compute can profile one launch of each with cold caches:

    ncu --clock-control none --kernel-name regex:'moe_(gate_up|down)_kernel' --launch-skip 4 \
        --launch-count 2 --section SpeedOfLight --section WarpStateStats python bench/probes/moe_ncu.py [T] [bf16]
"""

from __future__ import annotations

import sys

import torch

from bench.bench_moe_decode import REAL, draw_ids, make_weights, ours, ours_int4


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("moe_ncu: needs a CUDA GPU and the extension built with CUDA")
    T = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    fn = ours if "bf16" in sys.argv[2:] else ours_int4
    torch.manual_seed(0)
    s = REAL
    w = make_weights(s, "cuda", torch.bfloat16)
    for _ in range(6):
        x = torch.randn(T, s["H"], device="cuda").to(torch.bfloat16)
        ids = draw_ids(T, s["k"], s["E"]).cuda()
        fn(x, w, ids, torch.rand(T, s["k"], device="cuda") + 0.1, x.clone())
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
