"""Permute / unpermute at real Dots1 shapes (E=128, k=6, H=4096, bf16), against the eager reference
and the index bookkeeping of HF transformers' grouped_mm experts path (replicated below from
transformers.integrations.moe.grouped_mm_experts_forward: sort of ids, gather of rows, histc/cumsum;
on the way back the weight multiply, the inverse-permutation gather and the reshape+sum), plus a
"glue" case: gating + permute + unpermute at T=4096.
Floors: bytes moved (each input read once, each output written once) over the copy bandwidth.

    python -m bench.bench_dispatch [--quick] [--json PATH]
"""

from __future__ import annotations


import torch

from bench.common import bench_main, bytes_floor_ms, default_device, on_gpu, Report, Row, time_fn
from dots1_ext import reference as R
from dots1_ext.ops import permute, topk_gating, unpermute

E, K = 128, 6


def hf_permute(hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int):
    k = topk_ids.shape[1]
    expert_ids = topk_ids.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    selected = hidden[perm // k]
    histc_input = expert_ids_g.float() if hidden.device.type == "cpu" else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    return selected, offsets, perm


def hf_unpermute(proj_out, perm, topk_weights, shared_out, residual):
    T, k = topk_weights.shape
    weighted = proj_out * topk_weights.reshape(-1)[perm].unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
    out = weighted[inv_perm].view(T, k, -1).sum(dim=1).to(proj_out.dtype)
    return out + shared_out + residual


def _ids(T: int, device: str) -> torch.Tensor:
    return torch.rand(T, E, device=device).argsort(dim=1)[:, :K].to(torch.int32).contiguous()


def run(quick: bool = False) -> list[Report]:
    device = default_device()
    gpu = on_gpu()
    H = 4096 if gpu else 256
    tokens = ([1, 4096] if quick else [1, 64, 512, 4096, 16384]) if gpu else ([1, 64] if quick else [1, 64, 512])
    dt = torch.bfloat16
    perm_rep = Report(f"permute (E={E}, k={K}, H={H}, bf16)")
    unperm_rep = Report(f"unpermute + shared + residual (E={E}, k={K}, H={H}, bf16)")
    for T in tokens:
        case = f"T={T}"
        hidden = torch.randn(T, H, device=device, dtype=dt)
        ids = _ids(T, device)
        nbytes = T * H * 2 + T * K * H * 2 + T * K * 4 * 2 + (E + 1) * 4
        floor = bytes_floor_ms(nbytes)
        for impl, fn in (
            ("dots1_ext permute", lambda: permute(hidden, ids, E)),
            ("eager reference", lambda: R.permute(hidden, ids, E, 1)),
            ("HF grouped_mm bookkeeping", lambda: hf_permute(hidden, ids, E)),
        ):
            ms = time_fn(fn)
            perm_rep.add(Row("permute", case, impl, ms, floor, gbs=nbytes / ms / 1e6))

        permuted, _, row_map = permute(hidden, ids, E)
        expert_out = torch.randn_like(permuted)
        weights = torch.rand(T, K, device=device)
        shared = torch.randn_like(hidden)
        _, _, perm = hf_permute(hidden, ids, E)
        nbytes = T * K * H * 2 + 3 * T * H * 2 + T * K * 8
        floor = bytes_floor_ms(nbytes)
        for impl, fn in (
            ("dots1_ext unpermute", lambda: unpermute(expert_out, row_map, weights, shared, hidden)),
            ("eager reference", lambda: R.unpermute(expert_out, row_map, weights, shared, hidden)),
            ("HF grouped_mm bookkeeping", lambda: hf_unpermute(expert_out, perm, weights, shared, hidden)),
        ):
            ms = time_fn(fn)
            unperm_rep.add(Row("unpermute", case, impl, ms, floor, gbs=nbytes / ms / 1e6))

    glue = Report(f"glue: gating (after logits) + permute + unpermute (E={E}, k={K}, H={H}, bf16)")
    T = 4096 if gpu else 256
    logits = torch.randn(T, E, device=device) * 2
    bias = torch.randn(E, device=device) * 0.05
    hidden = torch.randn(T, H, device=device, dtype=dt)
    shared = torch.randn_like(hidden)
    nbytes = (T * E * 4 + T * K * 8) + (T * H * 2 + T * K * H * 2 + T * K * 8) + (T * K * H * 2 + 3 * T * H * 2 + T * K * 8)
    floor = bytes_floor_ms(nbytes)

    def ours():
        w, i = topk_gating(logits, bias, K, 1, 1, True, 2.5)
        p, _, rm = permute(hidden, i, E)
        return unpermute(p, rm, w, shared, hidden)

    def reference():
        w, i = R.topk_gating(logits, bias, K, 1, 1, True, 2.5)
        p, _, rm = R.permute(hidden, i, E, 1)
        return R.unpermute(p, rm, w, shared, hidden)

    def hf():
        w, i = R.topk_gating(logits, bias, K, 1, 1, True, 2.5)
        x, _, perm = hf_permute(hidden, i, E)
        return hf_unpermute(x, perm, w, shared, hidden)

    for impl, fn in (("dots1_ext", ours), ("eager reference", reference), ("HF grouped_mm bookkeeping", hf)):
        ms = time_fn(fn)
        glue.add(Row("glue", f"T={T}", impl, ms, floor, gbs=nbytes / ms / 1e6))
    return [perm_rep, unperm_rep, glue]


if __name__ == "__main__":
    bench_main(run, __doc__)
