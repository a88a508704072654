"""Small CUDA cases of grouped_gemm, every backend, for compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 9 python tests/sanitize_grouped_gemm.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python tests/sanitize_grouped_gemm.py
    compute-sanitizer --tool synccheck --error-exitcode 9 python tests/sanitize_grouped_gemm.py

Zipf routing over 16 experts with empty experts and a tail of rows outside every expert, T in
{1, 7, 100}, every epilogue, the CUTLASS backend also under each forced tile configuration (the
CUTLASS kernels stage tiles in shared memory through TMA and warp-specialised pipelines:
racecheck/synccheck). Garbage offsets (decreasing, out of range) run
every backend once for memcheck: no access outside the tensors. Exits non-zero if a result differs
from the fp32 reference.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import rel_err  # noqa: E402
from test_grouped_gemm import cuda_backends, make_case, ref_fp32, routing_counts  # noqa: E402

from dots1_ext.ops import grouped_gemm  # noqa: E402


def main() -> int:
    torch.manual_seed(0)
    failures = 0
    # The CUTLASS backend also once per forced tile configuration.
    runs = [(name, "auto") for name in cuda_backends()]
    if "cutlass" in cuda_backends():
        runs += [("cutlass", c) for c in ("coop", "pingpong")]
    for name, config in runs:
        os.environ["DOTS1_EXT_GEMM_BACKEND"] = name
        os.environ["DOTS1_EXT_GEMM_SM90_CONFIG"] = config
        for T in (1, 7, 100):
            for epilogue in ("none", "swiglu", "swiglu_interleaved"):
                x, w, off = make_case(routing_counts("zipf", T, 6, 16), 16, 128, 256, torch.bfloat16, "cuda", tail=2)
                out = grouped_gemm(x, w, off, epilogue)
                err = rel_err(out, ref_fp32(x, w, off, epilogue))
                print(f"{name:8s} {config:11s} T={T:4d} {epilogue:18s} rel_err={err:.2e}")
                failures += not err < 1e-2
        x, w, off = make_case([4, 4, 4, 4], 4, 64, 64, torch.bfloat16, "cuda")
        for garbage in ([5, -7, 100, 3, 2**30], [0, 9, 2, 7, 17]):
            off.copy_(torch.tensor(garbage, dtype=torch.int32))
            for epilogue in ("none", "swiglu", "swiglu_interleaved"):
                grouped_gemm(x, w, off, epilogue)  # values unspecified; memcheck: in bounds
    torch.cuda.synchronize()
    print("ok" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
