"""Probe: the bf16 grouped GEMM against a dense GEMM of the same FLOPs, to tell what limits the MoE
GEMMs at a given T. One process, round robin (bench.common.time_fns): cuBLAS torch.mm of all S = 6T
rows against one weight; our grouped GEMM with E=1 (one group holding every row, the same single
weight) and with E=128 balanced groups (S/128 rows each, 128 weights), each under the cooperative
128x256 and the ping-pong 64x256 configuration, for the gate_up (N=2816, K=4096, no epilogue) and
the down (N=4096, K=1408) shapes.

E=1 against cuBLAS isolates the kernel configuration (tile, stages, epilogue); E=128 against E=1 the
groups (tile quantisation at S/128 rows, per-group tensormap updates, and 128 weights to stream
instead of one that stays in L2).

    PYTHONPATH=. T=16384 python bench/probes/grouped_vs_dense.py
"""

from __future__ import annotations

import os

import torch

from bench.common import time_fns, with_env
from dots1_ext.ops.grouped_gemm import grouped_gemm


def main() -> None:
    H, I, k, E = 4096, 1408, 6, 128
    T = int(os.environ.get("T", "16384"))
    S = T * k
    torch.manual_seed(0)
    x = torch.randn(S, H, device="cuda", dtype=torch.bfloat16)
    for N, K, name in ((2 * I, H, "gate_up (plain)"), (H, I, "down")):
        xs = x[:, :K].contiguous()
        w1 = torch.randn(1, N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        wE = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        off1 = torch.tensor([0, S], device="cuda", dtype=torch.int32)
        offE = torch.arange(0, S + 1, S // E, device="cuda", dtype=torch.int32)
        fns = {"cuBLAS mm": lambda: torch.mm(xs, w1[0].t())}
        for c in ("coop", "pingpong"):
            env = {"DOTS1_EXT_GEMM_SM90_CONFIG": c, "DOTS1_EXT_GEMM_BACKEND": "cutlass"}
            fns[f"E=1 {c}"] = with_env(env, lambda: grouped_gemm(xs, w1, off1, "none"))
            fns[f"E={E} {c}"] = with_env(env, lambda: grouped_gemm(xs, wE, offE, "none"))
        ms = time_fns(fns, warmup=3, rounds=7, iters=3)
        tf = 2 * S * N * K / 1e12
        print(f"T={T} {name} N={N} K={K}: "
              + ", ".join(f"{n} {v:.3f} ms ({tf / v * 1e3:.0f} TFLOP/s)" for n, v in ms.items()), flush=True)


if __name__ == "__main__":
    main()
