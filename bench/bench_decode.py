"""The decode step of an 8-layer real-shape Dots1 (layer 0 dense, then MoE) over batch sizes and context
lengths: CUDA-graph replay time against the floor, and where an eager step's GPU time goes by kernel kind.

Floor = bytes one step must read (attention, dense and shared weights, the routed experts the batch is
expected to touch, the lm_head, and each sequence's KV cache up to its length) over the measured copy
bandwidth. The read-only ceiling is above copy bandwidth, so floor/time can exceed 1 only slightly.
Cases whose KV cache would not fit next to the model are skipped (and listed).
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch

from bench.common import Report, Row, bench_main, bytes_floor_ms, env_vars, on_gpu

LAYERS = int(os.environ.get("DOTS1_BENCH_DECODE_LAYERS", "8"))
# A subset for a short run: DOTS1_BENCH_DECODE_BATCHES=1,32 DOTS1_BENCH_DECODE_CONTEXTS=2048
BATCHES = tuple(int(b) for b in os.environ.get("DOTS1_BENCH_DECODE_BATCHES", "1,8,32,128").split(","))
CONTEXTS = tuple(int(c) for c in os.environ.get("DOTS1_BENCH_DECODE_CONTEXTS", "256,2048,16384,32768").split(","))
# Kernel switches compared in the same process on GPU (each variant's graphs captured under its
# settings, which the ops read at launch; replays alternated so GPU clock drift hits all alike):
# DOTS1_BENCH_DECODE_VARIANTS=0 measures the default only.
VARIANTS = {
    "fragment loads": {"DOTS1_EXT_SKINNY_KERNEL": "frag", "DOTS1_EXT_MOE_DECODE_LOADS": "frag"},
    "fused QK attention": {"DOTS1_EXT_ATTENTION_FUSED_QK": "1"},
    "deep attention pipeline": {"DOTS1_EXT_ATTENTION_STAGES": "6"},
    "cluster attention combine": {"DOTS1_EXT_ATTENTION_COMBINE": "cluster"},
}
COMPARE_VARIANTS = os.environ.get("DOTS1_BENCH_DECODE_VARIANTS", "1") != "0"
KV_BUDGET_BYTES = 72 * 2**30  # the 8-layer model takes ~35 GB of the H200's 141; graphs and activations the rest


def kv_bytes(cfg, batch: int, context: int, elem: int) -> int:
    """K and V bytes a step reads: every layer, every sequence, ``context + 1`` slots (the new token)."""
    return cfg.num_hidden_layers * 2 * batch * (context + 1) * cfg.num_key_value_heads * cfg.head_dim * elem


def fresh_cache(model, batch: int, slots: int) -> None:
    """A cache of exactly ``slots`` (the old one freed first: setup_cache would keep or grow it)."""
    import gc

    for layer in model.model.layers:
        layer.self_attn.k_cache = layer.self_attn.v_cache = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    model.setup_cache(batch, slots)


def real_decode_setup(layers: int, experts: str, ctx: int = 2048):
    """The decode probes' setup: the real-shape random Dots1 of ``layers`` layers (layer 0 dense) on CUDA in
    bf16 with ``experts`` ("bf16" / "int4"), a batch-1 cache filled for a step at slot ``ctx``, one
    token. Returns (model, config, token)."""
    from dots1_ext.config import dots1_real_config
    from dots1_ext.model import build_random_model

    torch.manual_seed(0)
    cfg = dots1_real_config(layers)
    model = build_random_model(cfg, device="cuda", dtype=torch.bfloat16, experts=experts)
    with torch.inference_mode():
        decode_cache(model, 1, ctx + 1)
    return model, cfg, torch.randint(0, cfg.vocab_size, (1,), device="cuda")


def decode_cache(model, batch: int, slots: int) -> bool:
    """fresh_cache, filled as a decode step at slot ``slots - 1`` finds it: realistic (finite, non-zero) K/V
    history in slots [0, slots - 1), every sequence starting at slot 0. False (nothing allocated) when the
    device runs out of memory."""
    try:
        fresh_cache(model, batch, slots)
    except torch.OutOfMemoryError:
        return False
    for layer in model.model.layers:
        layer.self_attn.k_cache.normal_()
        layer.self_attn.v_cache.normal_()
    model.model.cache_start.zero_()
    model.model.mark_cache_written(slots - 1)  # the step writes the last slot
    return True


def kernel_kind(name: str) -> str:
    """A profiler kernel name -> the kind it is reported under."""
    n = name.lower()
    for key, kind in (("skinny_gemm", "skinny GEMM (dense linears)"), ("moe_decode", "MoE decode (experts)"),
                      ("moe_gate_up", "MoE decode (experts)"), ("moe_down", "MoE decode (experts)"),
                      ("decode_step_inputs", "embedding + step inputs"),
                      ("decode_attention", "decode attention"), ("attention_combine", "decode attention"),
                      ("gating", "router + gating"), ("qk_norm", "QK-norm + RoPE + cache write"),
                      ("rms_norm", "norms"), ("gemv", "cuBLAS GEMV/GEMM"), ("gemm", "cuBLAS GEMV/GEMM"),
                      ("cutlass", "cuBLAS GEMV/GEMM"), ("sm90_xmma", "cuBLAS GEMV/GEMM"),
                      ("argmax", "argmax / sampling"), ("reduce", "argmax / sampling"),
                      ("elementwise", "elementwise / copies"), ("copy", "elementwise / copies"),
                      ("index", "elementwise / copies"), ("embedding", "elementwise / copies")):
        if key in n:
            return kind
    return "other"


def replay_round_robin(graphs: dict, rounds: int = 5) -> dict[str, float]:
    """Median over ``rounds`` alternations of each DecodeGraphs' ``replay_ms`` (itself a median)."""
    times: dict[str, list[float]] = {label: [] for label in graphs}
    for _ in range(rounds):
        for label, g in graphs.items():
            times[label].append(g.replay_ms(iters=30))
    return {label: sorted(t)[len(t) // 2] for label, t in times.items()}


def profile_step(step, iters: int = 5) -> dict[str, float]:
    """GPU ms per call of ``step`` by kernel kind (torch.profiler, CUDA activity only). Run with
    DOTS1_EXT_PDL=0: under programmatic dependent launch a kernel starts before its predecessor ends
    and waits, so kernel durations overlap and stop adding up to the step (measured: the MoE kinds grew
    from 0.56 to 0.66 ms of a 1.50 ms step)."""
    from torch.profiler import ProfilerActivity, profile

    with env_vars({"DOTS1_EXT_PDL": "0"}):
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                step()
            torch.cuda.synchronize()
    by_kind: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if evt.device_type == torch.autograd.DeviceType.CUDA or getattr(evt, "self_device_time_total", 0):
            us = getattr(evt, "self_device_time_total", None)
            if us is None:
                us = evt.self_cuda_time_total
            if us:
                by_kind[kernel_kind(evt.key)] += us / 1e3 / iters
    return dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))


def run(quick: bool = False) -> list[Report]:
    from bench.bench_model import decode_weight_bytes
    from dots1_ext.config import dots1_real_config
    from dots1_ext.cuda_graph import DecodeGraphs
    from dots1_ext.model import build_random_model

    if on_gpu():
        device, dtype = "cuda", torch.bfloat16
        cfg = dots1_real_config(num_layers=LAYERS)
        batches, contexts = ((1, 32), (2048,)) if quick else (BATCHES, CONTEXTS)
    else:  # the harness on a tiny stand-in
        from dots1_ext.tiny import tiny_config

        device, dtype, cfg = "cpu", torch.float32, tiny_config()
        batches, contexts = (1, 2), (16,)
    elem = torch.finfo(dtype).bits // 8
    model = build_random_model(cfg, device=device, dtype=dtype)
    name = f"{cfg.num_hidden_layers}-layer {'real-shape' if on_gpu() else 'tiny'} Dots1, {str(dtype)[6:]}"
    steps = Report(f"decode step (CUDA-graph replay on GPU, eager on CPU), {name}")
    kinds = Report(f"where an eager decode step's GPU time goes, {name} (torch.profiler, ms per step)")
    skipped = []
    with torch.inference_mode():
        for B in batches:
            for ctx in contexts:
                kv = kv_bytes(cfg, B, ctx, elem)
                if kv > KV_BUDGET_BYTES:
                    skipped.append(f"B={B} context {ctx} ({kv / 2**30:.0f} GiB of KV cache)")
                    continue
                if not decode_cache(model, B, ctx + 1):
                    skipped.append(f"B={B} context {ctx} (out of memory allocating the cache)")
                    continue
                floor = bytes_floor_ms(decode_weight_bytes(cfg, B, elem) + kv)
                tok = torch.randint(0, cfg.vocab_size, (B,), device=device)
                case = f"B={B} context {ctx}"
                if on_gpu():
                    variants = {"": {}} | (VARIANTS if COMPARE_VARIANTS else {})
                    graphs = {}
                    for label, settings in variants.items():
                        graphs[label] = DecodeGraphs(model)
                        with env_vars(settings):  # captured under the settings
                            graphs[label](tok, ctx)
                    for label, ms in replay_round_robin(graphs).items():
                        impl = "dots1_ext cuda-graph" + (f" ({label})" if label else "")
                        steps.add(Row("decode", case, impl, ms, floor_ms=floor, extra={"KV_MB": round(kv / 1e6)}))
                    del graphs
                    if ctx == 2048 and B in (1, 32):
                        profile = profile_step(lambda: model.decode(tok, ctx))
                        for kind, ms in profile.items():
                            kinds.add(Row("decode", case, kind, ms))
                        total = sum(profile.values())
                        # issue 13's "all other kernels <= 10% of the B=1 step": everything but the
                        # weight-streaming linears, the MoE experts and attention
                        main_kinds = ("skinny GEMM (dense linears)", "MoE decode (experts)", "decode attention",
                                      "cuBLAS GEMV/GEMM")
                        other = sum(ms for kind, ms in profile.items() if kind not in main_kinds)
                        kinds.add(Row("decode", case, "all other kernels", other,
                                      extra={"share_of_kernels": round(other / total, 3) if total else None}))
                        kinds.add(Row("decode", case, "total (eager, kernels only)", total, floor_ms=floor))
                else:
                    from bench.common import time_fn

                    steps.add(Row("decode", case, "dots1_ext eager", time_fn(lambda: model.decode(tok, ctx), 1, 3),
                                  floor_ms=floor))
                torch.cuda.empty_cache() if on_gpu() else None
    if on_gpu() and COMPARE_VARIANTS:
        steps.notes.append("variants (same process, graphs captured under each setting, replays alternated): "
                           + "; ".join(f"{k}: " + " ".join(f"{n}={v}" for n, v in e.items())
                                       for k, e in VARIANTS.items()))
    if skipped:
        steps.notes.append("skipped (KV cache over the budget): " + "; ".join(skipped))
    return [steps] + ([kinds] if kinds.rows else [])


if __name__ == "__main__":
    bench_main(run, __doc__)
