"""Argument checks shared by the Python wrappers, the fake kernels and the reference fallbacks.

They mirror the C++ checks of csrc/<family>/<family>.cpp so an error reads the same whether it is
raised while tracing (fake kernels), on a reference fallback, or by a compiled kernel. Messages name
the argument and the expectation. None of them reads tensor data (no host synchronisation).
"""

from __future__ import annotations

import math

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_dtype(t: torch.Tensor, name: str, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"dots1_ext: {name} must have dtype {_names(allowed)}, got {str(t.dtype).replace('torch.', '')}")


def check_eps(eps: float) -> None:
    """A norm's epsilon: finite and >= 0 (a negative or infinite one turns every row into plausible numbers)."""
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"dots1_ext: eps must be finite and >= 0, got {eps}")


def check_shape(t: torch.Tensor, name: str, expected: Sequence[int | None]) -> None:
    """``expected`` entries of None match any size."""
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"dots1_ext: {name} must have shape {want}, got {list(t.shape)}")


def check_same_device(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"dots1_ext: {name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def check_last_dim_contiguous(t: torch.Tensor, name: str) -> None:
    if t.dim() > 0 and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"dots1_ext: {name} must have a contiguous last dimension, got strides {tuple(t.stride())}")


def check_positive(value: int, name: str) -> None:
    if value <= 0:
        raise ValueError(f"dots1_ext: {name} must be positive, got {value}")


def check_index_range(index: torch.Tensor, name: str, upper: int, what: str) -> None:
    """Host-side range check of an index tensor (reads data: synchronises; wrappers call it only when asked)."""
    if index.numel() == 0:
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= upper:
        raise IndexError(f"dots1_ext: {name} must be in [0, {upper}) ({what}), got values in [{lo}, {hi}]")


# ---- Memory overlap (mirrors csrc/common.h; for the reference fallbacks, which run on real tensors) ----


def _overlap_self(t: torch.Tensor) -> str:
    """'no', 'yes' or 'maybe': whether t's elements share memory (stride-0 dims, or strides that do not
    step past the inner dims' extent)."""
    if t.numel() <= 1:
        return "no"
    dims = sorted((abs(st), sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    extent = 1
    for stride, size in dims:
        if stride == 0:
            return "yes"
        if stride < extent:
            return "maybe"
        extent = stride * (size - 1) + extent
    return "no"


def _overlap_pair(a: torch.Tensor, b: torch.Tensor) -> str:
    """'no', 'yes' or 'maybe': whether a and b share an element (exact for last-dim-contiguous views
    with equal strides on at most two other dims; see csrc/common.h mutual_overlap)."""
    if a.numel() == 0 or b.numel() == 0:
        return "no"
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return "no"
    if a.element_size() != b.element_size() or a.dim() != b.dim() or a.dim() == 0:
        return "maybe"

    def span(t):
        lo = hi = t.storage_offset()
        for st, sz in zip(t.stride(), t.shape):
            reach = st * (sz - 1)
            lo, hi = (lo + reach, hi) if reach < 0 else (lo, hi + reach)
        return lo, hi

    (alo, ahi), (blo, bhi) = span(a), span(b)
    if ahi < blo or bhi < alo:
        return "no"
    Da, Db = a.shape[-1], b.shape[-1]
    if (Da > 1 and a.stride(-1) != 1) or (Db > 1 and b.stride(-1) != 1):
        return "maybe"
    dims = []
    for d in range(a.dim() - 1):
        sa, sb = a.shape[d], b.shape[d]
        if sa == 1 and sb == 1:
            continue
        if sa > 1 and sb > 1 and a.stride(d) != b.stride(d):
            return "maybe"
        dims.append((a.stride(d) if sa > 1 else b.stride(d), -(sb - 1), sa - 1))
    if len(dims) > 2:
        return "maybe"
    c = a.storage_offset() - b.storage_offset()

    def hits(v):
        return -Da < v < Db

    def solve(base, dim):
        stride, lo, hi = dim
        if stride == 0:
            return hits(base)
        n0 = (-base) // stride
        if any(lo <= n <= hi and hits(base + n * stride) for n in (n0 - 1, n0, n0 + 1)):
            return True
        return abs(stride) < max(Da, Db) and any(hits(base + n * stride) for n in range(lo, hi + 1))

    if not dims:
        return "yes" if hits(c) else "no"
    if len(dims) == 1:
        return "yes" if solve(c, dims[0]) else "no"
    outer, inner = sorted(dims, key=lambda d: d[2] - d[1])
    return "yes" if any(solve(c + n * outer[0], inner) for n in range(outer[1], outer[2] + 1)) else "no"


def check_no_internal_overlap(t: torch.Tensor, name: str) -> None:
    o = _overlap_self(t)
    if o == "yes":
        raise ValueError(f"dots1_ext: {name} is written in place but some of its elements share memory (an expanded "
                         f"or stride-0 view?), strides {tuple(t.stride())} for shape {list(t.shape)}")
    if o == "maybe":
        raise ValueError(f"dots1_ext: {name} is written in place and its layout (strides {tuple(t.stride())}) cannot "
                         "be proven free of self-overlap; pass a contiguous tensor")


def check_no_overlap(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    o = _overlap_pair(a, b)
    if o == "yes":
        raise ValueError(f"dots1_ext: {a_name} and {b_name} overlap in memory; this in-place op needs them disjoint")
    if o == "maybe":
        raise ValueError(f"dots1_ext: {a_name} and {b_name} share a storage in a layout that cannot be proven "
                         "disjoint; pass separate tensors")
