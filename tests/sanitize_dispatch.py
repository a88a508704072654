"""Small CUDA cases of permute and unpermute for compute-sanitizer (bench/gpu_check.sh runs all three
tools; gating has its own script, tests/sanitize_gating.py).

    compute-sanitizer --tool memcheck  --error-exitcode 9 python tests/sanitize_dispatch.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python tests/sanitize_dispatch.py
    compute-sanitizer --tool synccheck --error-exitcode 9 python tests/sanitize_dispatch.py

The permute index kernel is one block of 32 warps sharing per-warp histograms in shared memory
(barriers between count, scan and rank), the scatter and unpermute kernels stage row indices in
shared memory: racecheck and synccheck matter here. Covers the edge cases where an out-of-bounds
access would hide: the single-block and the multi-block index, T=0/1, odd T and H, unaligned rows (element-wise paths), pad_to > 1, E=1024 (the
shared-memory opt-in), out-of-range ids and row_map entries (poison policy: compared with the
reference, NaN included). Exits non-zero if a result differs from the reference.
"""

from __future__ import annotations

import os
import sys

import torch

import dots1_ext  # noqa: F401
from dots1_ext import reference as R
from dots1_ext.ops import permute, unpermute


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

    for T, k, E, H, pad_to in [(0, 6, 128, 64, 1), (0, 6, 8, 16, 4), (1, 6, 128, 4096, 1), (7, 2, 8, 13, 1),
                               (37, 6, 128, 40, 16), (100, 17, 64, 24, 1), (20, 40, 64, 8, 1), (300, 8, 1024, 8, 3)]:
        for dtype in (torch.bfloat16, torch.float32):
            hidden = torch.randn(T, H, device=dev).to(dtype)
            ids = torch.randint(0, E, (T, k), device=dev, dtype=torch.int32)
            out = permute(hidden, ids, E, pad_to)
            ref = R.permute(hidden, ids, E, pad_to)
            expect(all(torch.equal(a, b) for a, b in zip(out, ref)), f"permute T={T} E={E} H={H} pad={pad_to}")
            # Out-of-range ids: no row (row_map -1, poison policy), never out of bounds.
            bad = ids.clone()
            if bad.numel():
                bad.view(-1)[::3] = -7
                bad.view(-1)[1::5] = E + 3
            permuted, offsets, row_map = permute(hidden, bad, E, pad_to)
            expect(all(torch.equal(a, b) for a, b in zip((permuted, offsets, row_map), R.permute(hidden, bad, E, pad_to))),
                   f"permute with bad ids T={T} E={E}")
            weights = torch.rand(T, k, device=dev)
            expert_out = torch.randn(permuted.shape[0], H, device=dev).to(dtype)
            got = unpermute(expert_out, out[2], weights, hidden, hidden)
            expect(torch.equal(got, R.unpermute(expert_out, out[2], weights, hidden, hidden)), f"unpermute T={T} H={H}")
            rm = row_map.clone()
            if rm.numel():
                rm[::2] = -1
                rm[1::4] = 2**31 - 1
            got = unpermute(expert_out, rm, weights, None, None)
            ref = R.unpermute(expert_out, rm, weights, None, None)
            expect(torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.equal(got.nan_to_num(), ref.nan_to_num()),
                   f"unpermute with bad row_map T={T} H={H}")
            # Unaligned rows (element-wise paths).
            if T > 0:
                base = torch.randn(T * H + 1, device=dev).to(dtype)
                h2 = base[1:].view(T, H)
                out2 = permute(h2, ids, E, pad_to)
                expect(torch.equal(out2[0], R.permute(h2, ids, E, pad_to)[0]), "permute unaligned")
                eo = torch.randn(out2[0].shape[0] * H + 1, device=dev).to(dtype)[1:].view(-1, H)
                expect(torch.equal(unpermute(eo, out2[2], weights, h2, None),
                                   R.unpermute(eo, out2[2], weights, h2, None)), "unpermute unaligned")
    # The multi-block index (count, scan, rank launches; auto takes it for large T*k), forced at small and
    # large sizes, with bad ids, padding, the most experts and one expert.
    os.environ["DOTS1_EXT_PERMUTE_INDEX"] = "multi"
    for T, k, E, pad_to in [(1, 1, 8, 1), (37, 6, 128, 16), (1500, 6, 128, 1), (700, 8, 1024, 3), (2000, 6, 1, 4)]:
        hidden = torch.randn(T, 8, device=dev, dtype=torch.bfloat16)
        ids = torch.randint(0, E, (T, k), device=dev, dtype=torch.int32)
        ids.view(-1)[::7] = -1
        ids.view(-1)[3::11] = E
        out = permute(hidden, ids, E, pad_to)
        expect(all(torch.equal(a, b) for a, b in zip(out, R.permute(hidden, ids, E, pad_to))),
               f"permute (multi-block index) T={T} k={k} E={E} pad={pad_to}")
    del os.environ["DOTS1_EXT_PERMUTE_INDEX"]
    torch.cuda.synchronize()
    print("sanitize_dispatch:", "OK" if failures == 0 else f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
