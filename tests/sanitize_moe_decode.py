"""Runs every CUDA kernel path of the MoE decode family once on small shapes, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck  python tests/sanitize_moe_decode.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck python tests/sanitize_moe_decode.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck python tests/sanitize_moe_decode.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool synccheck python tests/sanitize_moe_decode.py

(Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an access past
a tensor's end.) Paths: the tensor-core kernels (bf16 / fp16; gate_up in the HF and interleaved
layouts; with and without shared experts and residual; one token, a full 16-token launch, T=17 in two
launches, k=20 (6 tokens per launch), one expert taking every pair (several 16-column items), a K
that is not a multiple of the 32-wide step, H not a multiple of 16, the one-n-tile kernels (T <= 8)
and the two-n-tile ones, items cut at 8 columns, more gate_up tiles than CTAs (the persistent loop)
and many down items per warp (items cut by warp boundaries)), bad ids (NaN poison where the
reference has it), and the simple kernels (fp32, I not a multiple of 8, forced by
DOTS1_EXT_MOE_DECODE_KERNEL=simple, k past the fast path's 128 pairs). Exits non-zero if an output
disagrees with the reference, so it doubles as a quick smoke test.
"""

from __future__ import annotations

import os
import sys

import torch

from dots1_ext import ops, reference
from dots1_ext.ops.moe_decode import moe_decode_down, moe_decode_gate_up

failures: list[str] = []
ROW_RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}


def check(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    o, r = out.double().reshape(-1, out.shape[-1]), ref.to(dtype).double().reshape(-1, ref.shape[-1])
    if not torch.equal(torch.isnan(o), torch.isnan(r)):
        failures.append(f"{name}: NaN (poison) pattern differs from the reference")
        return
    o, r = o.nan_to_num(), r.nan_to_num()
    if not torch.isfinite(o).all():
        failures.append(f"{name}: non-finite values")
        return
    if o.numel() == 0:
        return
    err = (o - r).abs().amax(dim=1)
    bound = ROW_RTOL[dtype] * r.abs().amax(dim=1)
    if (err > bound).any():
        failures.append(f"{name}: {int((err > bound).sum())} rows off (worst {float((err / bound.clamp_min(1e-30)).max()):.2f}x)")


def case(name, dtype, T, E, k, H, I, Is, epilogue="swiglu_interleaved", residual=True, ids=None):
    g = (torch.randn(E, 2 * I, H, device="cuda") / H**0.5).to(dtype)
    gate_up = ops.interleave_gate_up(g) if epilogue == "swiglu_interleaved" else g
    down = (torch.randn(E, H, I, device="cuda") / max(I, 1) ** 0.5).to(dtype)
    sg = (torch.randn(2 * Is, H, device="cuda") / H**0.5).to(dtype) if Is else None
    sd = (torch.randn(H, Is, device="cuda") / Is**0.5).to(dtype) if Is else None
    hidden = torch.randn(T, H, device="cuda").to(dtype)
    if ids is None:
        ids = torch.rand(T, E).argsort(dim=1)[:, :k].to(torch.int32)
    ids = ids.cuda()
    weights = torch.rand(T, k, device="cuda") + 0.1
    res = torch.randn(T, H, device="cuda").to(dtype) if residual else None
    act = moe_decode_gate_up(hidden, gate_up, ids, sg, epilogue)
    out = moe_decode_down(act, down, ids, weights, sd, res)
    ref_act = reference.moe_decode_gate_up(hidden.float(), gate_up.float(), ids, sg.float() if Is else None, epilogue)
    ref_out = reference.moe_decode_down(act.float(), down.float(), ids, weights, sd.float() if Is else None,
                                        res.float() if residual else None)
    check(f"{name} act", act, ref_act, dtype)
    check(f"{name} out", out, ref_out, dtype)


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_moe_decode: needs a CUDA GPU")
        return 2
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for epilogue in ("swiglu", "swiglu_interleaved"):
            for T in (1, 16, 17):
                case(f"fast {dtype} {epilogue} T={T}", dtype, T, 24, 6, 256, 64, 128, epilogue)
        case(f"fast {dtype} no shared / residual", dtype, 5, 16, 4, 128, 32, 0, residual=False)
        case(f"fast {dtype} k=20", dtype, 13, 40, 20, 64, 16, 16)
        case(f"fast {dtype} one expert", dtype, 16, 8, 6, 64, 32, 32, ids=torch.full((16, 6), 3, dtype=torch.int32))
        case(f"fast {dtype} K tail, H%16", dtype, 3, 5, 2, 72, 24, 40)
        case(f"fast {dtype} one expert, 8-column items", dtype, 5, 8, 6, 64, 32, 32,
             ids=torch.full((5, 6), 3, dtype=torch.int32))
        for T in (4, 16):
            # Real I and Is on a narrow H: thousands of gate_up tiles for 2 CTAs per SM, ~70 down
            # items of 44 steps over 8 warps.
            case(f"fast {dtype} many tiles T={T}", dtype, T, 128, 6, 64, 1408, 2816)
        bad = torch.rand(6, 10).argsort(dim=1)[:, :3].to(torch.int32)
        bad[1, 2], bad[3, 0], bad[5, 1] = -1, 10, 2**30
        case(f"fast {dtype} bad ids", dtype, 6, 10, 3, 64, 32, 32, ids=bad)
    case("simple fp32", torch.float32, 5, 12, 3, 64, 32, 48)
    case("simple fp32 bad ids", torch.float32, 6, 10, 3, 64, 32, 32, ids=bad)
    case("simple bf16 I%8", torch.bfloat16, 5, 7, 3, 24, 12, 20, epilogue="swiglu")
    case("simple bf16 k>128", torch.bfloat16, 3, 140, 130, 32, 8, 8)
    os.environ["DOTS1_EXT_MOE_DECODE_KERNEL"] = "simple"
    case("simple bf16 forced", torch.bfloat16, 5, 12, 3, 64, 32, 48)
    case("simple bf16 forced bad ids", torch.bfloat16, 6, 10, 3, 64, 32, 32, ids=bad)
    del os.environ["DOTS1_EXT_MOE_DECODE_KERNEL"]
    torch.cuda.synchronize()
    for f in failures:
        print("MISMATCH", f)
    print("sanitize_moe_decode:", "ok" if not failures else f"{len(failures)} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
