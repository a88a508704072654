"""Runs every CUDA kernel path of the decode attention family once on small shapes, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck  python tests/sanitize_attention.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck python tests/sanitize_attention.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck python tests/sanitize_attention.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool synccheck python tests/sanitize_attention.py

(Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees a read past a
cache's end.) Paths: fp32/fp16/bf16; head_dim 64/128/256 (16-byte copies), 96 (padded) and 34 (padded,
4-byte copies), a 16-bit cache at an odd element offset; 1, 2, 4 and 8 query heads per CTA (GQA 1, 2,
3, 4, 8 and 12 = two head chunks); 1, 2, 4, 8 and 16 splits in the combine modes (the workspace's
last-arriving split, the default, with its device counters; the workspace's second kernel; the
thread-block cluster's); both K/V pipeline depths
(DOTS1_EXT_ATTENTION_STAGES 6 and 3); ranges that end exactly at
the cache's end, windows, empty ranges and bad bounds (which must read nothing and give NaN). Exits
non-zero if an output disagrees with the reference, so it doubles as a quick smoke test.

qk_norm_rope_decode_attention (the fused decode step: norm + rope of q and k, the new cache row written
by the one CTA that owns it) runs on the same shapes and split counts, compared bitwise (output and
both caches) with qk_norm_rope_kv_cache_ + decode_attention, with a bad position and a bad cache row
mixed in; its two-op fallback (head_dim 96, two head chunks) too. racecheck is the check that matters
for it: the new row is written and read within one CTA, and must be read by no other. Both ops also
with kv_settled (the first K/V copies issued before the PDL wait, the new row's after it).

DOTS1_SANITIZE_SMALL=1 (what bench/gpu_check.sh sets for racecheck and synccheck, whose per-launch cost
is far above memcheck's) keeps one case per kernel structure: bf16, one, two and several query heads
per CTA, two head chunks, 1 / 2 / 8 / 16 splits.
"""

from __future__ import annotations

import math
import os
import sys

import torch

from dots1_ext import reference
from dots1_ext.ops import attention as A

# Per-row bound (max error / row max) against the fp32 reference rounded to the dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}
failures: list[str] = []


def check(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    ref = ref.to(dtype).double().reshape(-1, ref.shape[-1])
    got = out.double().reshape(-1, out.shape[-1])
    if not torch.equal(torch.isnan(got), torch.isnan(ref)):
        failures.append(f"{name}: NaN (poison) pattern differs from the reference")
        return
    got, ref = got.nan_to_num(0.0), ref.nan_to_num(0.0)
    if not torch.isfinite(got).all():
        failures.append(f"{name}: non-finite values")
        return
    err = ((got - ref).abs().amax(1) / ref.abs().amax(1).clamp_min(1e-30)).max().item() if got.numel() else 0.0
    if err > TOL[dtype]:
        failures.append(f"{name}: worst row error {err:.3e} > {TOL[dtype]:.1e}")


def run_case(dtype, B, Hq, Hk, D, S, pairs, window, cache_offset=0, q_layout="fused", settled=False):
    if q_layout == "fused":
        q = torch.randn(B, (Hq + 2 * Hk) * D, dtype=dtype, device="cuda").view(B, Hq + 2 * Hk, D)[:, :Hq]
    else:  # misaligned: one element in
        q = torch.randn(B, Hq * D + 1, dtype=dtype, device="cuda")[:, 1:].view(B, Hq, D)
    n = B * S * Hk * D
    k_buf = torch.randn(n + cache_offset, dtype=dtype, device="cuda")
    k_cache = k_buf[cache_offset:].view(B, S, Hk, D)
    v_cache = torch.randn(B, S, Hk, D, dtype=dtype, device="cuda")
    kv_start = torch.tensor([p[0] for p in pairs], device="cuda")
    kv_end = torch.tensor([p[1] for p in pairs], device="cuda")
    out = A.decode_attention(q, k_cache, v_cache, kv_start, kv_end, window=window, kv_settled=settled)
    ref = reference.decode_attention(q.float(), k_cache.float(), v_cache.float(), kv_start, kv_end, window,
                                     1.0 / math.sqrt(D))
    name = (f"{dtype} B={B} Hq={Hq} Hk={Hk} D={D} S={S} window={window} offset={cache_offset} q={q_layout} "
            f"settled={settled} "
            f"splits={os.environ.get('DOTS1_EXT_ATTENTION_SPLITS', 'auto')} "
            f"stages={os.environ.get('DOTS1_EXT_ATTENTION_STAGES', 'auto')} "
            f"combine={os.environ.get('DOTS1_EXT_ATTENTION_COMBINE', 'auto')}")
    check(name, out, ref, dtype)


def run_fused_case(dtype, B, Hq, Hk, D, S, pairs, window, settled=False):
    from dots1_ext import ops
    from dots1_ext.rope import build_cos_sin_cache

    qkv = torch.randn(B, (Hq + 2 * Hk) * D, dtype=dtype, device="cuda").view(B, Hq + 2 * Hk, D)
    q, k, v = qkv.split([Hq, Hk, Hk], dim=1)
    q_weight = 1.0 + 0.1 * torch.randn(D, dtype=dtype, device="cuda")
    k_weight = 1.0 + 0.1 * torch.randn(D, dtype=dtype, device="cuda")
    cos_sin = build_cos_sin_cache(D, S, 10000.0, None, torch.device("cuda"))
    k_cache = torch.randn(B, S, Hk, D, dtype=dtype, device="cuda")
    v_cache = torch.randn(B, S, Hk, D, dtype=dtype, device="cuda")
    kv_start = torch.tensor([p[0] for p in pairs], device="cuda")
    kv_end = torch.tensor([p[1] for p in pairs], device="cuda")
    positions = (kv_end - 1 - kv_start).clamp_min(0)
    cache_rows = torch.arange(B, device="cuda") * S + kv_end - 1
    if B > 2:
        positions[1] = -1  # bad position: NaN q and k
        cache_rows[2] = -1  # bad cache row: nothing written, NaN q
    kc, vc = k_cache.clone(), v_cache.clone()
    out = ops.qk_norm_rope_decode_attention(q, k, v, q_weight, k_weight, positions, cos_sin, 1e-6, kc, vc,
                                            cache_rows, kv_start, kv_end, window, kv_settled=settled)
    own = (kv_end >= 1) & (kv_end <= S) & (cache_rows == torch.arange(B, device="cuda") * S + kv_end - 1)
    rows = torch.where(own, cache_rows, torch.full_like(cache_rows, -1))
    q2, k2, rc, rv = q.clone(), k.clone(), k_cache.clone(), v_cache.clone()
    ops.qk_norm_rope_kv_cache_(q2, k2, v, q_weight, k_weight, positions, cos_sin, 1e-6, rc, rv, rows)
    # kv_settled: the launch right before (qk_norm_rope_kv_cache_) wrote only the new rows.
    ref = ops.decode_attention(q2, rc, rv, kv_start, kv_end, window, kv_settled=settled)
    name = (f"fused {dtype} B={B} Hq={Hq} Hk={Hk} D={D} S={S} window={window} settled={settled} "
            f"splits={os.environ.get('DOTS1_EXT_ATTENTION_SPLITS', 'auto')}")
    for what, got, want in (("output", out, ref), ("k_cache", kc, rc), ("v_cache", vc, rv)):
        same = torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(got.nan_to_num(0), want.nan_to_num(0))
        if not same:
            failures.append(f"{name}: {what} differs from qk_norm_rope_kv_cache_ + decode_attention")


def pairs_for(B, S):
    base = [(0, S), (-1, 4), (0, 0), (S - 1, S), (0, 1), (3, S - 2), (5, 2), (0, S + 1)]
    return [base[b % len(base)] if S > 5 else (0, S) for b in range(B)]


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_attention: needs a CUDA GPU")
        return 2
    shapes = [  # (B, Hq, Hk, D, S)
        (3, 4, 4, 128, 300),
        (2, 8, 4, 64, 200),  # 2 query heads per CTA
        (3, 6, 2, 96, 150),  # 3 -> 4 per CTA, padded head_dim
        (3, 8, 2, 256, 130),
        (2, 16, 2, 128, 90),  # 8 per CTA
        (2, 24, 2, 64, 70),  # 12: two head chunks
        (3, 4, 2, 34, 80),  # 4-byte copies
        (8, 2, 2, 128, 520),
    ]
    small = os.environ.get("DOTS1_SANITIZE_SMALL") == "1"
    split_counts = ("1", "2", "4", "8", "16", "auto")
    if small:
        shapes = [shapes[0], shapes[1], shapes[4], shapes[5]]
        split_counts = ("1", "2", "8", "16")
    # Both K/V pipeline depths (the automatic choice takes the deep one for these small grids, the
    # shallow one where the forced splits make too many CTAs): forced each way. One dtype for the
    # shallow pass: its stage indexing is the deep one's with another modulus.
    # (Small: the shallow depth at 1 and 8 splits only: its stage indexing is the deep one's with
    # another modulus, and racecheck pays per launch.)
    depth_cases = [(st, sp) for st in ("6", "3") for sp in split_counts
                   if not (small and st == "3" and sp in ("2", "16"))]
    for stages, splits in depth_cases:
        os.environ["DOTS1_EXT_ATTENTION_STAGES"] = stages
        os.environ["DOTS1_EXT_ATTENTION_SPLITS"] = splits
        # 2 and 4 splits take the same cluster code as 8: one dtype is enough there.
        dtypes = (torch.bfloat16,) if splits in ("2", "4", "16") or small or stages == "3" else (
            torch.float32, torch.float16, torch.bfloat16)
        for dtype in dtypes:
            for B, Hq, Hk, D, S in shapes:
                for window in (0, 33):
                    run_case(dtype, B, Hq, Hk, D, S, pairs_for(B, S), window)
                    if D >= 64:  # not head_dim 34: the 4-byte plain path only
                        run_fused_case(dtype, B, Hq, Hk, D, S, pairs_for(B, S), window)
            run_case(dtype, 2, 4, 2, 128, 64, [(0, 64), (10, 64)], 0, q_layout="misaligned")
            if dtype != torch.float32:
                run_case(dtype, 2, 4, 2, 128, 64, [(0, 64), (1, 63)], 0, cache_offset=1)  # odd element offset
                run_case(dtype, 2, 4, 2, 128, 64, [(0, 64), (1, 63)], 0, cache_offset=8)  # 16-byte aligned view
    os.environ.pop("DOTS1_EXT_ATTENTION_SPLITS")
    os.environ.pop("DOTS1_EXT_ATTENTION_STAGES")
    # The cluster combine (the splits of one head in a thread-block cluster; the default is the
    # workspace): both ops at every split count (small: 8, the largest portable cluster; every count
    # above 1 runs the same cluster code).
    os.environ["DOTS1_EXT_ATTENTION_COMBINE"] = "cluster"
    for splits in (("8",) if small else split_counts):
        os.environ["DOTS1_EXT_ATTENTION_SPLITS"] = splits
        for B, Hq, Hk, D, S in shapes:
            run_case(torch.bfloat16, B, Hq, Hk, D, S, pairs_for(B, S), 0)
            if D >= 64:
                run_fused_case(torch.bfloat16, B, Hq, Hk, D, S, pairs_for(B, S), 0)
    os.environ.pop("DOTS1_EXT_ATTENTION_SPLITS")
    os.environ.pop("DOTS1_EXT_ATTENTION_COMBINE")
    # Without programmatic dependent launch (the default launches with it on sm_90).
    os.environ["DOTS1_EXT_PDL"] = "0"
    for B, Hq, Hk, D, S in shapes:
        run_case(torch.bfloat16, B, Hq, Hk, D, S, pairs_for(B, S), 0)
        if D >= 64:
            run_fused_case(torch.bfloat16, B, Hq, Hk, D, S, pairs_for(B, S), 0)
    os.environ.pop("DOTS1_EXT_PDL")
    # kv_settled (the first tiles' copies before the PDL wait, the new row after it): both depths, the
    # workspace and cluster combines, lengths whose new row is in the early tiles and past them.
    for combine, stages, splits in (("last", "3", "4"), ("workspace", "3", "4"), ("workspace", "6", "1"),
                                    ("cluster", "6", "2")):
        os.environ.update(DOTS1_EXT_ATTENTION_COMBINE=combine, DOTS1_EXT_ATTENTION_STAGES=stages,
                          DOTS1_EXT_ATTENTION_SPLITS=splits)
        settled_pairs = [(0, 1), (0, 65), (3, 129), (0, 520), (0, 0), (-1, 4)]
        for B, Hq, Hk, D, S in ((6, 4, 4, 128, 520), (6, 8, 2, 64, 520)):
            run_case(torch.bfloat16, B, Hq, Hk, D, S, settled_pairs, 0, settled=True)
            run_fused_case(torch.bfloat16, B, Hq, Hk, D, S, settled_pairs, 0, settled=True)
        run_case(torch.bfloat16, 2, 4, 2, 128, 64, [(0, 64), (1, 63)], 0, cache_offset=1, settled=True)
    for name in ("DOTS1_EXT_ATTENTION_COMBINE", "DOTS1_EXT_ATTENTION_STAGES", "DOTS1_EXT_ATTENTION_SPLITS"):
        os.environ.pop(name)
    torch.cuda.synchronize()
    for f in failures:
        print("MISMATCH", f)
    print("sanitize_attention:", "ok" if not failures else f"{len(failures)} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
