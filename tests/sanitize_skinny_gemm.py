"""Runs every CUDA path of skinny_gemm once on small shapes, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck  python tests/sanitize_skinny_gemm.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck python tests/sanitize_skinny_gemm.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck python tests/sanitize_skinny_gemm.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool synccheck python tests/sanitize_skinny_gemm.py

(Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an access past a
tensor's end.) Paths: the tensor-core kernel with 1 and 2 weight tiles per warp x 1 and 2 token
tiles (M <= 8, M > 8) x the three epilogues x fp16/bf16, on shapes with partial tiles (N not a
multiple of 16, N/2 not a multiple of 8), partial 32-wide steps (K % 32 != 0), fewer steps than warps
(K = 8), tight allocations (the weight and x end exactly at the tensor's end) and row strides; its
wide weight-load mapping (DOTS1_EXT_SKINNY_KERNEL=wide: 4 k-parts per row for M <= 2, 2 for M <= 4)
x 1 and 2 tiles x the epilogues x fp16/bf16 on the same shapes plus partial 128- and 64-wide steps
and K shorter than one step; the
portable kernel (fp32, odd K, misaligned weight); the aligned copy of a misaligned x; cuBLAS (M > 16);
M = 0, K = 0. Exits non-zero if an output disagrees with the fp32 reference, so it doubles as a smoke
test.

DOTS1_SANITIZE_SMALL=1 (what bench/gpu_check.sh sets for racecheck and synccheck, whose per-launch cost
is far above memcheck's) keeps every kernel structure (tiles 1 / 2 x token tiles 1 / 2 x epilogues, the
wide kernels' 4 and 2 parts x tiles 1 / 2 x epilogues, the portable kernel, the edges) in bf16 on two
shapes each.
"""

from __future__ import annotations

import os
import sys

import torch

from dots1_ext import reference
from dots1_ext.ops.skinny_gemm import skinny_gemm

ROW_RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}
failures: list[str] = []
SMALL = os.environ.get("DOTS1_SANITIZE_SMALL") == "1"
# (N, K) per epilogue: partial 16-row tiles ("none": N % 16 != 0; "swiglu": N/2 % 8 != 0), K = 8 (fewer
# steps than warps), K % 32 != 0, a long K; the interleaved layout needs N % 16 == 0.
SHAPES = {
    "none": ((40, 8), (1000, 40), (200, 1000), (16, 4096), (1040, 256)),
    "swiglu": ((20, 8), (1000, 40), (200, 1000), (16, 4096), (1044, 256)),
    "swiglu_interleaved": ((48, 8), (208, 40), (208, 1000), (16, 4096), (1040, 256)),
}


def check(name: str, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, epilogue: str) -> None:
    ref = reference.skinny_gemm(x.float(), w.float(), epilogue).to(x.dtype).double()
    got = out.double()
    if got.shape != ref.shape:
        failures.append(f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
        return
    if got.numel() == 0:
        return
    if not torch.isfinite(got).all():
        failures.append(f"{name}: {int((~torch.isfinite(got)).sum())} non-finite values")
        return
    err = (got - ref).abs().amax(dim=1)
    bound = ROW_RTOL[x.dtype] * ref.abs().amax(dim=1)
    if (err > bound).any():
        failures.append(f"{name}: {int((err > bound).sum())} rows off (worst {float((err - bound).max()):.3e} over)")


def run(name: str, x: torch.Tensor, w: torch.Tensor, epilogue: str) -> None:
    check(name, skinny_gemm(x, w, epilogue), x, w, epilogue)


def tensor_core_paths(dtype: torch.dtype) -> None:
    for tiles in ("1", "2"):
        os.environ["DOTS1_EXT_SKINNY_TILES"] = tiles
        for epilogue in ("none", "swiglu", "swiglu_interleaved"):
            for M in (1, 9) if SMALL else (1, 3, 8, 9, 16):
                for N, K in SHAPES[epilogue][1:3] if SMALL else SHAPES[epilogue]:
                    x = torch.randn(M, K, dtype=dtype, device="cuda")
                    w = torch.randn(N, K, dtype=dtype, device="cuda") / K**0.5
                    run(f"mma tiles={tiles} {dtype} {epilogue} M={M} N={N} K={K}", x, w, epilogue)
            # Row strides on both operands (aligned): column slices of wider tensors.
            x = torch.randn(5, 264, dtype=dtype, device="cuda")[:, 8:]
            w = (torch.randn(96, 272, dtype=dtype, device="cuda") / 16)[:, 16:]
            run(f"mma tiles={tiles} {dtype} {epilogue} strided", x, w, epilogue)
    os.environ.pop("DOTS1_EXT_SKINNY_TILES")
    wide_paths(dtype)
    # The automatic choice on a shape large enough for 2 tiles per warp at M > 4.
    for M in (2, 6, 12):
        x = torch.randn(M, 128, dtype=dtype, device="cuda")
        w = torch.randn(16 * 700, 128, dtype=dtype, device="cuda") / 12
        run(f"mma auto {dtype} M={M}", x, w, "swiglu")


# Wide-kernel shapes on top of SHAPES: K = 200 (not a whole number of 128- or 64-wide steps, and a
# last step whose lanes are partly past K), K = 96 (shorter than one 128-wide step), N ending a tile early.
WIDE_SHAPES = {
    "none": ((24, 200), (40, 96)),
    "swiglu": ((36, 200), (20, 96)),
    "swiglu_interleaved": ((48, 200), (16, 96)),
}


def wide_paths(dtype: torch.dtype) -> None:
    os.environ["DOTS1_EXT_SKINNY_KERNEL"] = "wide"
    try:
        for tiles in ("1", "2"):
            os.environ["DOTS1_EXT_SKINNY_TILES"] = tiles
            for epilogue in ("none", "swiglu", "swiglu_interleaved"):
                shapes = SHAPES[epilogue] + WIDE_SHAPES[epilogue]
                for M in (1, 3) if SMALL else (1, 2, 3, 4, 5):  # parts 4, 4, 2, 2, then frag
                    for N, K in WIDE_SHAPES[epilogue] if SMALL else shapes:
                        x = torch.randn(M, K, dtype=dtype, device="cuda")
                        w = torch.randn(N, K, dtype=dtype, device="cuda") / K**0.5
                        run(f"wide tiles={tiles} {dtype} {epilogue} M={M} N={N} K={K}", x, w, epilogue)
                # Row strides on both operands (aligned): column slices of wider tensors.
                for M in (2, 4):
                    x = torch.randn(M, 264, dtype=dtype, device="cuda")[:, 8:]
                    w = (torch.randn(96, 272, dtype=dtype, device="cuda") / 16)[:, 16:]
                    run(f"wide tiles={tiles} {dtype} {epilogue} M={M} strided", x, w, epilogue)
        os.environ.pop("DOTS1_EXT_SKINNY_TILES")
        # The automatic tile choice on a shape large enough for 2 tiles per warp.
        for M in (1, 4):
            x = torch.randn(M, 128, dtype=dtype, device="cuda")
            w = torch.randn(16 * 1100, 128, dtype=dtype, device="cuda") / 12
            run(f"wide auto {dtype} M={M}", x, w, "none")
    finally:
        os.environ.pop("DOTS1_EXT_SKINNY_KERNEL", None)
        os.environ.pop("DOTS1_EXT_SKINNY_TILES", None)


def portable_paths(dtype: torch.dtype) -> None:
    for epilogue in ("none", "swiglu", "swiglu_interleaved"):
        for M in (1, 9) if SMALL else (1, 9, 16):
            # Odd K (not a whole 16-byte vector): the portable kernel for every dtype.
            x = torch.randn(M, 100, dtype=dtype, device="cuda")
            w = torch.randn(48, 100, dtype=dtype, device="cuda") / 10
            run(f"portable {dtype} {epilogue} M={M} K=100", x, w, epilogue)
            # A misaligned weight view (storage offset of one element).
            flat = torch.randn(48 * 64 + 1, dtype=dtype, device="cuda") / 8
            w = flat[1:].view(48, 64)
            x = torch.randn(M, 64, dtype=dtype, device="cuda")
            run(f"portable {dtype} {epilogue} M={M} misaligned weight", x, w, epilogue)
            # A misaligned x (copied to an aligned buffer when the weight allows the tensor cores).
            x = torch.randn(M, 65, dtype=dtype, device="cuda")[:, 1:]
            w = torch.randn(48, 64, dtype=dtype, device="cuda") / 8
            run(f"{dtype} {epilogue} M={M} misaligned x", x, w, epilogue)


def edge_paths() -> None:
    dtype = torch.bfloat16
    for epilogue in ("none", "swiglu", "swiglu_interleaved"):
        w = torch.randn(32, 64, dtype=dtype, device="cuda")
        run(f"M=0 {epilogue}", torch.randn(0, 64, dtype=dtype, device="cuda"), w, epilogue)
        w0 = torch.randn(32, 0, dtype=dtype, device="cuda")
        out = skinny_gemm(torch.randn(3, 0, dtype=dtype, device="cuda"), w0, epilogue)
        if not torch.equal(out, torch.zeros_like(out)):
            failures.append(f"K=0 {epilogue}: not zeros")
        for M in (17, 40):  # cuBLAS
            x = torch.randn(M, 256, dtype=dtype, device="cuda")
            w = torch.randn(96, 256, dtype=dtype, device="cuda") / 16
            run(f"cublas M={M} {epilogue}", x, w, epilogue)


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_skinny_gemm: needs a CUDA GPU")
        return 2
    torch.manual_seed(0)
    for dtype in (torch.bfloat16,) if SMALL else (torch.bfloat16, torch.float16):
        tensor_core_paths(dtype)
    for dtype in (torch.bfloat16,) if SMALL else (torch.float32, torch.float16, torch.bfloat16):
        portable_paths(dtype)
    edge_paths()
    torch.cuda.synchronize()
    for f in failures:
        print("MISMATCH", f)
    print("sanitize_skinny_gemm:", "ok" if not failures else f"{len(failures)} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
