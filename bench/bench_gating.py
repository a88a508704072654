"""Top-k gating at real Dots1 shapes (E=128, k=6, H=4096), against the eager reference and HF.

Two cases per T:
  * "after logits": dots1_ext topk_gating vs dots1_ext.reference.topk_gating on the same fp32 logits;
  * "router incl. projection": dots1_ext router_topk_gating (fused single launch for T <= 16) vs the
    HF transformers Dots1TopkRouter forward and the eager reference router (bf16 hidden and weight).
  * "decode router kernels": router_topk_gating at T=1/4/16 with each kernel forced
    (DOTS1_EXT_ROUTER_KERNEL=grid|cluster|gemm), graph_us per call in a CUDA graph, against the floor
    of reading the 1 MB weight once at the measured copy bandwidth.
Floors: bytes moved (inputs read once + outputs written) over the measured copy bandwidth.

    python -m bench.bench_gating [--quick] [--json PATH]
"""

from __future__ import annotations

import torch

from bench.common import bench_main, bytes_floor_ms, default_device, env_vars, graph_us, on_gpu, Report, Row, time_fn
from dots1_ext import reference as R
from dots1_ext.ops import router_topk_gating, topk_gating
from dots1_ext.ops.gating import ROUTER_FUSED_MAX_TOKENS

E, K, H = 128, 6, 4096
SCALE = 2.5


def _hf_router(device: str, weight: torch.Tensor, bias: torch.Tensor):
    try:
        from transformers.models.dots1.configuration_dots1 import Dots1Config
        from transformers.models.dots1.modeling_dots1 import Dots1TopkRouter
    except ImportError:  # transformers is a bench extra, not a requirement
        return None
    config = Dots1Config(hidden_size=weight.shape[1], n_routed_experts=E, num_experts_per_tok=K, n_group=1, topk_group=1,
                         norm_topk_prob=True, routed_scaling_factor=SCALE)
    router = Dots1TopkRouter(config).to(device)
    router.weight.data = weight.clone()
    router.e_score_correction_bias.copy_(bias)
    return router


def run(quick: bool = False) -> list[Report]:
    device = default_device()
    gpu = on_gpu()
    hidden_size = H if gpu else 512
    tokens = ([1, 4096] if quick else [1, 64, 512, 4096, 16384]) if gpu else ([1, 64] if quick else [1, 64, 512])
    after = Report(f"gating after logits (E={E}, k={K}, fp32 logits)")
    router = Report(f"router incl. projection (E={E}, k={K}, H={hidden_size}, bf16)")
    weight = (torch.randn(E, hidden_size, device=device) / hidden_size**0.5).to(torch.bfloat16)
    bias = torch.randn(E, device=device) * 0.05
    hf = _hf_router(device, weight, bias)
    for T in tokens:
        case = f"T={T}"
        logits = torch.randn(T, E, device=device) * 2
        nbytes = T * E * 4 + E * 4 + T * K * 8
        floor = bytes_floor_ms(nbytes)
        for impl, fn in (
            ("dots1_ext topk_gating", lambda: topk_gating(logits, bias, K, 1, 1, True, SCALE)),
            ("eager reference", lambda: R.topk_gating(logits, bias, K, 1, 1, True, SCALE)),
        ):
            ms = time_fn(fn)
            extra = {"graph_us": graph_us(fn)} if gpu and impl.startswith("dots1_ext") else {}
            after.add(Row("gating", case, impl, ms, floor, gbs=nbytes / ms / 1e6, extra=extra))

        hidden = torch.randn(T, hidden_size, device=device).to(torch.bfloat16)
        nbytes = T * hidden_size * 2 + E * hidden_size * 2 + E * 4 + T * K * 8
        floor = bytes_floor_ms(nbytes)
        impls = [
            ("dots1_ext router_topk_gating", lambda: router_topk_gating(hidden, weight, bias, K, 1, 1, True, SCALE)),
            ("eager reference", lambda: R.router_topk_gating(hidden, weight, bias, K, 1, 1, True, SCALE)),
        ]
        if hf is not None:
            impls.append(("HF Dots1TopkRouter", lambda: hf(hidden)))
        for impl, fn in impls:
            with torch.no_grad():
                ms = time_fn(fn)
            extra = {}
            if impl.startswith("dots1_ext"):
                extra = {"fused": bool(T <= ROUTER_FUSED_MAX_TOKENS and gpu)}
                if gpu:
                    with torch.no_grad():
                        extra["graph_us"] = graph_us(fn)
            router.add(Row("router", case, impl, ms, floor, gbs=nbytes / ms / 1e6, extra=extra))
    return [after, router, _decode_router_kernels(device, gpu, hidden_size, weight, bias)]


def _decode_router_kernels(device: str, gpu: bool, hidden_size: int, weight, bias) -> Report:
    """Each fused-router kernel at decode token counts, timed in a CUDA graph (graph_us): the launch
    path gone, what a decode step pays. The floor is the weight read once (T * H hidden is noise)."""
    report = Report(f"decode router kernels (E={E}, k={K}, H={hidden_size}, bf16; graph_us per call)")
    for T in (1, 4, 16):
        hidden = torch.randn(T, hidden_size, device=device).to(torch.bfloat16)
        nbytes = E * hidden_size * 2 + T * hidden_size * 2 + E * 4 + T * K * 8
        floor = bytes_floor_ms(nbytes)
        for kernel in ("grid", "cluster", "gemm"):

            def fn():
                return router_topk_gating(hidden, weight, bias, K, 1, 1, True, SCALE)

            with env_vars({"DOTS1_EXT_ROUTER_KERNEL": kernel}):
                ms = time_fn(fn)
                us = graph_us(fn) if gpu else None
            # Time in a graph where there is one: floor/time is then against graph_us.
            row_ms = us / 1e3 if us is not None else ms
            report.add(Row("router", f"T={T}", f"router_topk_gating [{kernel}]", row_ms, floor,
                           gbs=nbytes / row_ms / 1e6, extra={"graph_us": us, "eager_ms": round(ms, 4)}))
    return report


if __name__ == "__main__":
    bench_main(run, __doc__)
