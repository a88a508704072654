"""Skinny GEMM (the decode linears) at the Dots1 shapes, M in {1, 2, 4, 8, 16}, bf16, against cuBLAS.

    python -m bench.bench_skinny_gemm [--quick]

Shapes [N, K]: qkv [12288, 4096]; o_proj [4096, 4096]; dense MLP gate_up [21888, 4096] + SwiGLU; dense
down [4096, 10944]; shared experts gate_up [5632, 4096] + SwiGLU; shared down [4096, 2816]; lm_head
[152064, 4096]. Peer, same run: F.linear (cuBLAS), plus the separate silu(gate) * up for the SwiGLU
shapes. Each implementation is captured in one CUDA graph of many calls (launch overhead excluded, as
in a decode step's graph) that rotates over enough copies of the weight (>= 200 MB together) for L2
(50 MB) never to serve a repeated read; the graphs are replayed round-robin and the median per call
reported. Floors: weight + x + output bytes over the measured device copy bandwidth ("floor",
floor / time beside it), and over the read-only ceiling measured in the same run (bench.common.
read_ceiling_gbs: the best of torch.sum, a cuBLAS GEMV and our M=1 kernel over 1.5 GB; "read floor" in the
notes). "dots1_ext" is the default kernel (the wide weight-load mapping: each warp load 2 rows x 256
bytes at M <= 2, 4 rows x 128 bytes at M <= 4, the fragment mapping above); "dots1_ext (frag)" forces
the fragment mapping (DOTS1_EXT_SKINNY_KERNEL=frag: 8 rows x 64 bytes per warp load; timed at M <= 4
only, where the two differ). Without --quick both mappings are also
timed with the tile choice forced to 1 and 2 weight tiles per warp (DOTS1_EXT_SKINNY_TILES), for tuning.
--quick on the GPU: four shapes, M in {1, 4, 8, 16}.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from bench.common import (Report, Row, bench_main, capture_graph, copy_bandwidth_gbs, on_gpu, read_ceiling_gbs, replay_ms,
                          time_fn, with_env)
from dots1_ext.ops.skinny_gemm import skinny_gemm

# (name, N, K, epilogue)
DOTS1_SHAPES = [
    ("qkv", 12288, 4096, "none"),
    ("o_proj", 4096, 4096, "none"),
    ("dense gate_up", 21888, 4096, "swiglu"),
    ("dense down", 4096, 10944, "none"),
    ("shared gate_up", 5632, 4096, "swiglu"),
    ("shared down", 4096, 2816, "none"),
    ("lm_head", 152064, 4096, "none"),
]
CPU_SHAPES = [("qkv (small)", 384, 256, "none"), ("gate_up (small)", 512, 256, "swiglu")]
ROTATION_BYTES = 200e6
# The most rows for which DOTS1_EXT_SKINNY_KERNEL=wide runs a kernel of its own (csrc/skinny_gemm).
WIDE_MAX_ROWS = 4


def graph_times_us(fns: dict[str, Callable], reps: int, rounds: int) -> dict[str, float]:
    """Per-call GPU microseconds: each fn captured ``reps`` times in one CUDA graph, the graphs
    replayed round-robin (order rotating per round, so drift falls on all alike), median / reps."""
    graphs = {label: capture_graph(fn, [()] * reps) for label, fn in fns.items()}
    labels = list(graphs)
    samples: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            samples[label].append(replay_ms(graphs[label]) * 1e3 / reps)
    del graphs
    return {label: statistics.median(v) for label, v in samples.items()}


def run(quick: bool = False) -> list[Report]:
    gpu = on_gpu()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    shapes = DOTS1_SHAPES if gpu else CPU_SHAPES
    if gpu and quick:
        shapes = [s for s in shapes if s[0] in ("qkv", "dense gate_up", "shared down", "lm_head")]
    Ms = ((1, 4, 8, 16) if quick else (1, 2, 4, 8, 16)) if gpu else ((1, 16) if quick else (1, 8, 16))
    copy_gbs, (read_gbs, read_detail) = copy_bandwidth_gbs(), read_ceiling_gbs()
    report = Report(f"skinny_gemm (decode linears, {str(dtype).replace('torch.', '')}, copy {copy_gbs:.0f} GB/s, "
                    f"read ceiling {read_gbs:.0f} GB/s)")
    report.notes.append(f"read ceiling: {read_detail}")
    if not gpu:
        report.notes.append("CPU timings of small shapes (the harness check); the GPU run times the Dots1 shapes")
    esize = torch.finfo(dtype).bits // 8
    for name, N, K, epilogue in shapes:
        w_bytes = N * K * esize
        copies = max(2, math.ceil(ROTATION_BYTES / w_bytes)) if gpu else 1
        weights = [(torch.randn(N, K, device=device) / K**0.5).to(dtype) for _ in range(copies)]
        N_out = N // 2 if epilogue == "swiglu" else N
        for M in Ms:
            x = torch.randn(M, K, device=device, dtype=dtype)
            nbytes = w_bytes + M * K * esize + M * N_out * esize
            case = f"{name} [{N}, {K}]{' + SwiGLU' if epilogue == 'swiglu' else ''} M={M}"
            turn = [0]

            def rotating(call: Callable[[torch.Tensor], object]) -> Callable[[], object]:
                def fn():
                    w = weights[turn[0] % copies]
                    turn[0] += 1
                    return call(w)
                return fn

            def peer_swiglu(w):
                y = F.linear(x, w)
                return F.silu(y[:, :N_out]) * y[:, N_out:]

            fns = {"dots1_ext": rotating(lambda w: skinny_gemm(x, w, epilogue))}
            kernels = ["frag", "wide"] if gpu and M <= WIDE_MAX_ROWS else ["frag"]
            if "wide" in kernels:
                ours = rotating(lambda w: skinny_gemm(x, w, epilogue))
                fns["dots1_ext (frag)"] = with_env({"DOTS1_EXT_SKINNY_KERNEL": "frag"}, ours)
            if gpu and not quick:
                for kernel in kernels:
                    for tiles in ("1", "2"):
                        ours = rotating(lambda w: skinny_gemm(x, w, epilogue))
                        label = f"dots1_ext ({'frag, ' if kernel == 'frag' else ''}tiles={tiles})"
                        env = {"DOTS1_EXT_SKINNY_KERNEL": kernel, "DOTS1_EXT_SKINNY_TILES": tiles}
                        fns[label] = with_env(env, ours)
            peer = "F.linear (cuBLAS)" if gpu else "F.linear"
            fns[peer] = rotating(lambda w: F.linear(x, w))
            if epilogue == "swiglu":
                fns[f"{peer} + silu*mul"] = rotating(peer_swiglu)
            if gpu:
                reps = max(copies, 8 if w_bytes > 5e8 else 32)
                reps = math.ceil(reps / copies) * copies  # every copy equally often
                times = {k: v / 1e3 for k, v in graph_times_us(fns, reps, rounds=6 if quick else 15).items()}
            else:
                times = {label: time_fn(fn, warmup=2, iters=5) for label, fn in fns.items()}
            floor_ms = nbytes / (copy_gbs * 1e9) * 1e3
            read_floor_ms = nbytes / (read_gbs * 1e9) * 1e3
            for label, ms in times.items():
                report.add(Row("skinny_gemm", case, label, ms, floor_ms=floor_ms, gbs=nbytes / (ms * 1e-3) / 1e9,
                               extra={"read floor ms": round(read_floor_ms, 4),
                                      "read floor/time": round(read_floor_ms / ms, 2)}))
        del weights
        if gpu:
            torch.cuda.empty_cache()
    return [report]


if __name__ == "__main__":
    bench_main(run, __doc__)
