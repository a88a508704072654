"""Measures the two CUTLASS sm90 configurations of grouped_gemm (cooperative 128x256, ping-pong
64x256) at Dots1 shapes over T and routing, gate_up (fused SwiGLU) and down separately, round-robin,
to set the auto heuristic (DOTS1_EXT_GEMM_COOP_MIN_ROWS: cooperative tiles from this many rows per
expert on average; the choice may use only S, E, N and K, since reading the offsets would synchronise).

    python -m bench.tune_grouped_gemm [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from bench.bench_grouped_gemm import routing_offsets
from bench.common import environment, time_fns
from dots1_ext.ops.grouped_gemm import grouped_gemm, interleave_gate_up

E, K_TOP, H, I = 128, 6, 4096, 1408


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    args = p.parse_args()
    os.environ["DOTS1_EXT_GEMM_BACKEND"] = "cutlass"
    dev, dt = "cuda", torch.bfloat16
    w_gate_up = torch.randn(E, 2 * I, H, device=dev, dtype=dt) / H**0.5
    w_down = torch.randn(E, H, I, device=dev, dtype=dt) / I**0.5
    w_gate_up = interleave_gate_up(w_gate_up)  # as the model runs it: fused SwiGLU epilogue
    rows = []
    print(f"{'T':>6} {'routing':8} {'rows/expert':>11}  gate_up coop / pingpong ms   down coop / pingpong ms", flush=True)
    for T in (256, 512, 1024, 2048, 4096, 8192, 16384):
        for routing in ("balanced", "zipf"):
            off = routing_offsets(routing, T, K_TOP, E, dev)
            S = T * K_TOP
            x = torch.randn(S, H, device=dev, dtype=dt)
            h = torch.randn(S, I, device=dev, dtype=dt)

            def with_config(config, fn):
                def run():
                    os.environ["DOTS1_EXT_GEMM_SM90_CONFIG"] = config
                    return fn()
                return run

            fns = {}
            for config in ("coop", "pingpong"):
                fns[f"gate_up {config}"] = with_config(config, lambda: grouped_gemm(x, w_gate_up, off, "swiglu_interleaved"))
                fns[f"down {config}"] = with_config(config, lambda: grouped_gemm(h, w_down, off, "none"))
            times = time_fns(fns, warmup=3, rounds=6, iters=4)
            rows.append(dict(T=T, routing=routing, rows_per_expert=S / E, **times))
            print(f"{T:>6} {routing:8} {S / E:>11.0f}  {times['gate_up coop']:>12.3f} / {times['gate_up pingpong']:<12.3f}"
                  f"{times['down coop']:>10.3f} / {times['down pingpong']:<8.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
