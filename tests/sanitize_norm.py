"""Runs every CUDA kernel path of the norm family once on small shapes, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck  python tests/sanitize_norm.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck python tests/sanitize_norm.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck python tests/sanitize_norm.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool synccheck python tests/sanitize_norm.py

(Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an access past
a tensor's end.) Paths: row kernels with 1/2/4/8 vectors per thread and the generic row kernel
(H not a multiple of the vector, H past the register limit, misaligned rows); QK kernels for head_dim
64/128/256 (16-byte path) and 96 / misaligned views (generic path), with and without the KV cache,
with bad positions and cache rows (the poison policy: NaN where the reference has NaN). Exits non-zero
if an output disagrees with the reference, so it doubles as a quick smoke test.

``--small`` (or DOTS1_SANITIZE_SMALL=1, which bench/gpu_check.sh sets for racecheck / synccheck, whose
cost grows with the CTAs launched: the full set did not finish in 45 s under racecheck) keeps one case per
kernel variant: bf16 (and fp32 weights), no thousand-row grids, head_dim 128 and 96.
"""

from __future__ import annotations

import os
import sys

import torch

from dots1_ext import reference
from dots1_ext.ops import norm as N
from dots1_ext.rope import build_cos_sin_cache

EPS = 1e-5
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
failures: list[str] = []


def check(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    out64, ref64 = out.double(), ref.double()
    err = float("inf") if not torch.isfinite(out64).all() else ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()
    if err >= TOL[dtype]:
        failures.append(f"{name}: relative error {err:.3e}")


def rows_paths(dtype: torch.dtype, small: bool) -> None:
    shapes = ((1, 8), (3, 4096), (2000, 4096), (1, 16384), (1500, 16384), (3, 100), (2, 20000), (5, 4104))
    w_dtypes = (dtype, torch.float32, torch.bfloat16 if dtype == torch.float16 else torch.float16)
    if small:
        shapes, w_dtypes = tuple(s for s in shapes if s[0] < 100), (dtype, torch.float32)
    for rows, H in shapes:
        for w_dtype in w_dtypes:
            x = torch.randn(rows, H, dtype=dtype, device="cuda")
            w = torch.randn(H, device="cuda").to(w_dtype)
            check(f"rms_norm {dtype} {rows}x{H} w={w_dtype}", N.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS), dtype)
            res = torch.randn_like(x)
            x_ref, res_ref = x.clone(), res.clone()
            reference.add_rms_norm_(x_ref, res_ref, w, EPS)
            N.add_rms_norm_(x, res, w, EPS)
            check(f"add_rms_norm_ {dtype} {rows}x{H} w={w_dtype}", x, x_ref, dtype)
    # Misaligned rows: a column slice starting one element in.
    buf = torch.randn(7, 4097, dtype=dtype, device="cuda")
    x = buf[:, 1:]
    w = torch.randn(4096, dtype=dtype, device="cuda")
    check(f"rms_norm {dtype} misaligned", N.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS), dtype)
    res = torch.randn(7, 4096, dtype=dtype, device="cuda")
    x_ref, res_ref = x.clone(), res.clone()
    reference.add_rms_norm_(x_ref, res_ref, w, EPS)
    N.add_rms_norm_(x, res, w, EPS)
    check(f"add_rms_norm_ {dtype} misaligned", x, x_ref, dtype)


def qk_paths(dtype: torch.dtype, small: bool) -> None:
    T, Hq, Hk, P, cache_len = 37, 5, 3, 64, 40
    for D in (128, 96) if small else (64, 128, 256, 96):
        cos_sin = build_cos_sin_cache(D, P, 1e7, device="cuda")
        for shift in (0, 1):
            for with_cache in (False, True):
                buf = torch.randn(T, (Hq + 2 * Hk) * D + shift, dtype=dtype, device="cuda")
                body = buf[:, shift:]
                q = body[:, : Hq * D].view(T, Hq, D)
                k = body[:, Hq * D : (Hq + Hk) * D].view(T, Hk, D)
                v = body[:, (Hq + Hk) * D :].view(T, Hk, D)
                qw, kw = torch.randn(D, dtype=dtype, device="cuda"), torch.randn(D, device="cuda")
                positions = torch.randint(0, P, (T,), device="cuda")
                positions[3], positions[10] = P, -7  # bad positions: poisoned tokens (NaN q and k)
                name = f"qk {dtype} D={D} shift={shift} cache={with_cache}"
                q_r, k_r = q.clone(), k.clone()  # the reference on copies, same poison policy
                if with_cache:
                    k_cache = torch.randn(cache_len, Hk, D, dtype=dtype, device="cuda")
                    v_cache = torch.randn_like(k_cache)
                    cache_rows = torch.arange(T, device="cuda") % cache_len
                    cache_rows[5], cache_rows[6] = cache_len, -1  # bad rows: no cache write, NaN q
                    kc_r, vc_r = k_cache.clone(), v_cache.clone()
                    reference.qk_norm_rope_kv_cache_(q_r, k_r, v, qw, kw, positions, cos_sin, EPS, kc_r, vc_r,
                                                     cache_rows)
                    N.qk_norm_rope_kv_cache_(q, k, v, qw, kw, positions, cos_sin, EPS, k_cache, v_cache, cache_rows)
                    pairs = ((q, q_r, "q"), (k, k_r, "k"), (k_cache, kc_r, "k_cache"), (v_cache, vc_r, "v_cache"))
                else:
                    reference.qk_norm_rope_(q_r, k_r, qw, kw, positions, cos_sin, EPS)
                    N.qk_norm_rope_(q, k, qw, kw, positions, cos_sin, EPS)
                    pairs = ((q, q_r, "q"), (k, k_r, "k"))
                for got, want, what in pairs:
                    nan_got, nan_want = torch.isnan(got), torch.isnan(want)
                    if not torch.equal(nan_got, nan_want):
                        failures.append(f"{name} {what}: NaN (poison) pattern differs from the reference")
                    keep = ~nan_want.flatten(1).any(1) if got.dim() > 1 else ~nan_want
                    check(f"{name} {what}", got[keep], want[keep], dtype)


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_norm: needs a CUDA GPU")
        return 2
    small = "--small" in sys.argv or os.environ.get("DOTS1_SANITIZE_SMALL") == "1"
    for dtype in (torch.bfloat16,) if small else (torch.float32, torch.float16, torch.bfloat16):
        rows_paths(dtype, small)
        qk_paths(dtype, small)
    torch.cuda.synchronize()
    for f in failures:
        print("MISMATCH", f)
    print("sanitize_norm:", "small set" if small else "full set", "ok" if not failures else f"{len(failures)} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
