"""A real-shape Dots1 model with few layers (layer 0 dense, then MoE), end to end: prefill and one
decode step, ours against transformers' Dots1ForCausalLM holding the same weights.

Peers (same run): experts_implementation "eager", "grouped_mm", "batched_mm" (decode only: it
materialises per-token weights), and for decode "grouped_mm" with a static cache under
torch.compile(mode="reduce-overhead") — what a well-informed HF user runs.
Floors: prefill = FLOPs / dense GEMM rate; decode = bytes of weights read / copy bandwidth.
Decode steps are timed two ways: per call (CUDA events around one call after a synchronisation: the
GPU also waits for the call's host-side launch work) and 20 steps back to back (events around the 20:
a generation loop's steady state, the host queueing ahead of the GPU), both for ours and the compiled peer.
"""

from __future__ import annotations

import os

import torch

from bench.common import bench_main, bytes_floor_ms, flops_floor_ms, on_gpu, Report, Row, time_fn, time_steps

LAYERS = int(os.environ.get("DOTS1_BENCH_LAYERS", "3"))


def build(layers: int, device: str, dtype: torch.dtype):
    from transformers.models.dots1.configuration_dots1 import Dots1Config as HFConfig
    from transformers.models.dots1.modeling_dots1 import Dots1ForCausalLM as HFModel

    from dots1_ext.config import dots1_real_config
    from dots1_ext.model import build_random_model

    if on_gpu():
        cfg = dots1_real_config(num_layers=layers)
    else:  # small stand-in with the same structure, so the harness runs anywhere
        from dots1_ext.tiny import tiny_config

        cfg = tiny_config()
    ours = build_random_model(cfg, device=device, dtype=dtype)
    hf_cfg = HFConfig(**{k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "model_type")})
    with torch.device(device):
        hf = HFModel._from_config(hf_cfg, torch_dtype=dtype)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return ours.eval(), hf.eval(), cfg, hf_cfg


def param_bytes(model, skip=()) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not any(s in n for s in skip))


def decode_weight_bytes(cfg, batch: int, elem: int) -> float:
    """Weights one decode step must read: all but the routed experts, plus the experts hit."""
    E, k, H, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    touched = E * (1 - (1 - k / E) ** batch)
    per_expert = 3 * H * I * elem
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    dense_and_attn = 0
    for i in range(cfg.num_hidden_layers):
        dense_and_attn += 4 * H * cfg.num_attention_heads * cfg.head_dim * elem
        dense_and_attn += (3 * H * cfg.intermediate_size * elem if not cfg.is_moe_layer(i)
                           else (cfg.n_shared_experts * per_expert + E * H * elem))
    return dense_and_attn + n_moe * touched * per_expert + cfg.vocab_size * H * elem  # + lm_head


def prefill_flops(cfg, T: int, logit_tokens: int = 1) -> float:
    """FLOPs of a prefill of T tokens of one sequence whose logits are computed for ``logit_tokens``
    positions (1: last-token logits, as the prefill rows here and generate run it)."""
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    total = 0
    for i in range(cfg.num_hidden_layers):
        total += 2 * T * 4 * H * cfg.num_attention_heads * cfg.head_dim  # projections
        total += 2 * 2 * T * T * cfg.num_attention_heads * cfg.head_dim / 2  # causal attention
        total += (2 * T * 3 * H * cfg.intermediate_size if not cfg.is_moe_layer(i)
                  else 2 * T * (cfg.num_experts_per_tok + cfg.n_shared_experts) * 3 * H * I)
    return total + 2 * logit_tokens * H * cfg.vocab_size


def run(quick: bool = False) -> list[Report]:
    from transformers import StaticCache

    from dots1_ext.cuda_graph import DecodeGraphs

    device = "cuda" if on_gpu() else "cpu"
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    ours, hf, cfg, hf_cfg = build(LAYERS, device, dtype)
    prompt = 2048 if on_gpu() else 64
    name = f"{cfg.num_hidden_layers}-layer {'real-shape' if on_gpu() else 'tiny'} Dots1, {str(dtype)[6:]}"
    pre, dec = Report(f"prefill, {name}"), Report(f"decode step at context {prompt}, {name}")

    def peak(fn):
        if not on_gpu():
            return {}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return {"peak_MiB": round(torch.cuda.max_memory_allocated() / 2**20)}

    with torch.inference_mode():
        # ---- prefill ---- (DOTS1_BENCH_MODEL_ONLY=decode skips it: a short GPU run)
        only = os.environ.get("DOTS1_BENCH_MODEL_ONLY", "")
        ids = torch.randint(0, cfg.vocab_size, (1, prompt), device=device)
        ours.setup_cache(1, prompt + 16)
        floor = flops_floor_ms(prefill_flops(cfg, prompt))
        if only != "decode":
            f = lambda: ours.prefill(ids, last_only=True)  # noqa: E731
            pre.add(Row("model", f"prefill T={prompt}", "dots1_ext", time_fn(f, 3, 10), floor_ms=floor, extra=peak(f)))
            if on_gpu() and not quick:  # our prefill under torch.compile: is it faster than eager?
                try:
                    compiled_model = torch.compile(ours.model)
                    slots = torch.arange(prompt, device=device)
                    f = lambda: ours.lm_head(compiled_model(ids, slots, prompt)[-1:])  # noqa: E731
                    pre.add(Row("model", f"prefill T={prompt}", "dots1_ext + torch.compile", time_fn(f, 3, 10),
                                floor_ms=floor, extra=peak(f)))
                except Exception as exc:  # noqa: BLE001 - a compile failure is a finding, not a crash of the run
                    print(f"[bench] our prefill under torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}")
            for impl in ["eager", "grouped_mm"]:
                hf_cfg._experts_implementation = impl
                f = lambda: hf(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
                pre.add(Row("model", f"prefill T={prompt}", f"hf {impl}", time_fn(f, 1, 3 if impl == "eager" else 10),
                            floor_ms=floor, extra=peak(f)))

            if on_gpu() and not quick:  # peak memory of a long prefill (activations dominate)
                big = torch.randint(0, cfg.vocab_size, (1, 4096), device=device)
                ours.setup_cache(1, 4096)
                f = lambda: ours.prefill(big, last_only=True)  # noqa: E731
                case = "prefill T=4096"
                pre.add(Row("model", case, "dots1_ext", time_fn(f, 2, 5), floor_ms=flops_floor_ms(prefill_flops(cfg, 4096)),
                            extra=peak(f)))
                hf_cfg._experts_implementation = "grouped_mm"
                f = lambda: hf(big, use_cache=False, logits_to_keep=1)  # noqa: E731
                pre.add(Row("model", case, "hf grouped_mm", time_fn(f, 2, 5), floor_ms=flops_floor_ms(prefill_flops(cfg, 4096)),
                            extra=peak(f)))
                del big

        # ---- one decode step at context `prompt` ----
        for B in [1] if quick else [1, 32]:
            case = f"decode B={B}"
            floor = bytes_floor_ms(decode_weight_bytes(cfg, B, torch.finfo(dtype).bits // 8))
            ours.setup_cache(B, prompt + 16)
            for layer in ours.model.layers:  # realistic (non-NaN) cache contents; values do not matter
                layer.self_attn.k_cache.normal_()
                layer.self_attn.v_cache.normal_()
            ours.model.mark_cache_written(prompt)
            tok = torch.randint(0, cfg.vocab_size, (B,), device=device)
            f = lambda: ours.decode(tok, prompt)  # noqa: E731
            dec.add(Row("model", case, "dots1_ext eager", time_fn(f, 3, 10), floor_ms=floor))
            if on_gpu():
                graphs = DecodeGraphs(ours)
                f = lambda: graphs(tok, prompt)  # noqa: E731
                dec.add(Row("model", case, "dots1_ext cuda-graph", time_fn(f, 3, 20), floor_ms=floor, extra=peak(f)))
                dec.add(Row("model", case, "dots1_ext cuda-graph, 20 steps back to back", time_steps(f),
                            floor_ms=floor))
            cache = StaticCache(config=hf_cfg, max_cache_len=prompt + 16)
            pos = torch.full((B, 1), prompt, device=device)
            cpos = torch.tensor([prompt], device=device)
            step = lambda m: m(tok[:, None], past_key_values=cache, position_ids=pos, cache_position=cpos,  # noqa: E731
                               use_cache=True)
            for impl in ["eager", "grouped_mm", "batched_mm"]:
                hf_cfg._experts_implementation = impl
                dec.add(Row("model", case, f"hf {impl} static cache", time_fn(lambda: step(hf), 2, 5),
                            floor_ms=floor))
            if on_gpu() and not quick:
                hf_cfg._experts_implementation = "grouped_mm"
                compiled = torch.compile(hf, mode="reduce-overhead", fullgraph=False)
                dec.add(Row("model", case, "hf grouped_mm static cache + compile reduce-overhead",
                            time_fn(lambda: step(compiled), 5, 20), floor_ms=floor))
                dec.add(Row("model", case, "hf grouped_mm static cache + compile reduce-overhead, 20 steps back to back",
                            time_steps(lambda: step(compiled)), floor_ms=floor))
            del cache
    return [r for r in (pre, dec) if r.rows]


if __name__ == "__main__":
    bench_main(run, __doc__)
