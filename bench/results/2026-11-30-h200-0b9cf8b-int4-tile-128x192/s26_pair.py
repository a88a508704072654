"""s26: the gate_up + down pair at T=2048/4096/8192, balanced and Zipf: bf16 under auto (the new H200 coop bound) and
forced coop / pingpong, int4 under auto and 128x256, round robin, same offsets."""
import os
import torch
from bench.bench_grouped_gemm import routing_offsets, quantize_by_expert
from bench.common import time_fns, with_env
from dots1_ext.ops.grouped_gemm import grouped_gemm, interleave_gate_up
from dots1_ext.ops.grouped_gemm_int4 import grouped_gemm_int4

E, H, I, k = 128, 4096, 1408, 6
torch.manual_seed(0)
wg = interleave_gate_up(torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / H**0.5)
wd = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / I**0.5
qg, qd = quantize_by_expert(wg), quantize_by_expert(wd)
for kind in ("balanced", "zipf"):
    for T in (int(t) for t in os.environ.get("TS", "2048,4096,8192").split(",")):
        off = routing_offsets(kind, T, k, E, "cuda")
        x = torch.randn(T * k, H, device="cuda", dtype=torch.bfloat16)
        def bf16_pair():
            return grouped_gemm(grouped_gemm(x, wg, off, "swiglu_interleaved"), wd, off, "none")
        def int4_pair():
            h = grouped_gemm_int4(x, qg.qweight, qg.scales, qg.zeros, off, "swiglu_interleaved")
            return grouped_gemm_int4(h, qd.qweight, qd.scales, qd.zeros, off, "none")
        fns = {"bf16 auto": bf16_pair,
               "bf16 coop": with_env({"DOTS1_EXT_GEMM_SM90_CONFIG": "coop"}, bf16_pair),
               "bf16 pingpong": with_env({"DOTS1_EXT_GEMM_SM90_CONFIG": "pingpong"}, bf16_pair),
               "int4 auto": int4_pair,
               "int4 128x256": with_env({"DOTS1_EXT_GEMM_INT4_TILE": "128x256"}, int4_pair)}
        ms = time_fns(fns, warmup=3, rounds=7, iters=3)
        print(f"{kind} T={T} (rows/expert {T * k / E:.0f}): " + ", ".join(f"{n} {v:.4f}" for n, v in ms.items())
              + f" | int4 auto / bf16 auto {ms['bf16 auto'] / ms['int4 auto']:.3f}x", flush=True)
