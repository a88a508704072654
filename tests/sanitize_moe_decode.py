"""Runs every CUDA kernel path of the MoE decode family once on small shapes, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck  python tests/sanitize_moe_decode.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck python tests/sanitize_moe_decode.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck python tests/sanitize_moe_decode.py --small
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool synccheck python tests/sanitize_moe_decode.py --small

(Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an access past
a tensor's end.) Paths: the tensor-core kernels with the fragment weight-load mapping (bf16 / fp16; gate_up in the HF and interleaved
layouts; with and without shared experts and residual; one token, a 16-token launch, a full 64-token
launch (384 pairs; the shared experts in four 16-token column groups), T=65 in two launches, 512 pairs
on 512 distinct experts (the most one launch takes), k=20 (25 tokens per launch), one expert taking
every pair (several 16-column items side by side), a K that is not a multiple of the 32-wide step, H
not a multiple of 16, the one-n-tile kernels (T <= 8) and the two-n-tile ones, the four-n-tile ones
(DOTS1_EXT_MOE_DECODE_NT=4) and one-n-tile ones at 64 tokens (=1), items cut at 8 columns, more gate_up
tiles than CTAs (the persistent loop) and many down items per warp (items cut by warp boundaries)),
bad ids (NaN poison where the reference has it, also in a 64-token launch), the wide weight-load
mapping (DOTS1_EXT_MOE_DECODE_LOADS=wide: P = 4 at 1-2 tokens, P = 2 with one n-tile at 3-4 and two at
5-8, both layouts and dtypes, hot experts cut into 2- and 4-column items, K tails, H % 16 == 8, no
shared experts, shared experts only, bad ids, a real-I shape), and the simple kernels (fp32, I not a
multiple of 8, forced by DOTS1_EXT_MOE_DECODE_KERNEL=simple, k past the fast path's 512 pairs). Exits
non-zero if an output disagrees with the reference, so it doubles as a quick smoke test.

``--small`` (or DOTS1_SANITIZE_SMALL=1, which bench/gpu_check.sh sets for them) runs a minimal set
for the slow tools (racecheck / synccheck: the full set took > 70 s under racecheck before the 64-token cases): bf16 only, one case
per kernel variant and schedule shape (T = 1, 16, 64 with hot experts, one expert for all, 512 distinct
experts, bad ids, NT = 4, a K tail; wide at T = 1, 3 and 8, with hot experts and a K tail), and the fp32
fallback once.
"""

from __future__ import annotations

import os
import sys
import time

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
        worst = float((err / bound.clamp_min(1e-30)).max())
        failures.append(f"{name}: {int((err > bound).sum())} rows off (worst {worst:.2f}x)")


_START = time.perf_counter()


def progress(name: str) -> None:
    """One flushed line per case: a run cut short (a sanitizer's timeout) still shows how far it got."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {name}", flush=True)


def case(name, dtype, T, E, k, H, I, Is, epilogue="swiglu_interleaved", residual=True, ids=None, settled=False):
    progress(name)
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
    act = moe_decode_gate_up(hidden, gate_up, ids, sg, epilogue, hidden_settled=settled)
    out = moe_decode_down(act, down, ids, weights, sd, res)
    ref_act = reference.moe_decode_gate_up(hidden.float(), gate_up.float(), ids, sg.float() if Is else None, epilogue)
    ref_out = reference.moe_decode_down(act.float(), down.float(), ids, weights, sd.float() if Is else None,
                                        res.float() if residual else None)
    check(f"{name} act", act, ref_act, dtype)
    check(f"{name} out", out, ref_out, dtype)


def small() -> bool:
    return "--small" in sys.argv[1:] or os.environ.get("DOTS1_SANITIZE_SMALL", "") not in ("", "0")


def with_env(name: str, value: str, fn) -> None:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        fn()
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def with_nt(nt: str, fn) -> None:
    with_env("DOTS1_EXT_MOE_DECODE_NT", nt, fn)


def wide(fn) -> None:
    """fn under the wide weight-load mapping (launches of up to 8 tokens take it)."""
    with_env("DOTS1_EXT_MOE_DECODE_LOADS", "wide", fn)


def wide_all(fn) -> None:
    """fn under DOTS1_EXT_MOE_DECODE_LOADS=wide_all (the wide mapping above 8 tokens too)."""
    with_env("DOTS1_EXT_MOE_DECODE_LOADS", "wide_all", fn)


def bad_ids(T: int, E: int, k: int) -> torch.Tensor:
    ids = torch.rand(T, E).argsort(dim=1)[:, :k].to(torch.int32)
    ids[1, 2], ids[3, 0], ids[5, 1] = -1, E, 2**30
    if T > 40:
        ids[40, 0], ids[T - 1, k - 1] = -(2**31), E + 1
    return ids


def run_small() -> None:
    dtype = torch.bfloat16
    case("small fast T=1", dtype, 1, 24, 6, 256, 64, 128)
    # hidden_settled: each CTA's first shared tile stored after the wait (more shared tiles than CTAs at 64)
    case("small fast T=1 hidden_settled", dtype, 1, 24, 6, 256, 64, 128, settled=True)
    case("small fast T=64 hidden_settled", dtype, 64, 24, 6, 128, 64, 128, settled=True)
    case("small fast T=16 HF", dtype, 16, 24, 6, 256, 64, 128, "swiglu")
    case("small fast T=64 hot experts", dtype, 64, 24, 6, 128, 64, 128)
    case("small fast T=64 one expert", dtype, 64, 8, 6, 64, 32, 32, ids=torch.full((64, 6), 3, dtype=torch.int32))
    case("small fast T=64 512 distinct", dtype, 64, 512, 8, 32, 16, 16, ids=torch.randperm(512).view(64, 8).int())
    case("small fast T=64 bad ids", dtype, 64, 10, 3, 64, 32, 32, ids=bad_ids(64, 10, 3))
    with_nt("4", lambda: case("small fast NT=4 T=64", dtype, 64, 24, 6, 128, 64, 128))
    case("small fast K tail, H%16", dtype, 3, 5, 2, 72, 24, 40)
    case("small fast no shared / residual", dtype, 5, 16, 4, 128, 32, 0, residual=False)
    wide(lambda: case("small wide T=1", dtype, 1, 24, 6, 256, 64, 128))
    wide(lambda: case("small wide T=3 HF", dtype, 3, 24, 6, 256, 64, 128, "swiglu"))
    wide(lambda: case("small wide T=8 one expert", dtype, 8, 8, 6, 64, 32, 32,
                      ids=torch.full((8, 6), 3, dtype=torch.int32)))
    wide(lambda: case("small wide K tail, H%16", dtype, 2, 5, 2, 72, 24, 40))
    wide_all(lambda: case("small wide_all T=64 hot experts", dtype, 64, 24, 6, 128, 64, 128))
    wide_all(lambda: case("small wide_all T=64 bad ids", dtype, 64, 10, 3, 64, 32, 32, ids=bad_ids(64, 10, 3)))
    case("small simple fp32", torch.float32, 5, 12, 3, 64, 32, 48)


def run_wide(dtype: torch.dtype) -> None:
    for epilogue in ("swiglu", "swiglu_interleaved"):
        for T in range(1, 10):  # every wide launch size, and 9 (frag)
            wide(lambda: case(f"wide {dtype} {epilogue} T={T}", dtype, T, 24, 6, 256, 64, 128, epilogue))
    for T in (2, 4, 8):  # one expert for every pair: items of 2, 4 and 8 columns, side by side
        wide(lambda: case(f"wide {dtype} one expert T={T}", dtype, T, 8, 6, 64, 32, 32,
                          ids=torch.full((T, 6), 3, dtype=torch.int32)))
    for T in (9, 17, 64, 65):  # wide_all: the wide mapping above 8 tokens (items of 8 pairs)
        wide_all(lambda: case(f"wide_all {dtype} T={T}", dtype, T, 24, 6, 256, 64, 128))
    wide_all(lambda: case(f"wide_all {dtype} one expert T=64", dtype, 64, 8, 6, 64, 32, 32,
                          ids=torch.full((64, 6), 3, dtype=torch.int32)))
    for T in (1, 3, 6):
        wide(lambda: case(f"wide {dtype} K tail, H%16 T={T}", dtype, T, 5, 2, 72, 24, 40))
        wide(lambda: case(f"wide {dtype} no shared / residual T={T}", dtype, T, 16, 4, 128, 32, 0, residual=False))
        wide(lambda: case(f"wide {dtype} shared only T={T}", dtype, T, 4, 0, 64, 32, 48,
                          ids=torch.zeros(T, 0, dtype=torch.int32)))
    wide(lambda: case(f"wide {dtype} tiny K", dtype, 2, 8, 1, 8, 8, 8))
    wide(lambda: case(f"wide {dtype} bad ids", dtype, 6, 10, 3, 64, 32, 32, ids=bad_ids(6, 10, 3)))
    wide(lambda: case(f"wide {dtype} many tiles T=4", dtype, 4, 128, 6, 64, 1408, 2816))


def run_full() -> None:
    for dtype in (torch.bfloat16, torch.float16):
        for epilogue in ("swiglu", "swiglu_interleaved"):
            for T in (1, 16, 17, 64, 65):
                case(f"fast {dtype} {epilogue} T={T}", dtype, T, 24, 6, 256, 64, 128, epilogue)
        case(f"fast {dtype} no shared / residual", dtype, 5, 16, 4, 128, 32, 0, residual=False)
        case(f"fast {dtype} no shared / residual T=64", dtype, 64, 16, 4, 128, 32, 0, residual=False)
        case(f"fast {dtype} k=20", dtype, 30, 40, 20, 64, 16, 16)
        case(f"fast {dtype} one expert", dtype, 16, 8, 6, 64, 32, 32, ids=torch.full((16, 6), 3, dtype=torch.int32))
        case(f"fast {dtype} one expert T=64", dtype, 64, 8, 6, 64, 32, 32,
             ids=torch.full((64, 6), 3, dtype=torch.int32))
        case(f"fast {dtype} 512 distinct experts", dtype, 64, 512, 8, 32, 16, 16,
             ids=torch.randperm(512).view(64, 8).int())
        case(f"fast {dtype} K tail, H%16", dtype, 3, 5, 2, 72, 24, 40)
        case(f"fast {dtype} K tail, H%16 T=64", dtype, 64, 5, 2, 72, 24, 40)
        case(f"fast {dtype} one expert, 8-column items", dtype, 5, 8, 6, 64, 32, 32,
             ids=torch.full((5, 6), 3, dtype=torch.int32))
        for nt in ("1", "4"):
            with_nt(nt, lambda: case(f"fast {dtype} NT={nt} T=64", dtype, 64, 24, 6, 128, 64, 128))
        for T in (4, 16) + ((64,) if dtype == torch.bfloat16 else ()):
            # Real I and Is on a narrow H: thousands of gate_up tiles for 2 CTAs per SM, ~70 (T=64:
            # ~120) down items of 44 steps over 8 warps.
            case(f"fast {dtype} many tiles T={T}", dtype, T, 128, 6, 64, 1408, 2816)
        case(f"fast {dtype} bad ids", dtype, 6, 10, 3, 64, 32, 32, ids=bad_ids(6, 10, 3))
        case(f"fast {dtype} bad ids T=64", dtype, 64, 10, 3, 64, 32, 32, ids=bad_ids(64, 10, 3))
        run_wide(dtype)
    bad = bad_ids(6, 10, 3)
    case("simple fp32", torch.float32, 5, 12, 3, 64, 32, 48)
    case("simple fp32 bad ids", torch.float32, 6, 10, 3, 64, 32, 32, ids=bad)
    case("simple bf16 I%8", torch.bfloat16, 5, 7, 3, 24, 12, 20, epilogue="swiglu")
    case("simple bf16 k>512", torch.bfloat16, 2, 530, 520, 32, 8, 8)
    os.environ["DOTS1_EXT_MOE_DECODE_KERNEL"] = "simple"
    case("simple bf16 forced", torch.bfloat16, 5, 12, 3, 64, 32, 48)
    case("simple bf16 forced bad ids", torch.bfloat16, 6, 10, 3, 64, 32, 32, ids=bad)
    del os.environ["DOTS1_EXT_MOE_DECODE_KERNEL"]


def run_sets(name: str, run_small, run_full) -> int:
    """The small set (small()) or the full one, then the mismatches: the exit status (2: no GPU). Also
    sanitize_moe_decode_int4's."""
    if not torch.cuda.is_available():
        print(f"{name}: needs a CUDA GPU")
        return 2
    torch.manual_seed(0)
    # The cases not under wide() / wide_all() run the fragment mapping (the default is wide_all).
    with_env("DOTS1_EXT_MOE_DECODE_LOADS", "frag", run_small if small() else run_full)
    torch.cuda.synchronize()
    for f in failures:
        print("MISMATCH", f)
    print(f"{name}:", "small set" if small() else "full set", "ok" if not failures else
          f"{len(failures)} mismatches")
    return 1 if failures else 0


def main() -> int:
    return run_sets("sanitize_moe_decode", run_small, run_full)


if __name__ == "__main__":
    sys.exit(main())
