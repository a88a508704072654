"""int4 grouped GEMM (exact bf16x2 dequantization): the gate_up + down pair under each tile, balanced and
Zipf routing, T = 256..8192 (round robin with the bf16 pair, same offsets); then the 8-layer int4 model's
prefill under each tile at T = 512, 2048, 3072, 4096."""
import torch
from bench.bench_grouped_gemm import routing_offsets
from bench.common import env_vars, time_fns, with_env
from dots1_ext.ops.grouped_gemm import grouped_gemm, interleave_gate_up
from dots1_ext.ops.grouped_gemm_int4 import grouped_gemm_int4
from bench.bench_grouped_gemm import quantize_by_expert

import os
TILES = tuple(t for t in os.environ.get("TILES", "128x32,128x64,128x128,128x256").split(",") if t)
E, H, I, k = 128, 4096, 1408, 6
torch.manual_seed(0)
wg = interleave_gate_up(torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / H**0.5)
wd = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / I**0.5
qg, qd = quantize_by_expert(wg), quantize_by_expert(wd)
for kind in ("balanced", "zipf"):
    for T in (int(t) for t in os.environ.get("TS", "256,512,1024,2048,3072,4096,8192").split(",")):
        off = routing_offsets(kind, T, k, E, "cuda")
        counts = (off[1:] - off[:-1]).float()
        x = torch.randn(T * k, H, device="cuda", dtype=torch.bfloat16)
        def int4_pair():
            h = grouped_gemm_int4(x, qg.qweight, qg.scales, qg.zeros, off, "swiglu_interleaved")
            return grouped_gemm_int4(h, qd.qweight, qd.scales, qd.zeros, off, "none")
        fns = {"bf16": lambda: grouped_gemm(grouped_gemm(x, wg, off, "swiglu_interleaved"), wd, off, "none"),
               "auto": int4_pair}
        fns |= {t: with_env({"DOTS1_EXT_GEMM_INT4_TILE": t}, int4_pair) for t in TILES}
        ms = time_fns(fns, warmup=3, rounds=7, iters=3)
        print(f"{kind} T={T} (rows/expert mean {counts.mean():.0f}, max {counts.max():.0f}): "
              + ", ".join(f"{n} {v:.4f}" for n, v in ms.items()), flush=True)
del qg, qd, wg, wd
torch.cuda.empty_cache()

from bench.bench_decode import fresh_cache
from dots1_ext.config import dots1_real_config
from dots1_ext.model import build_random_model
cfg = dots1_real_config(8)
model = build_random_model(cfg, device="cuda", dtype=torch.bfloat16, experts="int4")
with torch.inference_mode():
    for T in (int(t) for t in os.environ.get("MODEL_TS", "512,2048,3072,4096").split(",")):
        fresh_cache(model, 1, T)
        ids = torch.randint(0, cfg.vocab_size, (1, T), device="cuda")
        def under(t):
            def fn():
                with env_vars({"DOTS1_EXT_GEMM_INT4_TILE": t}):
                    return model.prefill(ids, last_only=True)
            return fn
        res = time_fns({t: under(t) for t in ("auto",) + TILES}, warmup=1, rounds=5, iters=1)
        print(f"int4 8-layer prefill T={T}: " + ", ".join(f"{n} {v:.3f} ms" for n, v in res.items()), flush=True)
