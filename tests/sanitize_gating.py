"""Small CUDA cases of topk_gating and router_topk_gating for compute-sanitizer (bench/gpu_check.sh).

    compute-sanitizer --tool memcheck  --error-exitcode 9 python tests/sanitize_gating.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python tests/sanitize_gating.py
    compute-sanitizer --tool synccheck --error-exitcode 9 python tests/sanitize_gating.py

The gating kernel keeps per-warp scores in shared memory (grouped routing). The fused router runs
as a grid (default: blocks write partial logits to a workspace, the last to arrive, found with an
atomic counter, sums them and routes; its shared staging buffer is reused for the logits after a
__syncthreads_or) or as a thread-block cluster whose block 0 reads the other blocks' shared memory
(distributed shared memory, two cluster barriers): racecheck and synccheck are the tools for those.
Every router kernel (DOTS1_EXT_ROUTER_KERNEL=grid|cluster|gemm) runs on T = 0/1/odd/16 (the fused
limit)/17, E up to 512 and k up to 16, grouped routing, NaN logits, unaligned hidden rows and odd H
(the fused kernels' scalar paths). Exits non-zero if ids differ from the reference.
A few seconds of GPU work: the sanitizer's start-up dominates.
"""

from __future__ import annotations

import os
import sys

import torch

import dots1_ext  # noqa: F401
from dots1_ext import reference as R
from dots1_ext.ops import router_topk_gating, topk_gating


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_gating: needs a CUDA GPU")
        return 2
    dev = "cuda"
    torch.manual_seed(0)
    failures = 0

    def expect(cond: bool, what: str) -> None:
        nonlocal failures
        if not cond:
            failures += 1
            print("MISMATCH:", what)

    def check_router(hidden, weight, bias, k, what):
        # ids where the biased scores are separated beyond the summation-order rounding.
        _, ids = router_topk_gating(hidden, weight, bias, k, 1, 1, True, 1.0)
        _, rids = R.router_topk_gating(hidden, weight, bias, k, 1, 1, True, 1.0)
        choice = (hidden.float() @ weight.float().t()).sigmoid() + bias
        top = choice.sort(dim=-1, descending=True).values[:, : k + 1]
        sep = (top[:, :-1] - top[:, 1:]).min(dim=-1).values > 1e-5
        expect(torch.equal(ids[sep], rids[sep]), f"router ids {what}")

    # --small / DOTS1_SANITIZE_SMALL=1 (racecheck, synccheck: the full set did not finish in 45 s under
    # racecheck): one shape per kernel variant, bf16 routers only.
    small = "--small" in sys.argv or os.environ.get("DOTS1_SANITIZE_SMALL") == "1"
    cases = [(0, 128, 6, 1, 1), (1, 128, 6, 1, 1), (7, 64, 8, 8, 4), (33, 512, 16, 8, 2), (5, 8, 8, 1, 1),
             (9, 40, 3, 1, 1), (17, 256, 8, 8, 4)]
    if small:
        cases = [(1, 128, 6, 1, 1), (7, 64, 8, 8, 4), (17, 256, 8, 8, 4)]
    for T, E, k, ng, tg in cases:
        logits = torch.randn(T, E, device=dev)
        bias = torch.randn(E, device=dev) * 0.1
        for renorm in (True, False):
            w, ids = topk_gating(logits, bias, k, ng, tg, renorm, 2.5)
            rw, rids = R.topk_gating(logits, bias, k, ng, tg, renorm, 2.5)
            expect(torch.equal(ids, rids), f"topk_gating ids T={T} E={E} renorm={renorm}")
        if T > 2:  # NaN logits: ranked highest, the same ids as the reference
            nan_logits = logits.clone()
            nan_logits[1, E // 3] = float("nan")
            nan_logits[2] = float("nan")
            _, ids = topk_gating(nan_logits, bias, k, ng, tg, True, 1.0)
            expect(torch.equal(ids, R.topk_gating(nan_logits, bias, k, ng, tg, True, 1.0)[1]), f"NaN ids E={E}")
        for kernel in ("grid", "cluster", "gemm"):
            os.environ["DOTS1_EXT_ROUTER_KERNEL"] = kernel
            for dtype in (torch.bfloat16,) if small else (torch.bfloat16, torch.float32):
                # 1100: more than one 1 KB column slice of the grid kernel, the last one partial; 512:
                # whole 16-byte rows (the vector loads).
                for H in (13, 512, 1100) if small else (64, 13, 512, 1100):
                    for Tr in sorted({max(T, 0), 16, 17}):  # fused up to 16 tokens, GEMM path above
                        hidden = torch.randn(Tr, H, device=dev).to(dtype)
                        weight = (torch.randn(E, H, device=dev) / H**0.5).to(dtype)
                        router_topk_gating(hidden, weight, bias, k, ng, tg, True, 2.5)
                        router_topk_gating(hidden, weight, bias, k, ng, tg, False, 1.0)
                        if ng == 1 and Tr > 0:
                            check_router(hidden, weight, bias, k, f"{kernel} T={Tr} E={E} H={H} {dtype}")
            # Unaligned hidden for the fused router's scalar path.
            if T > 0:
                Tr = min(T, 16)
                base = torch.randn(Tr * 64 + 1, device=dev, dtype=torch.bfloat16)
                router_topk_gating(base[1:].view(Tr, 64), torch.randn(E, 64, device=dev, dtype=torch.bfloat16), bias,
                                   k, ng, tg, True, 1.0)
            os.environ.pop("DOTS1_EXT_ROUTER_KERNEL")
    torch.cuda.synchronize()
    print("sanitize_gating:", "small set" if small else "full set", "OK" if failures == 0 else f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
