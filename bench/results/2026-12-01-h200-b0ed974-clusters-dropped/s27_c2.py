"""s27: the bf16 gate_up + down pair, tile configs with and without 2x1 clusters, round robin, same offsets.
TS (default 512,2048,4096,8192,16384), balanced and Zipf."""
import os
import torch
from bench.bench_grouped_gemm import routing_offsets
from bench.common import time_fns, with_env
from dots1_ext.ops.grouped_gemm import grouped_gemm, interleave_gate_up

E, H, I, k = 128, 4096, 1408, 6
torch.manual_seed(0)
wg = interleave_gate_up(torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / H**0.5)
wd = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / I**0.5
configs = os.environ.get("CONFIGS", "coop,coop_c2,pingpong,pingpong_c2").split(",")
for kind in ("balanced", "zipf"):
    for T in (int(t) for t in os.environ.get("TS", "512,2048,4096,8192,16384").split(",")):
        off = routing_offsets(kind, T, k, E, "cuda")
        x = torch.randn(T * k, H, device="cuda", dtype=torch.bfloat16)
        def pair():
            return grouped_gemm(grouped_gemm(x, wg, off, "swiglu_interleaved"), wd, off, "none")
        ref = pair()
        fns = {"auto": pair}
        for c in configs:
            f = with_env({"DOTS1_EXT_GEMM_SM90_CONFIG": c}, pair)
            d = (f().float() - ref.float()).abs().max().item()
            print(f"  {kind} T={T} {c}: max |diff| vs auto {d:.3g}", flush=True)
            fns[c] = f
        ms = time_fns(fns, warmup=3, rounds=int(os.environ.get("ROUNDS", "7")), iters=3)
        flop = 2 * T * k * H * 3 * I
        print(f"{kind} T={T} (rows/expert {T * k / E:.0f}, {flop / 1e12:.3f} TFLOP): "
              + ", ".join(f"{n} {v:.4f}" for n, v in ms.items()), flush=True)
