"""Probe: where the routed experts' time goes, stage by stage, in bench_moe_peer's setting (issue 15).

bench_moe_peer times ours as one chain: permute -> grouped_gemm(gate_up, swiglu_interleaved) ->
grouped_gemm(down) -> unpermute. This probe times the same chain and each stage alone, at real shape
(H=4096, E=128 top-6, I=1408, bf16), balanced and Zipf routing, each captured in a CUDA graph over
bench_moe_peer's weight sets (so L2 does not serve the experts the previous call read), replayed
round robin. Beside each stage is its floor:
- permute: reads x [T, H] and writes [6T, H]; unpermute: reads [6T, H] and writes [T, H]. Bytes over
  the measured copy bandwidth.
- The GEMMs: max(FLOPs over the dense GEMM rate, touched experts' bytes over the copy bandwidth).

grouped_vs_dense.py found the GEMMs level with cuBLAS at the same FLOPs at T=16384. This probe says
how much of the chain is left outside them.

    PYTHONPATH=. python bench/probes/moe_peer_stages.py [T ...]     (default 4096 16384; CPU: tiny shapes)
"""

from __future__ import annotations

import sys

import torch

from bench.bench_moe_peer import REAL, TINY, WEIGHT_SETS, calls_per_graph, make_weights, ours_permute
from bench.common import (bytes_floor_ms, capture_graph, flops_floor_ms, make_routing, on_gpu, time_fn,
                          time_fns)
from dots1_ext import ops


def stage_fns(x, w, ids, weights, E):
    """The chain and each of its stages alone, on inputs made once by the stages before it."""
    permuted, offsets, row_map = ops.permute(x, ids, E)
    act = ops.grouped_gemm(permuted, w["gate_up_interleaved"], offsets, "swiglu_interleaved")
    down_out = ops.grouped_gemm(act, w["down"], offsets, "none")
    return {
        "chain": lambda: ours_permute(x, w, ids, weights),
        "permute": lambda: ops.permute(x, ids, E),
        "gate_up + SwiGLU": lambda: ops.grouped_gemm(permuted, w["gate_up_interleaved"], offsets, "swiglu_interleaved"),
        "down": lambda: ops.grouped_gemm(act, w["down"], offsets, "none"),
        "unpermute": lambda: ops.unpermute(down_out, row_map, weights),
    }


def main() -> None:
    gpu = on_gpu()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    s = REAL if gpu else TINY
    E, k, H, I = s["E"], s["k"], s["H"], s["I"]
    Ts = [int(a) for a in sys.argv[1:]] or ([4096, 16384] if gpu else [64])
    elt = torch.finfo(dtype).bits // 8
    sets = [make_weights(s, device, dtype, seed=i) for i in range(WEIGHT_SETS if gpu else 1)]
    print(f"{'GPU ' + torch.cuda.get_device_name() if gpu else 'CPU (tiny shapes, perf_counter)'}, "
          f"H={H} E={E} top-{k} I={I} {dtype}", flush=True)
    for T in Ts:
        for routing in ("balanced", "zipf"):
            ids_cpu, weights_cpu = make_routing(routing, T, k, E, seed=0)
            ids, weights = ids_cpu.to(device), weights_cpu.to(device)
            x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(device, dtype)
            active = int(torch.bincount(ids_cpu.reshape(-1).long(), minlength=E).gt(0).sum())
            n_calls = calls_per_graph(T) if gpu else 1
            per_set = [stage_fns(x, sets[i % len(sets)], ids, weights, E) for i in range(n_calls)]
            names = list(per_set[0])
            if gpu:  # one graph per stage holding n_calls calls over the weight sets
                graphs = {n: capture_graph(lambda i, n=n: per_set[i][n](), [(i,) for i in range(n_calls)])
                          for n in names}
                ms = {n: v / n_calls for n, v in time_fns({n: g.replay for n, g in graphs.items()},
                                                          warmup=2, rounds=7, iters=3).items()}
                del graphs
            else:
                ms = {n: time_fn(per_set[0][n], 1, 3) for n in names}
            moved = T * k * H * elt + T * H * elt  # [6T, H] one way, [T, H] the other
            gate_up_bytes = active * 2 * I * H * elt
            down_bytes = active * H * I * elt
            floors = {
                "permute": bytes_floor_ms(moved),
                "gate_up + SwiGLU": max(flops_floor_ms(2.0 * T * k * 2 * I * H), bytes_floor_ms(gate_up_bytes)),
                "down": max(flops_floor_ms(2.0 * T * k * I * H), bytes_floor_ms(down_bytes)),
                "unpermute": bytes_floor_ms(moved),
            }
            floors["chain"] = sum(floors.values())
            stages = sum(ms[n] for n in names if n != "chain")
            print(f"T={T} {routing} ({active} experts): chain {ms['chain']:.3f} ms, stages add to {stages:.3f}",
                  flush=True)
            for n in names:
                print(f"  {n:18s} {ms[n]:8.3f} ms  ({ms[n] / ms['chain']:5.1%} of the chain)  "
                      f"floor {floors[n]:.3f} ms  floor/time {floors[n] / ms[n]:.2f}", flush=True)


if __name__ == "__main__":
    main()
