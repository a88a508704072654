"""s27: coop vs pingpong per GEMM (gate_up+SwiGLU, down) at many rows per expert, balanced and Zipf, round robin."""
import os
import torch
from bench.bench_grouped_gemm import routing_offsets
from bench.common import time_fns, with_env
from dots1_ext.ops.grouped_gemm import grouped_gemm, interleave_gate_up

E, H, I, k = 128, 4096, 1408, 6
torch.manual_seed(0)
wg = interleave_gate_up(torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / H**0.5)
wd = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / I**0.5
for kind in ("balanced", "zipf"):
    for T in (int(t) for t in os.environ.get("TS", "8192,12288,16384,24576,32768").split(",")):
        off = routing_offsets(kind, T, k, E, "cuda")
        x = torch.randn(T * k, H, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(T * k, I, device="cuda", dtype=torch.bfloat16)
        fns = {}
        for c in ("coop", "pingpong"):
            fns[f"gate_up {c}"] = with_env({"DOTS1_EXT_GEMM_SM90_CONFIG": c}, lambda: grouped_gemm(x, wg, off, "swiglu_interleaved"))
            fns[f"down {c}"] = with_env({"DOTS1_EXT_GEMM_SM90_CONFIG": c}, lambda: grouped_gemm(h, wd, off, "none"))
        ms = time_fns(fns, warmup=3, rounds=7, iters=3)
        flop = 2 * T * k * H * 3 * I
        print(f"{kind} T={T} (rows/expert {T * k / E:.0f}, pair {flop / 1e12:.3f} TFLOP): "
              + ", ".join(f"{n} {v:.4f}" for n, v in ms.items())
              + f" | pair coop {ms['gate_up coop'] + ms['down coop']:.3f} pingpong {ms['gate_up pingpong'] + ms['down pingpong']:.3f}", flush=True)
