"""Small CUDA cases of grouped_gemm_int4 (the W4A16 grouped GEMM), every CUDA backend, for compute-sanitizer.

    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    compute-sanitizer --tool memcheck  --error-exitcode 9 python tests/sanitize_grouped_gemm_int4.py
    compute-sanitizer --tool initcheck --error-exitcode 9 python tests/sanitize_grouped_gemm_int4.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python tests/sanitize_grouped_gemm_int4.py --small
    compute-sanitizer --tool synccheck --error-exitcode 9 python tests/sanitize_grouped_gemm_int4.py --small

Every CUTLASS tile. Zipf routing over 16 experts with empty experts and rows outside every expert (before and after),
T in {1, 7, 100}, both epilogues, asymmetric and symmetric, the last expert's last weight rows and
groups (memcheck sees a read past qweight / scales / zeros), K = 128 (one group) and 1408 (11 groups,
the down projection's). Garbage offsets (decreasing, out of range) run once per backend for memcheck:
no access outside the tensors. Exits non-zero if a result differs from grouped_gemm on the dequantized
weight. ``--small`` (or DOTS1_SANITIZE_SMALL=1, which bench/gpu_check.sh sets for racecheck and
synccheck) runs one case per epilogue.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_grouped_gemm import offsets_from_counts, routing_counts  # noqa: E402

from dots1_ext import quant, reference  # noqa: E402
from dots1_ext.ops import grouped_gemm_int4  # noqa: E402

ROW_RTOL = 2.0**-7  # tests/test_grouped_gemm_int4.py INT4_ROW_RTOL


def small() -> bool:
    return "--small" in sys.argv[1:] or os.environ.get("DOTS1_SANITIZE_SMALL", "") not in ("", "0")


def backends() -> list[str]:
    """DOTS1_EXT_GEMM_INT4_BACKEND values, with DOTS1_EXT_GEMM_INT4_TILE after a space."""
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    tiles = ["128x32", "128x64", "128x128", "128x192", "128x256"]
    return [f"cutlass {tile}" for tile in tiles] + ["dequantize"] if sm90 else ["dequantize"]


def case(name: str, T: int, E: int, N: int, K: int, epilogue: str, symmetric: bool) -> bool:
    counts = routing_counts("zipf", T, min(6, E), E)  # top-k without replacement: k <= E
    x = torch.randn(2 + sum(counts) + 3, K, device="cuda", dtype=torch.bfloat16)
    q = quant.quantize_int4(torch.randn(E, N, K, device="cuda") / K**0.5, symmetric=symmetric)
    off = offsets_from_counts(counts, "cuda", first=2)
    out = grouped_gemm_int4(x, q.qweight, q.scales, q.zeros, off, epilogue)
    ref = reference.grouped_gemm(x.float(), quant.dequantize_int4(q, torch.bfloat16).float(), off, epilogue)
    o, r = out.double(), ref.to(torch.bfloat16).double()
    ok = bool(torch.isfinite(o).all()) and bool(((o - r).abs().amax(1) <= ROW_RTOL * r.abs().amax(1)).all())
    print(f"{name:60s} {'ok' if ok else 'FAILED'}")
    return ok


def main() -> int:
    torch.manual_seed(0)
    failures = 0
    for backend in backends():
        os.environ["DOTS1_EXT_GEMM_INT4_BACKEND"], _, os.environ["DOTS1_EXT_GEMM_INT4_TILE"] = backend.partition(" ")
        grid = ([(7, 16, 128, 256)] if small() else
                [(1, 16, 128, 256), (7, 16, 256, 128), (100, 16, 128, 1408), (100, 4, 2816 // 8, 512)])
        for T, E, N, K in grid:
            for epilogue in ("none", "swiglu_interleaved"):
                for symmetric in ((False,) if small() else (False, True)):
                    name = f"{backend} T={T} E={E} N={N} K={K} {epilogue} {'sym' if symmetric else 'asym'}"
                    failures += not case(name, T, E, N, K, epilogue, symmetric)
        if not small():
            q = quant.quantize_int4(torch.randn(4, 64, 128, device="cuda"))
            x = torch.randn(16, 128, device="cuda", dtype=torch.bfloat16)
            for garbage in ([5, -7, 100, 3, 2**30], [0, 9, 2, 7, 17]):
                off = torch.tensor(garbage, dtype=torch.int32, device="cuda")
                for epilogue in ("none", "swiglu_interleaved"):
                    grouped_gemm_int4(x, q.qweight, q.scales, q.zeros, off, epilogue)  # values unspecified
    torch.cuda.synchronize()
    print("ok" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
