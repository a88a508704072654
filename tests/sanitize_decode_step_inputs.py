"""Runs every CUDA kernel path of decode_step_inputs once on small shapes, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python tests/sanitize_decode_step_inputs.py

(Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an access past a
tensor's end.) Paths: the 16-byte row copy and the element copy (odd hidden size, a misaligned row
stride) in fp32 / fp16 / bf16; bad token ids (NaN rows); slots inside the cache, outside it and past
cache_filled (cache row and kv_end -1, cache_filled unchanged), and usable ones that set it. Exits
non-zero if an output or cache_filled disagrees with the reference, so it doubles as a smoke test.
``--small`` (or DOTS1_SANITIZE_SMALL=1) keeps one batch size per path.
"""

from __future__ import annotations

import os
import sys

import torch

from dots1_ext import reference
from dots1_ext.ops import decode_step_inputs

failures: list[str] = []


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point():
        return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    return torch.equal(a, b)


def run_case(B: int, V: int, H: int, row_stride: int, dtype: torch.dtype, slot: int, filled: int, S: int) -> None:
    weight = torch.randn(V, row_stride, dtype=dtype, device="cuda")[:, :H]
    tokens = torch.randint(-2, V + 2, (B,), device="cuda")  # some ids outside [0, V): NaN rows
    slot_t = torch.tensor([slot], device="cuda")
    cache_start = torch.randint(0, S, (B,), device="cuda")
    got_filled = torch.tensor([filled], device="cuda")
    want_filled = got_filled.clone()
    got = decode_step_inputs(tokens, slot_t, cache_start, weight, S, got_filled)
    want = reference.decode_step_inputs(tokens, slot_t, cache_start, weight, S, want_filled)
    torch.cuda.synchronize()
    name = f"B={B} V={V} H={H} stride={row_stride} {dtype} slot={slot} filled={filled} S={S}"
    for out, ref, what in zip(got, want, ("x", "positions", "cache_rows", "kv_end")):
        if not same(out, ref):
            failures.append(f"{name}: {what} differs from the reference")
    if int(got_filled) != int(want_filled):
        failures.append(f"{name}: cache_filled {int(got_filled)}, reference {int(want_filled)}")


def main() -> int:
    small = "--small" in sys.argv or os.environ.get("DOTS1_SANITIZE_SMALL") == "1"
    torch.manual_seed(0)
    S = 32
    batches = [3] if small else [1, 3, 65]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for H, row_stride in ((64, 64), (37, 37), (64, 65)):  # 16-byte path, element paths
            for B in batches:
                for slot, filled in ((5, 5), (5, 9), (5, 4), (-1, 9), (S, S), (S - 1, S - 1)):
                    run_case(B, 50, H, row_stride, dtype, slot, filled, S)
    for f in failures:
        print("FAIL", f)
    print(f"sanitize_decode_step_inputs: {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
