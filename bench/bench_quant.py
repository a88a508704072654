"""int4 routed experts (dots1_ext.quant): what round-to-nearest int4 does to the outputs.

1. The format's error: relative error of ``x @ dq(w).T`` against ``x @ w.T`` for x ~ N(0, 1), symmetric
   and asymmetric groups of 128, on normal and heavy-tailed (Student-t) weights at the real shapes' row
   lengths (K = 4096: gate_up, K = 1408: down). Time: the quantizer on that weight.
2. A random model, bf16 experts then the same experts quantized in place (``quantize_experts_``): per
   MoE layer, the relative error of the routed experts' output (and of the whole MoE block, shared
   experts included) on the same inputs (the bf16 model's hidden states), and the logits' relative
   error and top-1 agreement. Time: one MoE block call, bf16 experts vs int4 (the reference path,
   which dequantizes the touched experts per call; the fast kernels are pending).

On a GPU: the real shape in bf16 (3 layers quick, 8 otherwise); on the CPU: a small model in fp32.
"""

from __future__ import annotations

import time

import torch

from bench.common import Report, Row, bench_main, on_gpu, time_fn


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def format_error(quick: bool, device: str) -> Report:
    from dots1_ext.quant import dequantize_int4, quantize_int4

    report = Report(f"int4 RTN error of x @ w.T (groups of 128, fp32, {device})")
    gen = torch.Generator().manual_seed(0)
    rows = 512 if quick else 2048
    for K in (4096, 1408):
        x = torch.randn(1024, K, generator=gen).to(device)
        weights = {"normal": torch.randn(rows, K, generator=gen)}
        for dof in ((3.0,) if quick else (3.0, 5.0)):
            t = torch.distributions.StudentT(torch.tensor(dof)).sample((rows, K))
            weights[f"student-t {dof:g}"] = t
        for name, w in weights.items():
            w = (w * 0.02).to(device)
            ref = x @ w.T
            for sym in (True, False):
                ms = time_fn(lambda: quantize_int4(w, symmetric=sym), warmup=1, iters=3)
                q = quantize_int4(w, symmetric=sym)
                dq = dequantize_int4(q, torch.float32)
                report.add(Row("quant", f"{name}, [{rows}, {K}]", "symmetric" if sym else "asymmetric", ms,
                               extra={"rel_err_xWT": f"{rel(x @ dq.T, ref):.4f}", "rel_err_w": f"{rel(dq, w):.4f}"}))
    return report


def model_error(quick: bool, device: str) -> list[Report]:
    from dots1_ext.config import Dots1Config, dots1_real_config
    from dots1_ext.model import build_random_model
    from dots1_ext.modules import Dots1MoE
    from dots1_ext.modules import quantize_experts_

    if on_gpu():
        config, dtype, B, L = dots1_real_config(3 if quick else 8), torch.bfloat16, 1, 512
    else:
        config = Dots1Config(vocab_size=1024, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                             num_hidden_layers=3 if quick else 4, num_attention_heads=8, num_key_value_heads=8,
                             head_dim=64, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4,
                             first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                             max_position_embeddings=512, sliding_window=None)
        dtype, B, L = torch.float32, 2, 32 if quick else 64
    dname = str(dtype).removeprefix("torch.")
    model = build_random_model(config, device=device, dtype=dtype, seed=0)
    ids = torch.randint(3, config.vocab_size, (B, L), generator=torch.Generator().manual_seed(1)).to(device)
    moes = [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, Dots1MoE)]
    inputs = {}
    hooks = [moe.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].clone()))
             for i, moe in moes]
    with torch.no_grad():
        logits16 = model(ids).float()
    for h in hooks:
        h.remove()

    def outputs(moe, x):  # (routed experts' output, the whole block's) [T, H], fp32
        with torch.no_grad():
            block = moe(x).float()
            return block - moe.shared_experts(x).float(), block

    ref = {i: outputs(moe, inputs[i]) for i, moe in moes}
    t16 = {i: time_fn(lambda: moe(inputs[i]), warmup=1, iters=3) for i, moe in moes}
    t0 = time.perf_counter()
    quantize_experts_(model)  # in place, expert by expert: the same weights, quantized
    quant_s = time.perf_counter() - t0
    title = (f"int4 experts vs bf16 experts, random model H={config.hidden_size} I={config.moe_intermediate_size} "
             f"E={config.n_routed_experts} top-{config.num_experts_per_tok}, {config.num_hidden_layers} layers, "
             f"{dname}, {B}x{L} tokens, {device}")
    report = Report(title)
    for i, moe in moes:
        routed, block = outputs(moe, inputs[i])
        ms = time_fn(lambda: moe(inputs[i]), warmup=1, iters=3)
        report.add(Row("quant", f"layer {i} MoE block, T={B * L}", "dots1_ext bf16 experts", t16[i]))
        report.add(Row("quant", f"layer {i} MoE block, T={B * L}", "dots1_ext int4 experts (reference path)", ms,
                       extra={"rel_err_routed": f"{rel(routed, ref[i][0]):.4f}",
                              "rel_err_block": f"{rel(block, ref[i][1]):.4f}"}))
    with torch.no_grad():
        logits4 = model(ids).float()
    top1 = (logits4.argmax(-1) == logits16.argmax(-1)).float().mean().item()
    per_token = ((logits4 - logits16).double().norm(dim=-1) / logits16.double().norm(dim=-1))
    report.notes.append(f"logits int4 vs bf16 experts: relative error {rel(logits4, logits16):.4f} (per token max "
                        f"{per_token.max().item():.4f}, median {per_token.median().item():.4f}), top-1 agreement "
                        f"{top1:.3f}; quantizing the experts in place took {quant_s:.2f} s")
    return [report]


@torch.no_grad()
def run(quick: bool = False) -> list[Report]:
    device = "cuda" if on_gpu() else "cpu"
    return [format_error(quick, device)] + model_error(quick, device)


if __name__ == "__main__":
    bench_main(run, __doc__)
