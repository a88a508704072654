"""Small CUDA cases of topk_gating, router_topk_gating, permute and unpermute for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python tests/sanitize_dispatch.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/sanitize_dispatch.py
    compute-sanitizer --tool synccheck --error-exitcode 1 python tests/sanitize_dispatch.py

Covers the edge cases where an out-of-bounds access would hide: T=0/1, odd T and H, unaligned rows
(element-wise paths), pad_to > 1, out-of-range ids and row_map entries, E=512/k=16, grouped routing,
the fused (cluster) router and the GEMM router. Exits non-zero if a result differs from the reference.
"""

from __future__ import annotations

import sys

import torch

import dots1_ext  # noqa: F401
from dots1_ext import reference as R
from dots1_ext.ops import permute, router_topk_gating, topk_gating, unpermute


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    dev = "cuda"
    torch.manual_seed(0)
    failures = 0

    def expect(cond: bool, what: str) -> None:
        nonlocal failures
        if not cond:
            failures += 1
            print("MISMATCH:", what)

    for T, E, k, ng, tg in [(0, 128, 6, 1, 1), (1, 128, 6, 1, 1), (7, 64, 8, 8, 4), (33, 512, 16, 8, 2), (5, 8, 8, 1, 1),
                            (9, 40, 3, 1, 1), (17, 256, 8, 8, 4)]:
        logits = torch.randn(T, E, device=dev)
        bias = torch.randn(E, device=dev) * 0.1
        w, ids = topk_gating(logits, bias, k, ng, tg, True, 2.5)
        rw, rids = R.topk_gating(logits, bias, k, ng, tg, True, 2.5)
        expect(torch.equal(ids, rids), f"topk_gating ids T={T} E={E}")
        for dtype in (torch.bfloat16, torch.float32):
            for H in (64, 13):
                hidden = torch.randn(T, H, device=dev).to(dtype)
                weight = torch.randn(E, H, device=dev).to(dtype)
                router_topk_gating(hidden, weight, bias, k, ng, tg, True, 2.5)
                router_topk_gating(hidden, weight, bias, k, ng, tg, False, 1.0)
        # Unaligned hidden for the fused router's scalar path.
        if T > 0:
            base = torch.randn(T * 64 + 1, device=dev, dtype=torch.bfloat16)
            router_topk_gating(base[1:].view(T, 64), torch.randn(E, 64, device=dev, dtype=torch.bfloat16), bias, k, ng, tg,
                               True, 1.0)

    for T, k, E, H, pad_to in [(0, 6, 128, 64, 1), (0, 6, 8, 16, 4), (1, 6, 128, 4096, 1), (7, 2, 8, 13, 1),
                               (37, 6, 128, 40, 16), (100, 17, 64, 24, 1), (20, 40, 64, 8, 1), (300, 8, 1024, 8, 3)]:
        for dtype in (torch.bfloat16, torch.float32):
            hidden = torch.randn(T, H, device=dev).to(dtype)
            ids = torch.randint(0, E, (T, k), device=dev, dtype=torch.int32)
            out = permute(hidden, ids, E, pad_to)
            ref = R.permute(hidden, ids, E, pad_to)
            expect(all(torch.equal(a, b) for a, b in zip(out, ref)), f"permute T={T} E={E} H={H} pad={pad_to}")
            # Out-of-range ids: must route to no expert, never out of bounds.
            bad = ids.clone()
            if bad.numel():
                bad.view(-1)[::3] = -7
                bad.view(-1)[1::5] = E + 3
            permuted, offsets, row_map = permute(hidden, bad, E, pad_to)
            weights = torch.rand(T, k, device=dev)
            expert_out = torch.randn(permuted.shape[0], H, device=dev).to(dtype)
            got = unpermute(expert_out, out[2], weights, hidden, hidden)
            expect(torch.equal(got, R.unpermute(expert_out, out[2], weights, hidden, hidden)), f"unpermute T={T} H={H}")
            rm = row_map.clone()
            if rm.numel():
                rm[::2] = -1
                rm[1::4] = 2**31 - 1
            unpermute(expert_out, rm, weights, None, None)
            # Unaligned rows (element-wise paths).
            if T > 0:
                base = torch.randn(T * H + 1, device=dev).to(dtype)
                h2 = base[1:].view(T, H)
                out2 = permute(h2, ids, E, pad_to)
                expect(torch.equal(out2[0], R.permute(h2, ids, E, pad_to)[0]), "permute unaligned")
                eo = torch.randn(out2[0].shape[0] * H + 1, device=dev).to(dtype)[1:].view(-1, H)
                expect(torch.equal(unpermute(eo, out2[2], weights, h2, None),
                                   R.unpermute(eo, out2[2], weights, h2, None)), "unpermute unaligned")
    torch.cuda.synchronize()
    print("sanitize_dispatch:", "OK" if failures == 0 else f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
