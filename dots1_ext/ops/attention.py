"""Decode attention: one query per sequence over a static KV cache (split-KV, GQA without copies).

Kernels: csrc/attention/. Reference: dots1_ext.reference.decode_attention.

Shapes: q [B, Hq, D] (any batch and head strides, contiguous last dim: typically the first Hq heads of
a fused qkv activation viewed as [B, Hq + 2 Hk, D]); k_cache, v_cache [B, S, Hk, D] contiguous, q's
dtype; kv_start, kv_end [B] int64 on q's device (any stride, e.g. an expanded scalar). Hq must be a
multiple of Hk: query head h reads kv head h // (Hq // Hk). D even, at most 256 (64/128/256 are the
fast sizes). Returns out [B, Hq, D], contiguous, q's dtype.

Sequence b attends to cache slots [lo, kv_end[b]) with lo = kv_start[b] (left padding), or with
``window > 0`` lo = max(kv_start[b], kv_end[b] - window): the query sits at slot kv_end[b] - 1 and
sees the keys in (p - window, p], as transformers' sliding window. Scores are q.k * scale; softmax
and the weighted sum of V run in fp32 with a running max, and the result is rounded once.

Bounds live on the device, so the op never synchronises and one CUDA graph serves every length:
an empty range gives exactly 0 (flash-attention's convention); bad bounds (kv_start < 0, kv_end > S,
kv_start > kv_end) give NaN in every output element of that sequence (poison policy) and read
nothing. ``check_bounds=True`` raises IndexError for them on the host instead (a synchronisation).

CUDA: one CTA per (sequence, kv head, up to 8 of its query heads, KV split) reads each K/V byte once
for all those query heads. The split count depends on B, the heads, the SM count and S only; each
split takes ceil(length / splits) keys from the device length. The splits write their partial
softmax states to an fp32 workspace (from the caching allocator) and the last split of each (sequence,
kv head) to arrive on a device counter combines them in split order (one launch;
DOTS1_EXT_ATTENTION_COMBINE=workspace leaves that to a second kernel, as launches of more than 4096
(sequence, kv head) units always do); DOTS1_EXT_ATTENTION_COMBINE=cluster combines them instead inside a
thread-block cluster (sm_90; one launch, but slower at batch 1: 0.77 vs 0.94 of bandwidth at context
32768 on the H200).
Either way the results are deterministic (bitwise equal across runs and between graph replay and
eager) and the same bits for the same split count; pre-Hopper GPUs run one split in the cluster mode.
DOTS1_EXT_ATTENTION_SPLITS=n forces the split count (tests, tuning). On sm_90 the kernel is launched
with programmatic dependent launch (its launch overlaps the previous kernel's tail; it reads nothing
before that kernel completed, unless the caller passes ``kv_settled=True``: then the bounds and the
first tiles of K/V, but not the new row, are read early), as are the other decode-step kernels;
DOTS1_EXT_PDL=0 turns it off (docs/design.md §3, csrc/pdl.cuh).

``qk_norm_rope_decode_attention``: the decode step's ``qk_norm_rope_kv_cache_`` (per-head RMSNorm + RoPE
of the raw q and k, k and v written to the cache) then ``decode_attention``, in one launch on CUDA and
with the same bits (out and the cache rows). q and k are not written. The new key of sequence b must go
to its own slot kv_end[b] - 1 (cache_rows[b] == b * S + kv_end[b] - 1, as the model's decode steps
have it); any other cache row is treated as a bad one (nothing written, NaN output: the norm ops'
poison policy). Shapes the fused kernel does not take (Hq / Hk > 8, head_dim other than 64/128/256,
weights not in q's dtype, unaligned views) run the two ops. ``Dots1Attention`` uses it in decode steps
when DOTS1_EXT_ATTENTION_FUSED_QK=1 (read per call; default 0).
"""

from __future__ import annotations

import os

import math

import torch

from dots1_ext import reference
from dots1_ext.ops import _checks as C
from dots1_ext.ops._lib import fill_with_reference, op
from dots1_ext.ops.norm import check_caches_apart, check_norm_rope_params

# csrc/attention/attention.h kAttentionMaxHeadDim: the largest head_dim the kernels take.
MAX_HEAD_DIM = 256


def _check_decode_attention(q, k_cache, v_cache, kv_start, kv_end, window, scale, kv_settled=False):
    C.check_dtype(q, "q", C.FLOAT_DTYPES)
    C.check_shape(q, "q", (None, None, None))
    B, Hq, D = q.shape
    if D <= 0 or D % 2 or D > MAX_HEAD_DIM:
        raise ValueError(f"dots1_ext: head_dim (q.shape[2]) must be positive, even and at most {MAX_HEAD_DIM}, got {D}")
    C.check_last_dim_contiguous(q, "q")
    C.check_dtype(k_cache, "k_cache", (q.dtype,))
    C.check_shape(k_cache, "k_cache", (B, None, None, D))
    Hk = k_cache.shape[2]
    if Hk <= 0 or Hq % Hk:
        raise ValueError(f"dots1_ext: the query heads (q.shape[1] = {Hq}) must be a multiple of the kv heads "
                         f"(k_cache.shape[2] = {Hk})")
    C.check_dtype(v_cache, "v_cache", (q.dtype,))
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"dots1_ext: v_cache must have k_cache's shape {list(k_cache.shape)}, got {list(v_cache.shape)}")
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        if not t.is_contiguous():
            raise ValueError(f"dots1_ext: {name} must be contiguous")
    for t, name in ((kv_start, "kv_start"), (kv_end, "kv_end")):
        C.check_dtype(t, name, (torch.int64,))
        C.check_shape(t, name, (B,))
    if window < 0:
        raise ValueError(f"dots1_ext: window must be >= 0 (0 = no window), got {window}")
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache"), (kv_start, "kv_start"), (kv_end, "kv_end")):
        C.check_same_device(t, name, q, "q")


fill_with_reference("decode_attention", reference.decode_attention, _check_decode_attention)


@torch.library.register_fake("dots1_ext::decode_attention")
def _decode_attention_fake(q, k_cache, v_cache, kv_start, kv_end, window, scale, kv_settled=False):
    _check_decode_attention(q, k_cache, v_cache, kv_start, kv_end, window, scale)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)  # the kernels return a contiguous tensor


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    window: int = 0,
    scale: float | None = None,
    check_bounds: bool = False,
    kv_settled: bool = False,
) -> torch.Tensor:
    """softmax(q . K^T * scale) @ V per sequence over its cache slots. q [B, Hq, D]; k_cache, v_cache
    [B, S, Hk, D]; kv_start, kv_end [B] int64 (device) -> [B, Hq, D] in q's dtype. Slots [kv_start[b],
    kv_end[b]), the last ``window`` of them when window > 0. ``scale`` defaults to 1 / sqrt(D). An
    empty range gives 0; bad bounds give NaN rows unless ``check_bounds`` (IndexError, host sync).

    ``kv_settled=True`` promises that kv_start, kv_end and every cache row except slot kv_end[b] - 1 of
    each sequence were written before the CUDA launch right before this op (as in a decode step: the
    bounds at the step's start, the rows by earlier steps, and the new row by qk_norm_rope_kv_cache_,
    the launch right before). The kernel then reads the bounds and starts copying its first K/V tiles
    before it waits for that launch (PDL, csrc/pdl.cuh): the same result, sooner. Never pass it when the
    launch right before wrote the bounds or other rows: the kernel would read them too early."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if check_bounds and kv_start.numel():
        S = k_cache.shape[1]
        C.check_index_range(kv_start, "kv_start", S + 1, "slots of the cache, end included")
        C.check_index_range(kv_end, "kv_end", S + 1, "slots of the cache, end included")
        if bool((kv_start > kv_end).any()):
            raise IndexError("dots1_ext: kv_start must not exceed kv_end")
    if not isinstance(kv_settled, bool):
        raise TypeError(f"dots1_ext: kv_settled must be a bool, got {type(kv_settled).__name__}")
    return op("decode_attention")(q, k_cache, v_cache, kv_start, kv_end, int(window), float(scale), kv_settled)


def _check_qk_norm_rope_decode_attention(q, k, v, q_weight, k_weight, positions, cos_sin_cache, eps, k_cache,
                                         v_cache, cache_rows, kv_start, kv_end, window, scale, kv_settled=False):
    C.check_eps(eps)
    _check_decode_attention(q, k_cache, v_cache, kv_start, kv_end, window, scale)
    B, _, D = q.shape
    Hk = k_cache.shape[2]
    for t, name in ((k, "k"), (v, "v")):
        C.check_dtype(t, name, (q.dtype,))
        C.check_shape(t, name, (B, Hk, D))
        C.check_last_dim_contiguous(t, name)
    check_norm_rope_params(q_weight, k_weight, positions, cos_sin_cache, B, D)
    C.check_dtype(cache_rows, "cache_rows", (torch.int64,))
    C.check_shape(cache_rows, "cache_rows", (B,))
    for t, name in ((k, "k"), (v, "v"), (q_weight, "q_weight"), (k_weight, "k_weight"), (positions, "positions"),
                    (cos_sin_cache, "cos_sin_cache"), (cache_rows, "cache_rows")):
        C.check_same_device(t, name, q, "q")


def _check_qk_norm_rope_decode_attention_memory(q, k, v, q_weight, k_weight, positions, cos_sin_cache, eps, k_cache,
                                                v_cache, cache_rows, kv_start, kv_end, window, scale,
                                                kv_settled=False):
    """The overlap checks of csrc/attention/attention.cpp on real tensors (the fakes have no storage)."""
    _check_qk_norm_rope_decode_attention(q, k, v, q_weight, k_weight, positions, cos_sin_cache, eps, k_cache,
                                         v_cache, cache_rows, kv_start, kv_end, window, scale)
    check_caches_apart(k_cache, v_cache, q, k, v)


fill_with_reference("qk_norm_rope_decode_attention", reference.qk_norm_rope_decode_attention,
                    _check_qk_norm_rope_decode_attention_memory)


@torch.library.register_fake("dots1_ext::qk_norm_rope_decode_attention")
def _qk_norm_rope_decode_attention_fake(q, k, v, q_weight, k_weight, positions, cos_sin_cache, eps, k_cache, v_cache,
                                        cache_rows, kv_start, kv_end, window, scale, kv_settled=False):
    _check_qk_norm_rope_decode_attention(q, k, v, q_weight, k_weight, positions, cos_sin_cache, eps, k_cache,
                                         v_cache, cache_rows, kv_start, kv_end, window, scale)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def qk_norm_rope_decode_attention(
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
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    window: int = 0,
    scale: float | None = None,
    kv_settled: bool = False,
) -> torch.Tensor:
    """``qk_norm_rope_kv_cache_(q, k, v, ...)`` then ``decode_attention(q, k_cache, v_cache, kv_start,
    kv_end, window, scale)`` as one op (one launch on CUDA), with the same results and cache writes;
    q and k are left as they are. q [B, Hq, D], k, v [B, Hk, D] (strided views of a qkv activation are
    fine); k_cache, v_cache [B, S, Hk, D]; positions, cache_rows, kv_start, kv_end [B] int64. cache_rows[b]
    must be b * S + kv_end[b] - 1 (else poison: NaN output, nothing written). ``scale`` defaults to
    1 / sqrt(D). ``kv_settled=True``: as ``decode_attention``'s, for kv_start, kv_end, positions,
    cache_rows and every cache row but slot kv_end[b] - 1 (in a decode step the launch right before is
    the qkv projection, which writes q, k and v only)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if not isinstance(kv_settled, bool):
        raise TypeError(f"dots1_ext: kv_settled must be a bool, got {type(kv_settled).__name__}")
    return op("qk_norm_rope_decode_attention")(q, k, v, q_weight, k_weight, positions, cos_sin_cache, float(eps),
                                               k_cache, v_cache, cache_rows, kv_start, kv_end, int(window),
                                               float(scale), kv_settled)


FUSED_QK_ENV = "DOTS1_EXT_ATTENTION_FUSED_QK"


def fused_qk_enabled() -> bool:
    """DOTS1_EXT_ATTENTION_FUSED_QK (read per call): 1 = decode steps run qk_norm_rope_decode_attention,
    0 (default; also unset or empty) = qk_norm_rope_kv_cache_ then decode_attention. Anything else raises
    ValueError."""
    value = os.environ.get(FUSED_QK_ENV) or "0"
    if value not in ("0", "1"):
        raise ValueError(f"dots1_ext: {FUSED_QK_ENV} must be 0 or 1, got {value!r}")
    return value == "1"

