"""s26: prefill A/B in one process. MODE=int4: the 62-layer int4 model at T=4096 (and 2048, 8192), tiles auto (128x192 at
r=192) vs 128x128 vs 128x256, round robin. MODE=bf16: the 8-layer bf16 model, DOTS1_EXT_GEMM_COOP_MIN_ROWS 128 vs 400 vs 800."""
import os
import torch
from bench.bench_decode import fresh_cache
from bench.common import env_vars, time_fns
from dots1_ext.config import dots1_real_config
from dots1_ext.model import build_random_model

mode = os.environ.get("MODE", "int4")
layers = int(os.environ.get("LAYERS", "62" if mode == "int4" else "8"))
cfg = dots1_real_config(layers)
model = build_random_model(cfg, device="cuda", dtype=torch.bfloat16, experts="int4" if mode == "int4" else "bf16")
if mode == "int4":
    var, values = "DOTS1_EXT_GEMM_INT4_TILE", ["auto", "128x128", "128x192", "128x256"]
else:
    var, values = "DOTS1_EXT_GEMM_COOP_MIN_ROWS", ["128", "200", "400", "800"]
with torch.inference_mode():
    for T in (int(t) for t in os.environ.get("TS", "2048,4096,8192").split(",")):
        fresh_cache(model, 1, T)
        ids = torch.randint(0, cfg.vocab_size, (1, T), device="cuda")
        def under(v):
            def fn():
                with env_vars({var: v}):
                    return model.prefill(ids, last_only=True)
            return fn
        res = time_fns({v: under(v) for v in values}, warmup=1, rounds=int(os.environ.get("ROUNDS", "5")), iters=1)
        print(f"{mode} {layers}-layer prefill T={T} ({var}): " + ", ".join(f"{n} {v:.3f} ms" for n, v in res.items()), flush=True)
