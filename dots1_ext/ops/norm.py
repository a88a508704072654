"""RMSNorm, fused add + RMSNorm, and fused per-head QK-RMSNorm + RoPE (optionally writing the KV cache).

Kernels: csrc/norm/. Reference: dots1_ext.reference.rms_norm / add_rms_norm_ / qk_norm_rope_ /
qk_norm_rope_kv_cache_. The cos/sin cache comes from dots1_ext.rope.build_cos_sin_cache.

Weights may have any float dtype (the math multiplies by ``weight.float()``; an fp32 weight with bf16
activations is read as fp32, not rounded). Any hidden size and head_dim (even) work; 16-byte aligned
rows with H a multiple of 8 (bf16/fp16) or 4 (fp32), and head_dim 64/128/256, take the fast kernels.

Poison policy for bad indices (every backend: CPU and CUDA kernels, reference): out-of-range
indices are never dereferenced, and cannot go unnoticed. A token whose position is outside [0, P)
gets NaN in all of its q and k heads (with the KV cache, its valid cache row receives that NaN k,
and v as given); a token whose cache row is outside the cache writes no cache row and gets NaN in all
of its q heads, so its attention output is NaN. ``check_positions=True`` raises IndexError on the
host instead (it reads the indices: a synchronisation on CUDA).

In-place arguments must not share memory: x with residual (add_rms_norm_), q with k, the caches with
each other or with q/k/v, or a tensor with itself (an expanded view). ValueError (naming them) before
anything is written.
"""

from __future__ import annotations

import torch

from dots1_ext import reference
from dots1_ext.ops import _checks as C
from dots1_ext.ops._lib import fill_with_reference, op


def _check_rms_norm(x, weight, eps):
    C.check_eps(eps)
    C.check_dtype(x, "x", C.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("dots1_ext: x must have at least one dimension")
    C.check_dtype(weight, "weight", C.FLOAT_DTYPES)
    C.check_shape(weight, "weight", (x.shape[-1],))
    C.check_same_device(weight, "weight", x, "x")


def _check_add_rms_norm(x, residual, weight, eps):
    _check_rms_norm(x, weight, eps)
    C.check_dtype(residual, "residual", (x.dtype,))
    C.check_shape(residual, "residual", tuple(x.shape))
    C.check_same_device(residual, "residual", x, "x")


def check_norm_rope_params(q_weight, k_weight, positions, cos_sin_cache, T: int, D: int) -> None:
    """The QK-norm + RoPE parameters of T tokens with head_dim D: q_weight, k_weight [D] (any float dtype),
    positions [T] int64, cos_sin_cache [P, D] fp32. Also qk_norm_rope_decode_attention's (ops/attention.py)."""
    for w, name in ((q_weight, "q_weight"), (k_weight, "k_weight")):
        C.check_dtype(w, name, C.FLOAT_DTYPES)
        C.check_shape(w, name, (D,))
    C.check_dtype(positions, "positions", (torch.int64,))
    C.check_shape(positions, "positions", (T,))
    C.check_dtype(cos_sin_cache, "cos_sin_cache", (torch.float32,))
    C.check_shape(cos_sin_cache, "cos_sin_cache", (None, D))


def check_caches_apart(k_cache, v_cache, q, k, v) -> None:
    """The caches written share no memory with each other nor with q, k, v (ValueError naming them). Also
    qk_norm_rope_decode_attention's."""
    C.check_no_overlap(k_cache, "k_cache", v_cache, "v_cache")
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        C.check_no_overlap(k_cache, "k_cache", t, name)
        C.check_no_overlap(v_cache, "v_cache", t, name)


def _check_qk_norm_rope(q, k, q_weight, k_weight, positions, cos_sin_cache, eps):
    C.check_eps(eps)
    C.check_dtype(q, "q", C.FLOAT_DTYPES)
    C.check_shape(q, "q", (None, None, None))
    T, _, D = q.shape
    C.check_dtype(k, "k", (q.dtype,))
    C.check_shape(k, "k", (T, None, D))
    if D <= 0 or D % 2:
        raise ValueError(f"dots1_ext: head_dim (q.shape[2]) must be positive and even for RoPE, got {D}")
    C.check_last_dim_contiguous(q, "q")
    C.check_last_dim_contiguous(k, "k")
    check_norm_rope_params(q_weight, k_weight, positions, cos_sin_cache, T, D)
    for t, name in ((k, "k"), (q_weight, "q_weight"), (k_weight, "k_weight"), (positions, "positions"),
                    (cos_sin_cache, "cos_sin_cache")):
        C.check_same_device(t, name, q, "q")


def _check_qk_norm_rope_kv_cache(q, k, v, q_weight, k_weight, positions, cos_sin_cache, eps, k_cache, v_cache,
                                 cache_rows):
    _check_qk_norm_rope(q, k, q_weight, k_weight, positions, cos_sin_cache, eps)
    T, Hk, D = k.shape
    C.check_dtype(v, "v", (q.dtype,))
    C.check_shape(v, "v", (T, Hk, D))
    C.check_last_dim_contiguous(v, "v")
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        C.check_dtype(t, name, (q.dtype,))
        if t.dim() < 3 or tuple(t.shape[-2:]) != (Hk, D):
            raise ValueError(f"dots1_ext: {name} must have shape [..., {Hk}, {D}], got {list(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"dots1_ext: {name} must be contiguous")
        C.check_same_device(t, name, q, "q")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"dots1_ext: v_cache must have k_cache's shape {list(k_cache.shape)}, got {list(v_cache.shape)}")
    C.check_dtype(cache_rows, "cache_rows", (torch.int64,))
    C.check_shape(cache_rows, "cache_rows", (T,))
    C.check_same_device(cache_rows, "cache_rows", q, "q")


def _check_add_rms_norm_memory(x, residual, weight, eps):
    """The in-place checks of csrc/norm/norm.cpp on real tensors (the fakes have no storage to compare)."""
    _check_add_rms_norm(x, residual, weight, eps)
    C.check_no_internal_overlap(x, "x")
    C.check_no_internal_overlap(residual, "residual")
    C.check_no_overlap(x, "x", residual, "residual")


def _check_qk_norm_rope_memory(q, k, q_weight, k_weight, positions, cos_sin_cache, eps):
    _check_qk_norm_rope(q, k, q_weight, k_weight, positions, cos_sin_cache, eps)
    C.check_no_internal_overlap(q, "q")
    C.check_no_internal_overlap(k, "k")
    C.check_no_overlap(q, "q", k, "k")


def _check_qk_norm_rope_kv_cache_memory(q, k, v, q_weight, k_weight, positions, cos_sin_cache, eps, k_cache,
                                        v_cache, cache_rows):
    _check_qk_norm_rope_kv_cache(q, k, v, q_weight, k_weight, positions, cos_sin_cache, eps, k_cache, v_cache,
                                 cache_rows)
    _check_qk_norm_rope_memory(q, k, q_weight, k_weight, positions, cos_sin_cache, eps)
    check_caches_apart(k_cache, v_cache, q, k, v)
    C.check_no_overlap(q, "q", v, "v")
    C.check_no_overlap(k, "k", v, "v")


fill_with_reference("rms_norm", reference.rms_norm, _check_rms_norm)
fill_with_reference("add_rms_norm_", reference.add_rms_norm_, _check_add_rms_norm_memory)
fill_with_reference("qk_norm_rope_", reference.qk_norm_rope_, _check_qk_norm_rope_memory)
fill_with_reference("qk_norm_rope_kv_cache_", reference.qk_norm_rope_kv_cache_, _check_qk_norm_rope_kv_cache_memory)


@torch.library.register_fake("dots1_ext::rms_norm")
def _rms_norm_fake(x, weight, eps):
    _check_rms_norm(x, weight, eps)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)  # the kernels return a contiguous tensor


@torch.library.register_fake("dots1_ext::add_rms_norm_")
def _add_rms_norm_fake(x, residual, weight, eps):
    _check_add_rms_norm(x, residual, weight, eps)


@torch.library.register_fake("dots1_ext::qk_norm_rope_")
def _qk_norm_rope_fake(q, k, q_weight, k_weight, positions, cos_sin_cache, eps):
    _check_qk_norm_rope(q, k, q_weight, k_weight, positions, cos_sin_cache, eps)


@torch.library.register_fake("dots1_ext::qk_norm_rope_kv_cache_")
def _qk_norm_rope_kv_cache_fake(q, k, v, q_weight, k_weight, positions, cos_sin_cache, eps, k_cache, v_cache,
                                cache_rows):
    _check_qk_norm_rope_kv_cache(q, k, v, q_weight, k_weight, positions, cos_sin_cache, eps, k_cache, v_cache,
                                 cache_rows)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Dots1RMSNorm over the last dim. x [..., H]; weight [H]. Returns a new tensor like x:
    normalised in fp32, cast to x's dtype, then times the weight."""
    return op("rms_norm")(x, weight, float(eps))


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In place: ``residual += x``; ``x = rms_norm(residual, weight)``. x, residual [..., H]. Returns x.
    x and residual must not share memory, with each other or within themselves (an expanded x):
    ValueError before anything is written."""
    op("add_rms_norm_")(x, residual, weight, float(eps))
    return x


def qk_norm_rope_(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    eps: float,
    check_positions: bool = False,
) -> None:
    """In place: per-head RMSNorm of q [T, Hq, D] and k [T, Hk, D] (weights [D]), then neox RoPE at
    ``positions`` [T] int64 from ``cos_sin_cache`` [P, D] fp32. q and k may be strided views (e.g. of
    a fused QKV output) with a contiguous last dim, but must not share memory (ValueError). Tokens at
    positions outside [0, P) get NaN q and k rows (poison policy); ``check_positions`` raises
    IndexError for them instead (on the host: a synchronisation on CUDA)."""
    if check_positions:
        C.check_index_range(positions, "positions", cos_sin_cache.shape[0], "rows of cos_sin_cache")
    op("qk_norm_rope_")(q, k, q_weight, k_weight, positions, cos_sin_cache, float(eps))


def qk_norm_rope_kv_cache_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_rows: torch.Tensor,
    check_positions: bool = False,
) -> None:
    """``qk_norm_rope_`` then k, v [T, Hk, D] written to ``k_cache``/``v_cache`` ([..., Hk, D],
    contiguous) at flat rows ``cache_rows`` [T] int64 of ``cache.view(-1, Hk, D)``, in the same launch.
    A token whose row is outside the cache writes nothing there and gets NaN q rows (poison policy:
    its attention output is NaN); ``check_positions`` raises IndexError for such rows too. Rows must
    be distinct: tokens writing one row race on CUDA (which one lands is unspecified; the model's rows
    b * S + slot are distinct by construction); ``check_positions`` raises ValueError for duplicates."""
    if check_positions:
        C.check_index_range(positions, "positions", cos_sin_cache.shape[0], "rows of cos_sin_cache")
        row_numel = max(1, k.shape[1] * k.shape[2])
        C.check_index_range(cache_rows, "cache_rows", k_cache.numel() // row_numel, "rows of k_cache.view(-1, Hk, D)")
        if torch.unique(cache_rows).numel() != cache_rows.numel():
            raise ValueError("dots1_ext: cache_rows holds duplicate rows (two tokens would race for one cache row)")
    op("qk_norm_rope_kv_cache_")(q, k, v, q_weight, k_weight, positions, cos_sin_cache, float(eps), k_cache, v_cache,
                                 cache_rows)
