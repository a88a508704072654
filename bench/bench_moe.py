"""The Dots1 MoE block (router + 128 experts top-6 + 2 shared experts) at real shape, end to end.

Ours: dots1_ext.modules.Dots1MoE with its experts packed as ``load_model`` ships them (gate/up
interleaved, SwiGLU fused into the gate_up GEMM). Peers, in the same run and on the same weights: transformers'
Dots1MoE with experts_implementation "eager", "grouped_mm", "batched_mm" (small T only: it
materialises per-token weights), and "grouped_mm" under torch.compile.
Floor: max(bytes of the weights a block must read / copy bandwidth, FLOPs / dense GEMM rate).
"""

from __future__ import annotations

import torch

from bench.common import bench_main, bytes_floor_ms, flops_floor_ms, on_gpu, Report, Row, time_fn

REAL = dict(hidden=4096, inter=1408, experts=128, topk=6, shared=2)
TINY = dict(hidden=256, inter=128, experts=16, topk=4, shared=2)


def hf_config(s: dict):
    from transformers.models.dots1.configuration_dots1 import Dots1Config

    return Dots1Config(
        hidden_size=s["hidden"], intermediate_size=4 * s["hidden"], moe_intermediate_size=s["inter"],
        n_routed_experts=s["experts"], num_experts_per_tok=s["topk"], n_shared_experts=s["shared"],
        n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, num_hidden_layers=2,
        first_k_dense_replace=1, vocab_size=1024, num_attention_heads=8, num_key_value_heads=8,
    )


def make_blocks(s: dict, device: str, dtype: torch.dtype):
    """Our block and transformers' block holding the same random weights."""
    from transformers.models.dots1.modeling_dots1 import Dots1MoE as HFMoE

    from dots1_ext.config import Dots1Config
    from dots1_ext.modules import Dots1MoE, interleave_gate_up_

    hf_cfg = hf_config(s)
    hf = HFMoE(hf_cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02)
        hf.gate.e_score_correction_bias = torch.randn(s["experts"], device=device) * 0.01  # stays fp32
    ours = Dots1MoE(Dots1Config.from_dict(hf_cfg.to_dict())).to(device=device, dtype=dtype)
    ours.load_state_dict(hf.state_dict())
    interleave_gate_up_(ours)  # what load_model ships: gate/up interleaved, SwiGLU fused into the GEMM
    return ours, hf, hf_cfg


def weight_bytes(s: dict, T: int, elem: int) -> float:
    per_expert = 3 * s["hidden"] * s["inter"] * elem
    touched = s["experts"] * (1 - (1 - s["topk"] / s["experts"]) ** T)  # expected distinct experts hit
    return (touched + s["shared"]) * per_expert + s["experts"] * s["hidden"] * elem


def flops(s: dict, T: int) -> float:
    return 2 * T * ((s["topk"] + s["shared"]) * 3 * s["hidden"] * s["inter"] + s["experts"] * s["hidden"])


def run(quick: bool = False) -> list[Report]:
    device = "cuda" if on_gpu() else "cpu"
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    s = REAL if on_gpu() else TINY
    tokens = [1, 64, 4096] if quick else [1, 8, 64, 512, 4096, 16384]
    if not on_gpu():
        tokens = [1, 64]
    report = Report(f"MoE block (H={s['hidden']}, E={s['experts']}, top-{s['topk']}, {s['shared']} shared, "
                    f"{str(dtype).replace('torch.', '')}, {device})")
    ours, hf, hf_cfg = make_blocks(s, device, dtype)
    compiled = None
    for T in tokens:
        x = torch.randn(1, T, s["hidden"], device=device, dtype=dtype)
        floor = max(bytes_floor_ms(weight_bytes(s, T, x.element_size())), flops_floor_ms(flops(s, T)))
        case = f"T={T}"
        with torch.inference_mode():
            x2d = x.view(T, -1)  # ours takes flat tokens [T, H]
            ms = time_fn(lambda: ours(x2d), warmup=5, iters=20)
            if on_gpu():
                torch.cuda.reset_peak_memory_stats()
                ours(x2d)
                peak = torch.cuda.max_memory_allocated() / 2**20
            report.add(Row("moe", case, "dots1_ext", ms, floor_ms=floor, tflops=flops(s, T) / ms / 1e9,
                           extra={"peak_MiB": peak} if on_gpu() else {}))
            impls = ["eager", "grouped_mm"] + (["batched_mm"] if T <= 64 else [])
            for impl in impls:
                if impl == "eager" and T > 4096 and quick:
                    continue
                hf_cfg._experts_implementation = impl
                ms = time_fn(lambda: hf(x), warmup=2 if impl == "eager" else 5, iters=5 if impl == "eager" else 20)
                report.add(Row("moe", case, f"hf {impl}", ms, floor_ms=floor))
            if on_gpu():
                hf_cfg._experts_implementation = "grouped_mm"
                if compiled is None:
                    compiled = torch.compile(hf)
                ms = time_fn(lambda: compiled(x), warmup=5, iters=20)
                report.add(Row("moe", case, "hf grouped_mm + torch.compile", ms, floor_ms=floor))
        del x
    return [report]


if __name__ == "__main__":
    bench_main(run, __doc__)
