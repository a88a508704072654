"""s26: int4 ping-pong tiles (64x192, 64x256) against the cooperative 128x192 / 128x256 and bf16 (auto), the gate_up +
down pair, balanced and Zipf, round robin, same offsets; then the 8-layer int4 model's prefill under each tile."""
import os
import torch
from bench.bench_grouped_gemm import routing_offsets, quantize_by_expert
from bench.common import time_fns, with_env, env_vars
from dots1_ext.ops.grouped_gemm import grouped_gemm, interleave_gate_up
from dots1_ext.ops.grouped_gemm_int4 import grouped_gemm_int4

TILES = ("128x128", "128x192", "128x256", "64x192", "64x256")
E, H, I, k = 128, 4096, 1408, 6
torch.manual_seed(0)
wg = interleave_gate_up(torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / H**0.5)
wd = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / I**0.5
qg, qd = quantize_by_expert(wg), quantize_by_expert(wd)
for kind in ("balanced", "zipf"):
    for T in (int(t) for t in os.environ.get("TS", "1024,2048,3072,4096,6144,8192,16384").split(",")):
        off = routing_offsets(kind, T, k, E, "cuda")
        x = torch.randn(T * k, H, device="cuda", dtype=torch.bfloat16)
        def bf16_pair():
            return grouped_gemm(grouped_gemm(x, wg, off, "swiglu_interleaved"), wd, off, "none")
        def int4_pair():
            h = grouped_gemm_int4(x, qg.qweight, qg.scales, qg.zeros, off, "swiglu_interleaved")
            return grouped_gemm_int4(h, qd.qweight, qd.scales, qd.zeros, off, "none")
        fns = {"bf16": bf16_pair, "auto": int4_pair}
        fns |= {t: with_env({"DOTS1_EXT_GEMM_INT4_TILE": t}, int4_pair) for t in TILES}
        ms = time_fns(fns, warmup=3, rounds=7, iters=3)
        best = min((v, n) for n, v in ms.items() if n != "bf16")
        print(f"{kind} T={T} (rows/expert {T * k / E:.0f}): " + ", ".join(f"{n} {v:.4f}" for n, v in ms.items())
              + f" | best int4 {best[1]} = {ms['bf16'] / best[0]:.3f}x bf16", flush=True)
del qg, qd, wg, wd
torch.cuda.empty_cache()

from bench.bench_decode import fresh_cache
from dots1_ext.config import dots1_real_config
from dots1_ext.model import build_random_model
cfg = dots1_real_config(8)
model = build_random_model(cfg, device="cuda", dtype=torch.bfloat16, experts="int4")
with torch.inference_mode():
    for T in (int(t) for t in os.environ.get("MODEL_TS", "2048,4096,8192").split(",")):
        fresh_cache(model, 1, T)
        ids = torch.randint(0, cfg.vocab_size, (1, T), device="cuda")
        def under(t):
            def fn():
                with env_vars({"DOTS1_EXT_GEMM_INT4_TILE": t}):
                    return model.prefill(ids, last_only=True)
            return fn
        res = time_fns({t: under(t) for t in ("auto",) + TILES}, warmup=1, rounds=5, iters=1)
        print(f"int4 8-layer prefill T={T}: " + ", ".join(f"{n} {v:.3f} ms" for n, v in res.items()), flush=True)
