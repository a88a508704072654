"""The whole model with int4 routed experts (issue 14): the random real-shape Dots1 with 62 layers and
int4 experts on one GPU, beside the 8-layer model with bf16 and with int4 experts.

Per model: the time to build it on the GPU (random weights made there, the routed experts quantized
expert by expert as the loader does while reading a checkpoint: a 62-layer checkpoint, 85 GB in int4
and 284 GB in bf16, does not fit the benchmark machine's disk), its weight bytes, the peak allocated
memory after the build and after a B=1 KV cache of 16384 slots (issue 14's target: the 62-layer int4
model <= 100 GB), then a decode step (CUDA-graph replay) at B in {1, 8, 32} and context 2048 / 16384
where the cache fits beside the model: ms, tokens/s and floor / time (floor = the weights a step reads,
the routed experts the batch is expected to touch at their stored bytes, plus the KV cache, over the
copy bandwidth measured in the same run), and a prefill of T=4096 (one sequence, last-token logits):
ms and tokens/s.

DOTS1_BENCH_INT4_MODELS picks the models (default "8:bf16,8:int4,62:int4"); on CPU the harness runs a
tiny stand-in (the 4-layer tiny config, bf16 and int4 experts, context 16).
"""

from __future__ import annotations

import gc
import os
import time

import torch

from bench.common import Report, Row, bench_main, bytes_floor_ms, on_gpu

MODELS = tuple((int(n), e) for n, e in (m.split(":") for m in
               os.environ.get("DOTS1_BENCH_INT4_MODELS", "8:bf16,8:int4,62:int4").split(",")))
BATCHES = (1, 8, 32)
CONTEXTS = (2048, 16384)
MEMORY_CACHE_SLOTS = 16384  # issue 14's memory target: B=1 with a 16k-token KV cache
PREFILL_T = 4096
HEADROOM_BYTES = 6 * 2**30  # kept free beside model + cache: activations, graphs, the workspace


def expert_bytes_per_weight(experts: str, elem: int) -> float:
    """Stored bytes per routed-expert weight: the model dtype's, or int4's codes + bf16 scale + uint8
    zero point per group of 128 (asymmetric, the default format)."""
    if experts == "bf16":
        return float(elem)
    from dots1_ext.quant import GROUP_SIZE

    return 0.5 + 3 / GROUP_SIZE


def step_weight_bytes(cfg, batch: int, elem: int, experts: str) -> float:
    """Weights one decode step reads: everything but the routed experts, plus the experts the batch is
    expected to touch (E (1 - (1 - k/E)^B) per MoE layer) at their stored bytes."""
    from bench.bench_model import decode_weight_bytes

    E, k, H, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    touched = E * (1 - (1 - k / E) ** batch)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    bf16_routed = n_moe * touched * 3 * H * I * elem
    return decode_weight_bytes(cfg, batch, elem) - bf16_routed + bf16_routed / elem * expert_bytes_per_weight(
        experts, elem)


def _free(model=None) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(quick: bool = False) -> list[Report]:
    from bench.bench_decode import decode_cache, fresh_cache, kv_bytes
    from dots1_ext.config import dots1_real_config
    from dots1_ext.cuda_graph import DecodeGraphs
    from dots1_ext.model import build_random_model

    gpu = on_gpu()
    if gpu:
        device, dtype = "cuda", torch.bfloat16
        models, batches, contexts = (MODELS[:2] if quick else MODELS), BATCHES, CONTEXTS
        prefill_t, memory_slots = PREFILL_T, MEMORY_CACHE_SLOTS
        make_config = dots1_real_config
    else:
        from dots1_ext.tiny import tiny_config

        device, dtype = "cpu", torch.float32
        models, batches, contexts, prefill_t, memory_slots = ((4, "bf16"), (4, "int4")), (1, 2), (16,), 32, 64

        def make_config(num_layers):
            return tiny_config()  # 4 layers

    elem = torch.finfo(dtype).bits // 8
    shape = "real-shape" if gpu else "tiny"
    build = Report(f"int4 experts, whole model: build and memory ({shape} Dots1, {str(dtype)[6:]})")
    steps = Report(f"int4 experts, whole model: decode step (CUDA-graph replay) and prefill ({shape} Dots1)")
    skipped: list[str] = []
    total = torch.cuda.get_device_properties(0).total_memory if gpu else 0
    for layers, experts in models:
        name = f"{layers} layers, {experts} experts"
        cfg = make_config(layers)
        _free()
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model = build_random_model(cfg, device=device, dtype=dtype, experts=experts)
        if gpu:
            torch.cuda.synchronize()
        build_s = time.perf_counter() - t0
        # Each storage once: q/k/v and gate/up are views of the packed qkv and gate_up buffers.
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in list(model.parameters()) + list(model.buffers())}
        weight_bytes = sum(storages.values())
        extra = {"build_s": round(build_s, 1), "weights_GB": round(weight_bytes / 1e9, 2)}
        if gpu:
            extra["peak_GiB_after_build"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            fresh_cache(model, 1, memory_slots)
            extra[f"GiB_with_B1_{memory_slots}_cache"] = round(torch.cuda.memory_allocated() / 2**30, 2)
            extra[f"GB_with_B1_{memory_slots}_cache"] = round(torch.cuda.memory_allocated() / 1e9, 2)
        build.add(Row("int4_model", name, "dots1_ext", build_s * 1e3, extra=extra))

        with torch.inference_mode():
            for B in batches:
                for ctx in contexts:
                    kv = kv_bytes(cfg, B, ctx, elem)
                    case = f"{name}: decode B={B} context {ctx}"
                    if gpu and weight_bytes + kv + HEADROOM_BYTES > total:
                        skipped.append(f"{case} ({kv / 2**30:.0f} GiB of KV beside {weight_bytes / 2**30:.0f} GiB)")
                        continue
                    if not decode_cache(model, B, ctx + 1):
                        skipped.append(f"{case} (out of memory allocating the cache)")
                        continue
                    tok = torch.randint(0, cfg.vocab_size, (B,), device=device)
                    floor = bytes_floor_ms(step_weight_bytes(cfg, B, elem, experts) + kv)
                    if gpu:
                        graphs = DecodeGraphs(model)
                        graphs(tok, ctx)
                        ms = graphs.replay_ms()
                        del graphs
                    else:
                        from bench.common import time_fn

                        ms = time_fn(lambda: model.decode(tok, ctx), 1, 3)
                    steps.add(Row("int4_model", case, "dots1_ext", ms, floor_ms=floor,
                                  extra={"tokens_per_s": round(B / ms * 1e3, 1), "KV_MB": round(kv / 1e6)}))
                    _free()
            case = f"{name}: prefill T={prefill_t}"
            try:
                fresh_cache(model, 1, prefill_t)
                ids = torch.randint(0, cfg.vocab_size, (1, prefill_t), device=device)
                from bench.common import time_fn

                ms = time_fn(lambda: model.prefill(ids, last_only=True), 1 if gpu else 0, 3 if gpu else 1)
                steps.add(Row("int4_model", case, "dots1_ext", ms,
                              extra={"tokens_per_s": round(prefill_t / ms * 1e3)}))
            except torch.OutOfMemoryError:
                skipped.append(f"{case} (out of memory)")
        for layer in model.model.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = None
        _free(model)
        del model
        _free()
    build.notes.append("build: random weights made on the device, routed experts quantized expert by expert "
                       "(int4: groups of 128, asymmetric); weights_GB = the storages of parameters + buffers, each once")
    steps.notes.append("floor = (non-expert weights + expected touched routed experts at their stored bytes "
                       "+ KV) / copy bandwidth; tokens_per_s = B / step time")
    if skipped:
        steps.notes.append("skipped: " + "; ".join(skipped))
    return [build, steps]


if __name__ == "__main__":
    bench_main(run, __doc__)
