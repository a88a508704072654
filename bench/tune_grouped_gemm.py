"""Measures the two CUTLASS sm90 configurations of grouped_gemm (cooperative 128x256, ping-pong
64x256) at Dots1 shapes over T and routing, to set the auto heuristic (DOTS1_EXT_GEMM_COOP_MIN_ROWS:
cooperative tiles from this many rows per expert on average; the choice may use only S and E, since
reading the offsets would synchronise).

    python -m bench.tune_grouped_gemm [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from bench.bench_grouped_gemm import routing_offsets
from bench.common import environment, time_fn
from dots1_ext.ops.grouped_gemm import grouped_gemm

E, K_TOP, H, I = 128, 6, 4096, 1408


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    args = p.parse_args()
    os.environ["DOTS1_EXT_GEMM_BACKEND"] = "cutlass"
    dev, dt = "cuda", torch.bfloat16
    w_gate_up = torch.randn(E, 2 * I, H, device=dev, dtype=dt) / H**0.5
    w_down = torch.randn(E, H, I, device=dev, dtype=dt) / I**0.5
    rows = []
    print(f"{'T':>6} {'routing':8} {'rows/expert':>11} {'coop ms':>8} {'pingpong ms':>11}")
    for T in (256, 512, 1024, 2048, 4096, 8192, 16384):
        for routing in ("balanced", "zipf"):
            off = routing_offsets(routing, T, K_TOP, E, dev)
            S = T * K_TOP
            x = torch.randn(S, H, device=dev, dtype=dt)
            h = torch.randn(S, I, device=dev, dtype=dt)
            times = {}
            for config in ("coop", "pingpong"):
                os.environ["DOTS1_EXT_GEMM_SM90_CONFIG"] = config
                times[config] = time_fn(lambda: (grouped_gemm(x, w_gate_up, off, "swiglu"),
                                                 grouped_gemm(h, w_down, off, "none")), warmup=5, iters=20)
            rows.append(dict(T=T, routing=routing, rows_per_expert=S / E, **times))
            print(f"{T:>6} {routing:8} {S / E:>11.0f} {times['coop']:>8.3f} {times['pingpong']:>11.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
