"""Long prompts: prefill of a real-shape Dots1 with few layers (DOTS1_BENCH_LAYERS, default 3), last-token
logits. B=1 at T in {4096, 16384, 32768}; our chunked prefill at the longer ones; a left-padded batch of
4 prompts of 2k-8k tokens. Ours against transformers' Dots1ForCausalLM (sdpa attention, grouped_mm
experts) holding the same weights, in the same run.

Floor: FLOPs (projections, causal attention, experts, lm_head) / dense GEMM rate. ``act_GiB``: peak
memory allocated during the call above what was allocated before it (both models stay resident).
"""

from __future__ import annotations

import torch

from bench.bench_model import LAYERS, build, prefill_flops
from bench.common import Report, Row, bench_main, flops_floor_ms, on_gpu, time_fn


def _activation_peak(fn) -> dict:
    if not on_gpu():
        return {}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return {"act_GiB": round((torch.cuda.max_memory_allocated() - before) / 2**30, 2)}


ATTENTION_KERNEL_KEYS = ("fmha", "flash", "attention", "cudnn", "sdpa")


def attention_kernel_ms(fn) -> tuple[float, str]:
    """GPU ms of one call of ``fn`` spent in attention kernels (torch.profiler, by kernel name), and
    the names of those kernels (shortened)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total, names = 0.0, set()
    for evt in prof.key_averages():
        name = evt.key.lower()
        if any(k in name for k in ATTENTION_KERNEL_KEYS) and "decode_attention" not in name:
            total += getattr(evt, "self_device_time_total", 0) or evt.self_cuda_time_total
            names.add(evt.key[:40])
    return total / 1e3, "; ".join(sorted(names))


def run(quick: bool = False) -> list[Report]:
    from dots1_ext.model import left_pad

    device = "cuda" if on_gpu() else "cpu"
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    ours, hf, cfg, hf_cfg = build(LAYERS, device, dtype)
    hf_cfg._experts_implementation = "grouped_mm"
    name = f"{cfg.num_hidden_layers}-layer {'real-shape' if on_gpu() else 'tiny'} Dots1, {str(dtype)[6:]}"
    report = Report(f"long prompts (prefill, last-token logits), {name}")
    lengths = [4096, 16384, 32768] if on_gpu() else [48, 96]
    chunk = 8192 if on_gpu() else 32
    if quick:
        lengths = lengths[:1]
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for T in lengths:
            ids = torch.randint(0, cfg.vocab_size, (1, T), generator=gen).to(device)
            floor = flops_floor_ms(prefill_flops(cfg, T))
            case = f"B=1 T={T}"
            ours.setup_cache(1, T)
            f = lambda: ours.prefill(ids, last_only=True)  # noqa: E731
            report.add(Row("long_prompt", case, "dots1_ext", time_fn(f, 1, 3), floor_ms=floor,
                           extra=_activation_peak(f)))
            if T > chunk:
                f = lambda: ours.prefill(ids, last_only=True, chunk_size=chunk)  # noqa: E731
                report.add(Row("long_prompt", case, f"dots1_ext chunked {chunk}", time_fn(f, 1, 3), floor_ms=floor,
                               extra=_activation_peak(f)))
            f = lambda: hf(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
            report.add(Row("long_prompt", case, "hf sdpa + grouped_mm", time_fn(f, 1, 3), floor_ms=floor,
                           extra=_activation_peak(f)))
            if on_gpu() and T == max(lengths):  # attention's own rate, from the kernels the profiler saw
                ms, kernels = attention_kernel_ms(lambda: ours.prefill(ids, last_only=True))
                flops = cfg.num_hidden_layers * 2 * T * T * cfg.num_attention_heads * cfg.head_dim  # causal
                report.add(Row("long_prompt", case, "dots1_ext attention kernels (profiler)", ms,
                               floor_ms=flops_floor_ms(flops), tflops=flops / (ms * 1e-3) / 1e12,
                               extra={"kernels": kernels}))
            del ids

        lengths = [2048, 4096, 6144, 8192] if on_gpu() else [16, 24, 32, 40]
        prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
        ids, mask = left_pad(prompts, device=device)
        floor = sum(flops_floor_ms(prefill_flops(cfg, n)) for n in lengths)  # the real tokens' work
        case = f"left-padded B=4 T={'/'.join(map(str, lengths))}"
        ours.setup_cache(len(prompts), ids.shape[1])
        f = lambda: ours.prefill(ids, mask, last_only=True)  # noqa: E731
        report.add(Row("long_prompt", case, "dots1_ext", time_fn(f, 1, 3), floor_ms=floor, extra=_activation_peak(f)))
        f = lambda: hf(ids, attention_mask=mask, use_cache=False, logits_to_keep=1)  # noqa: E731
        report.add(Row("long_prompt", case, "hf sdpa + grouped_mm", time_fn(f, 1, 3), floor_ms=floor,
                       extra=_activation_peak(f)))
    return [report]


if __name__ == "__main__":
    bench_main(run, __doc__)
