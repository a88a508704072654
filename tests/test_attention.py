"""decode_attention against dots1_ext.reference (fp32) and against SDPA with the equivalent mask.

Covers fp32/bf16/fp16; B in {1, 3, 8} (and 0, and a batch past the grid's 65535 on the GPU); MHA and
GQA (Hq / Hk in {1, 4, 8}, 12 = two head chunks); head_dim 64/128/256 (fast), 96 (padded) and 34
(padded, 4-byte copies); lengths 1, short, not a multiple of any tile, the whole cache, mixed per
sequence, left padding (kv_start > 0), sliding windows smaller and larger than the length, empty
ranges (exactly 0), bad bounds (NaN rows), q as a slice of a fused qkv activation (aligned, misaligned,
head-padded), expanded bounds; on the GPU every split count, both K/V pipeline depths (same bits), CUDA
graph replay with changed device
lengths (bitwise equal to eager), determinism, every output element written; torch.compile and opcheck.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dots1_ext import reference
from dots1_ext.ops import attention as A
from tests.conftest import assert_rows_close, capture_cuda_graph, poison_, requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_q(B, Hq, Hk, D, dtype, device, layout="fused"):
    """q [B, Hq, D]. fused: the first Hq heads of a [B, (Hq + 2 Hk) D] qkv activation (the model's
    layout); misaligned: the same shifted by one element; head_padded: heads 2 D apart; contiguous."""
    if layout == "contiguous":
        return torch.randn(B, Hq, D, dtype=dtype, device=device)
    if layout == "head_padded":
        return torch.randn(B, Hq, 2 * D, dtype=dtype, device=device)[:, :, :D]
    shift = 1 if layout == "misaligned" else 0
    qkv = torch.randn(B, (Hq + 2 * Hk) * D + shift, dtype=dtype, device=device)
    return qkv[:, shift:].view(B, Hq + 2 * Hk, D)[:, :Hq]


def make_cache(B, S, Hk, D, dtype, device):
    return (torch.randn(B, S, Hk, D, dtype=dtype, device=device), torch.randn(B, S, Hk, D, dtype=dtype, device=device))


def bounds(pairs, device):
    starts = torch.tensor([p[0] for p in pairs], dtype=torch.int64, device=device)
    ends = torch.tensor([p[1] for p in pairs], dtype=torch.int64, device=device)
    return starts, ends


def random_pairs(B, S, generator=None):
    """Mixed lengths: 1, the whole cache, and random [start, end) with left padding."""
    pairs = []
    for b in range(B):
        kind = b % 4
        if kind == 0:
            pairs.append((0, S))
        elif kind == 1:
            pairs.append((0, 1) if S > 0 else (0, 0))
        else:
            end = int(torch.randint(1, S + 1, (1,)).item())
            start = int(torch.randint(0, end, (1,)).item()) if kind == 3 else 0
            pairs.append((start, end))
    return pairs


def fp32_reference(q, k_cache, v_cache, kv_start, kv_end, window, scale):
    return reference.decode_attention(q.float(), k_cache.float(), v_cache.float(), kv_start, kv_end, window, scale)


def check(out, q, k_cache, v_cache, kv_start, kv_end, window=0, scale=None, what="output"):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    ref = fp32_reference(q, k_cache, v_cache, kv_start, kv_end, window, scale)
    assert_rows_close(out, ref, q.dtype, what=what, equal_nan=True)


def _skip_big_on_cpu(device, numel):
    if device == "cpu" and numel > 20_000_000:
        pytest.skip("large cache: GPU only (keeps the CPU suite fast)")


# ------------------------------------------------------------------------------------------------
# Against the reference


SHAPES = [
    # (B, Hq, Hk, D, S)
    (1, 32, 32, 128, 2048),  # real Dots1 attention, B = 1
    (3, 8, 2, 64, 100),  # GQA 4
    (8, 16, 2, 128, 300),  # GQA 8
    (3, 12, 3, 96, 77),  # GQA 4, padded head_dim
    (2, 4, 4, 256, 130),
    (3, 24, 2, 128, 50),  # GQA 12: two head chunks
    (2, 6, 6, 34, 40),  # head_dim not a multiple of the 16-byte vector (4-byte copies)
    (1, 8, 1, 64, 1000),  # MQA
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(device, dtype, shape):
    B, Hq, Hk, D, S = shape
    q = make_q(B, Hq, Hk, D, dtype, device)
    k_cache, v_cache = make_cache(B, S, Hk, D, dtype, device)
    kv_start, kv_end = bounds(random_pairs(B, S), device)
    out = A.decode_attention(q, k_cache, v_cache, kv_start, kv_end)
    check(out, q, k_cache, v_cache, kv_start, kv_end)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("B,S", [(8, 2048), (32, 4096)])
def test_real_shape_batches(device, dtype, B, S):
    _skip_big_on_cpu(device, B * S * 32 * 128)
    q = make_q(B, 32, 32, 128, dtype, device)
    k_cache, v_cache = make_cache(B, S, 32, 128, dtype, device)
    kv_start, kv_end = bounds(random_pairs(B, S), device)
    check(A.decode_attention(q, k_cache, v_cache, kv_start, kv_end), q, k_cache, v_cache, kv_start, kv_end)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
def test_lengths_and_left_padding(device, dtype, D):
    S = 700
    pairs = [(0, 1), (0, S), (S - 1, S), (0, 63), (0, 65), (3, 200), (650, 699), (0, 129), (0, 511), (1, S)]
    B, Hq, Hk = len(pairs), 8, 2
    q = make_q(B, Hq, Hk, D, dtype, device)
    k_cache, v_cache = make_cache(B, S, Hk, D, dtype, device)
    kv_start, kv_end = bounds(pairs, device)
    check(A.decode_attention(q, k_cache, v_cache, kv_start, kv_end), q, k_cache, v_cache, kv_start, kv_end)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [1, 7, 64, 300, 100000])
def test_sliding_window(device, dtype, window):
    S = 400
    pairs = [(0, S), (0, 1), (10, 350), (0, 64), (200, 203), (399, 400)]
    B, Hq, Hk, D = len(pairs), 4, 2, 128
    q = make_q(B, Hq, Hk, D, dtype, device)
    k_cache, v_cache = make_cache(B, S, Hk, D, dtype, device)
    kv_start, kv_end = bounds(pairs, device)
    out = A.decode_attention(q, k_cache, v_cache, kv_start, kv_end, window=window)
    check(out, q, k_cache, v_cache, kv_start, kv_end, window=window)
    if window >= S:  # a window longer than every range is no window
        assert torch.equal(out, A.decode_attention(q, k_cache, v_cache, kv_start, kv_end))


def test_window_is_the_last_keys(device):
    # window w: exactly the last w slots before kv_end, i.e. the keys in (p - w, p] for p = kv_end - 1.
    S, w = 50, 5
    q = make_q(1, 2, 2, 64, torch.float32, device)
    k_cache, v_cache = make_cache(1, S, 2, 64, torch.float32, device)
    kv_start, kv_end = bounds([(0, 40)], device)
    windowed = A.decode_attention(q, k_cache, v_cache, kv_start, kv_end, window=w)
    explicit = A.decode_attention(q, k_cache, v_cache, *bounds([(40 - w, 40)], device))
    torch.testing.assert_close(windowed, explicit, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale(device, dtype):
    B, Hq, Hk, D, S = 3, 4, 4, 64, 90
    q = make_q(B, Hq, Hk, D, dtype, device)
    k_cache, v_cache = make_cache(B, S, Hk, D, dtype, device)
    kv_start, kv_end = bounds(random_pairs(B, S), device)
    for scale in (0.02, 1.0, 0.3):
        out = A.decode_attention(q, k_cache, v_cache, kv_start, kv_end, scale=scale)
        check(out, q, k_cache, v_cache, kv_start, kv_end, scale=scale)


# ------------------------------------------------------------------------------------------------
# Empty ranges, bad bounds, layouts


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_range_is_exactly_zero(device, dtype):
    S = 64
    pairs = [(0, 0), (5, 5), (0, 30), (S, S), (10, 10)]
    B, Hq, Hk, D = len(pairs), 4, 2, 128
    q = make_q(B, Hq, Hk, D, dtype, device)
    k_cache, v_cache = make_cache(B, S, Hk, D, dtype, device)
    kv_start, kv_end = bounds(pairs, device)
    out = A.decode_attention(q, k_cache, v_cache, kv_start, kv_end)
    for b, (s, e) in enumerate(pairs):
        if s == e:
            assert torch.equal(out[b], torch.zeros_like(out[b])), f"sequence {b}: empty range must give exactly 0"
    check(out, q, k_cache, v_cache, kv_start, kv_end)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [128, 96])
def test_bad_bounds_poison_the_sequence(device, dtype, D):
    S = 80
    pairs = [(0, 40), (-1, 10), (0, S + 1), (30, 20), (0, S), (-5, -1), (S + 2, S + 3), (5, 6)]
    B, Hq, Hk = len(pairs), 8, 2
    q = make_q(B, Hq, Hk, D, dtype, device)
    k_cache, v_cache = make_cache(B, S, Hk, D, dtype, device)
    kv_start, kv_end = bounds(pairs, device)
    for window in (0, 16):
        out = A.decode_attention(q, k_cache, v_cache, kv_start, kv_end, window=window)
        for b, (s, e) in enumerate(pairs):
            bad = s < 0 or e > S or s > e
            assert bool(torch.isnan(out[b]).all()) == bad, f"sequence {b} ({s}, {e}): NaN iff bad bounds"
            assert bad or bool(torch.isfinite(out[b]).all())
        check(out, q, k_cache, v_cache, kv_start, kv_end, window=window)
    with pytest.raises(IndexError, match="kv_start"):
        A.decode_attention(q, k_cache, v_cache, kv_start, kv_end, check_bounds=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["fused", "misaligned", "head_padded", "contiguous"])
def test_q_layouts(device, dtype, layout):
    B, Hq, Hk, D, S = 3, 8, 2, 128, 150
    q = make_q(B, Hq, Hk, D, dtype, device, layout)
    k_cache, v_cache = make_cache(B, S, Hk, D, dtype, device)
    kv_start, kv_end = bounds(random_pairs(B, S), device)
    out = A.decode_attention(q, k_cache, v_cache, kv_start, kv_end)
    check(out, q, k_cache, v_cache, kv_start, kv_end)
    assert torch.equal(out, A.decode_attention(q.contiguous(), k_cache, v_cache, kv_start, kv_end))


def test_expanded_and_strided_bounds(device):
    B, Hq, Hk, D, S = 4, 4, 4, 64, 60
    q = make_q(B, Hq, Hk, D, torch.float32, device)
    k_cache, v_cache = make_cache(B, S, Hk, D, torch.float32, device)
    kv_start = torch.zeros((), dtype=torch.int64, device=device).expand(B)  # stride 0
    kv_end = torch.tensor([[50, 0], [7, 0], [60, 0], [1, 0]], device=device)[:, 0]  # stride 2
    out = A.decode_attention(q, k_cache, v_cache, kv_start, kv_end)
    check(out, q, k_cache, v_cache, kv_start, kv_end)
    assert torch.equal(out, A.decode_attention(q, k_cache, v_cache, kv_start.contiguous(), kv_end.contiguous()))


def test_cache_views_at_an_offset(device):
    # A layer's cache taken from a larger buffer (contiguous, nonzero offset), including an odd element
    # offset for 16-bit dtypes (copied to an aligned buffer on CUDA).
    B, Hq, Hk, D, S = 2, 4, 2, 64, 33
    n = B * S * Hk * D
    for dtype in (torch.bfloat16, torch.float32):
        for offset in (0, 1, 8, n):
            buf = torch.randn(2 * n + 8, dtype=dtype, device=device)
            k_cache = buf[offset : offset + n].view(B, S, Hk, D)
            v_cache = torch.randn(B, S, Hk, D, dtype=dtype, device=device)
            q = make_q(B, Hq, Hk, D, dtype, device)
            kv_start, kv_end = bounds([(0, S), (3, 20)], device)
            check(A.decode_attention(q, k_cache, v_cache, kv_start, kv_end), q, k_cache, v_cache, kv_start, kv_end)


@pytest.mark.parametrize("shape", [(0, 4, 2, 64, 16), (2, 0, 2, 64, 16), (2, 4, 2, 64, 0)])
def test_empty_shapes(device, shape):
    B, Hq, Hk, D, S = shape
    q = torch.randn(B, Hq, D, device=device)
    k_cache, v_cache = make_cache(B, S, Hk, D, torch.float32, device)
    zeros = torch.zeros(B, dtype=torch.int64, device=device)
    out = A.decode_attention(q, k_cache, v_cache, zeros, zeros)
    assert out.shape == (B, Hq, D)
    assert torch.equal(out, torch.zeros_like(out))  # S = 0: every range empty


# ------------------------------------------------------------------------------------------------
# Against SDPA with the equivalent boolean mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hq,Hk", [(8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("window", [0, 20])
def test_matches_sdpa_with_mask(device, dtype, Hq, Hk, window):
    B, D, S = 3, 128, 97
    q = make_q(B, Hq, Hk, D, dtype, device)
    k_cache, v_cache = make_cache(B, S, Hk, D, dtype, device)
    pairs = [(0, S), (4, 60), (0, 1)]
    kv_start, kv_end = bounds(pairs, device)
    out = A.decode_attention(q, k_cache, v_cache, kv_start, kv_end, window=window)
    slot = torch.arange(S, device=device)
    lo = torch.maximum(kv_start, kv_end - window) if window > 0 else kv_start
    mask = (slot[None] >= lo[:, None]) & (slot[None] < kv_end[:, None])  # [B, S], True = attend
    G = Hq // Hk
    k = k_cache.float().permute(0, 2, 1, 3).repeat_interleave(G, dim=1)  # [B, Hq, S, D]
    v = v_cache.float().permute(0, 2, 1, 3).repeat_interleave(G, dim=1)
    sdpa = F.scaled_dot_product_attention(q.float()[:, :, None], k, v, attn_mask=mask[:, None, None, :])[:, :, 0]
    assert_rows_close(out, sdpa, dtype, what="decode_attention vs SDPA (fp32, boolean mask)")


# ------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_raise_clear_errors(device):
    B, Hq, Hk, D, S = 2, 4, 2, 64, 16
    q = make_q(B, Hq, Hk, D, torch.bfloat16, device)
    kc, vc = make_cache(B, S, Hk, D, torch.bfloat16, device)
    st, en = bounds([(0, 5), (0, 16)], device)
    call = A.decode_attention
    with pytest.raises(TypeError, match="q must have dtype"):
        call(q.to(torch.int32), kc, vc, st, en)
    with pytest.raises(ValueError, match="q must have shape"):
        call(q[0], kc, vc, st, en)
    with pytest.raises(TypeError, match="k_cache must have dtype"):
        call(q, kc.float(), vc, st, en)
    with pytest.raises(TypeError, match="v_cache must have dtype"):
        call(q, kc, vc.half(), st, en)
    with pytest.raises(ValueError, match="k_cache must have shape"):
        call(q, kc[:, :, :, :32], vc, st, en)
    with pytest.raises(ValueError, match="k_cache must have shape"):
        call(q, kc[:1], vc[:1], st, en)
    with pytest.raises(ValueError, match="v_cache must have k_cache's shape"):
        call(q, kc, vc[:, :8], st, en)
    with pytest.raises(ValueError, match="must be a multiple of the kv heads"):
        call(make_q(B, 5, Hk, D, torch.bfloat16, device, "contiguous"), kc, vc, st, en)
    with pytest.raises(ValueError, match="head_dim"):
        q_odd = torch.randn(B, Hq, 63, dtype=torch.bfloat16, device=device)
        call(q_odd, torch.randn(B, S, Hk, 63, dtype=torch.bfloat16, device=device),
             torch.randn(B, S, Hk, 63, dtype=torch.bfloat16, device=device), st, en)
    with pytest.raises(ValueError, match="head_dim"):
        q_big = torch.randn(B, Hq, 258, dtype=torch.bfloat16, device=device)
        big = torch.randn(B, 2, Hk, 258, dtype=torch.bfloat16, device=device)
        call(q_big, big, big, st, en)
    with pytest.raises(ValueError, match="q must have a contiguous last dimension"):
        call(torch.randn(B, Hq, 2 * D, dtype=torch.bfloat16, device=device)[:, :, ::2], kc, vc, st, en)
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        call(q, kc.transpose(1, 2).contiguous().transpose(1, 2), vc, st, en)
    with pytest.raises(TypeError, match="kv_start must have dtype"):
        call(q, kc, vc, st.int(), en)
    with pytest.raises(TypeError, match="kv_end must have dtype"):
        call(q, kc, vc, st, en.float())
    with pytest.raises(ValueError, match="kv_end must have shape"):
        call(q, kc, vc, st, en[:1])
    with pytest.raises(ValueError, match="window must be >= 0"):
        call(q, kc, vc, st, en, window=-1)
    with pytest.raises(IndexError, match="kv_end"):
        call(q, kc, vc, st, en + 1, check_bounds=True)
    with pytest.raises(IndexError, match="kv_start must not exceed kv_end"):
        call(q, kc, vc, en, st, check_bounds=True)


@requires_cuda
def test_device_mismatch_raises():
    q = make_q(2, 4, 2, 64, torch.bfloat16, "cuda")
    kc, vc = make_cache(2, 8, 2, 64, torch.bfloat16, "cuda")
    st, en = bounds([(0, 5), (0, 8)], "cpu")
    with pytest.raises((ValueError, RuntimeError), match="kv_start must be on the same device as q"):
        A.decode_attention(q, kc, vc, st, en)


# ------------------------------------------------------------------------------------------------
# GPU: split counts, graph replay, determinism, every element written, big batches


def mixed_case(shape, dtype):
    """q, caches and bounds on the GPU for shape (B, Hq, Hk, D, S): random lengths, an empty range next
    to full ones and (B > 2) a poisoned sequence inside a cluster launch."""
    B, Hq, Hk, D, S = shape
    q = make_q(B, Hq, Hk, D, dtype, "cuda")
    k_cache, v_cache = make_cache(B, S, Hk, D, dtype, "cuda")
    pairs = random_pairs(B, S)
    pairs[-1] = (0, 0) if B > 1 else pairs[-1]
    if B > 2:
        pairs[1] = (-1, 3)
    return (q, k_cache, v_cache, *bounds(pairs, "cuda"))


def run_settings(monkeypatch, name, values, case, splits, bitwise=True):
    """decode_attention on ``case`` under each value of the env setting ``name``, windows 0 and 100: every
    output against the reference; where ``bitwise``, equal bit for bit across the values."""
    q, k_cache, v_cache, kv_start, kv_end = case
    for window in (0, 100):
        outs = {}
        for value in values:
            monkeypatch.setenv(name, value)
            outs[value] = A.decode_attention(q, k_cache, v_cache, kv_start, kv_end, window=window)
            check(outs[value], q, k_cache, v_cache, kv_start, kv_end, window=window,
                  what=f"{name}={value} splits={splits} window={window}")
        if bitwise:
            for value in values[1:]:
                torch.testing.assert_close(
                    outs[value], outs[values[0]], rtol=0, atol=0, equal_nan=True,
                    msg=lambda m: f"splits={splits} window={window}: {name} values differ: {m}")


@requires_cuda
@pytest.mark.parametrize("name,value", [("DOTS1_EXT_ATTENTION_SPLITS", "3x"), ("DOTS1_EXT_ATTENTION_COMBINE", "global"),
                                        ("DOTS1_EXT_ATTENTION_STAGES", "4"), ("DOTS1_EXT_ATTENTION_STAGES", "deep"),
                                        ("DOTS1_EXT_ATTENTION_STAGES", "0"), ("DOTS1_EXT_PDL", "yes")])
def test_bad_setting_raises(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    q = make_q(1, 4, 4, 64, torch.bfloat16, "cuda")
    kc, vc = make_cache(1, 8, 4, 64, torch.bfloat16, "cuda")
    with pytest.raises(ValueError, match=name):
        A.decode_attention(q, kc, vc, *bounds([(0, 8)], "cuda"))


@requires_cuda
@pytest.mark.parametrize("splits", ["1", "2", "16", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 32, 32, 128, 2048), (3, 12, 3, 96, 700), (2, 4, 4, 256, 900),
                                   (3, 6, 6, 34, 600), (64, 32, 32, 128, 300)],
                         ids=lambda s: "x".join(map(str, s)))
def test_pipeline_depths_same_bits(monkeypatch, splits, dtype, shape):
    # The deep K/V pipeline (one CTA per SM: the cluster mode's batch-1 default) and the shallow one (two
    # per SM) differ in where the copies land, never in the arithmetic: forced either way, including the
    # deep one on a grid that takes several waves (B = 64), the results are equal bit for bit and right.
    monkeypatch.setenv("DOTS1_EXT_ATTENTION_SPLITS", splits)
    run_settings(monkeypatch, "DOTS1_EXT_ATTENTION_STAGES", ("3", "6"), mixed_case(shape, dtype), splits)


@requires_cuda
@pytest.mark.parametrize("splits", ["1", "2", "4", "8", "16", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 32, 32, 128, 2048), (3, 8, 1, 64, 1500), (3, 12, 3, 96, 700),
                                   (2, 4, 4, 256, 900), (3, 6, 6, 34, 600), (8, 16, 2, 128, 257)],
                         ids=lambda s: "x".join(map(str, s)))
def test_every_split_count_both_combines(monkeypatch, splits, dtype, shape):
    # The split combines against the reference at every split count: last (the default: the splits as
    # independent CTAs writing fp32 partials, the last to arrive combining them in split order),
    # workspace (the same partials combined by a second kernel) and cluster (the same arithmetic inside
    # a thread-block cluster). For a forced split count the three give the same bits (poisoned and
    # empty sequences included). Only the portable cluster sizes
    # (<= 8) are sure to run as asked in the cluster mode (16 is taken where the GPU allows it), and
    # auto may pick another count in each mode: there only the reference decides.
    monkeypatch.setenv("DOTS1_EXT_ATTENTION_SPLITS", splits)
    run_settings(monkeypatch, "DOTS1_EXT_ATTENTION_COMBINE", ("cluster", "workspace", "last"), mixed_case(shape, dtype),
                 splits, bitwise=splits in ("1", "2", "4", "8"))


@requires_cuda
def test_last_combine_counters(monkeypatch):
    # The last-arriving combine's device counters: every completed launch leaves them at zero, so more
    # launches than the 64 slots (each slot reused), a launch of more units than a slot holds (130
    # sequences x 32 kv heads > 4096: the combine kernel instead) and one of exactly 4096 give the
    # workspace mode's bits (and the reference's values).
    monkeypatch.setenv("DOTS1_EXT_ATTENTION_SPLITS", "2")
    for B in (130, 128, 3):
        case = mixed_case((B, 32, 32, 64, 96), torch.bfloat16)
        run_settings(monkeypatch, "DOTS1_EXT_ATTENTION_COMBINE", ("workspace", "last"), case, "2")
    q, k_cache, v_cache, kv_start, kv_end = mixed_case((2, 32, 32, 128, 700), torch.bfloat16)
    monkeypatch.setenv("DOTS1_EXT_ATTENTION_COMBINE", "workspace")
    expected = A.decode_attention(q, k_cache, v_cache, kv_start, kv_end)
    monkeypatch.setenv("DOTS1_EXT_ATTENTION_COMBINE", "last")
    outs = [A.decode_attention(q, k_cache, v_cache, kv_start, kv_end) for _ in range(150)]
    for i, out in enumerate(outs):
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"launch {i}: {m}")


@requires_cuda
@pytest.mark.parametrize("combine", ["last", "workspace", "cluster"])
@pytest.mark.parametrize("splits", ["4", "auto"])
def test_combine_modes_graph_replay(monkeypatch, combine, splits):
    # The workspace (the default mode's) comes from the caching allocator at capture: the graph keeps
    # it; replays with new device lengths equal eager calls bit for bit, in either mode.
    monkeypatch.setenv("DOTS1_EXT_ATTENTION_COMBINE", combine)
    monkeypatch.setenv("DOTS1_EXT_ATTENTION_SPLITS", splits)
    B, Hq, Hk, D, S = 2, 32, 32, 128, 3000
    q = make_q(B, Hq, Hk, D, torch.bfloat16, "cuda")
    k_cache, v_cache = make_cache(B, S, Hk, D, torch.bfloat16, "cuda")
    kv_start = torch.zeros(B, dtype=torch.int64, device="cuda")
    kv_end = torch.full((B,), S, dtype=torch.int64, device="cuda")
    fn = lambda: A.decode_attention(q, k_cache, v_cache, kv_start, kv_end)  # noqa: E731
    graph, static_out = capture_cuda_graph(fn)
    for step, ends in enumerate([[S, S], [1, 700], [2048, 0], [S - 1, 65]]):
        kv_end.copy_(torch.tensor(ends, device="cuda"))
        graph.replay()
        eager = fn()
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager), f"step {step}: graph replay differs from eager"
        check(static_out, q, k_cache, v_cache, kv_start, kv_end, window=0, what=f"{combine} replay step {step}")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 32, 32, 128, 4096), (3, 16, 2, 128, 1000), (32, 32, 32, 128, 512)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_graph_replay_with_changed_lengths(dtype, shape):
    B, Hq, Hk, D, S = shape
    q = make_q(B, Hq, Hk, D, dtype, "cuda")
    k_cache, v_cache = make_cache(B, S, Hk, D, dtype, "cuda")
    kv_start = torch.zeros(B, dtype=torch.int64, device="cuda")
    kv_end = torch.full((B,), S, dtype=torch.int64, device="cuda")
    for window in (0, 300):
        fn = lambda: A.decode_attention(q, k_cache, v_cache, kv_start, kv_end, window=window)  # noqa: E731
        graph, static_out = capture_cuda_graph(fn)
        lengths = [[S] * B, [1] * B, [min(S, 37 + 101 * b) for b in range(B)], [S - 1] * B, [0] * B]
        for step, ends in enumerate(lengths):
            kv_end.copy_(torch.tensor(ends, device="cuda"))
            kv_start.copy_(torch.tensor([min(e, 3 * b) for b, e in enumerate(ends)], device="cuda"))
            graph.replay()
            eager = fn()
            torch.cuda.synchronize()
            assert torch.equal(static_out, eager), f"window={window} step {step}: graph replay differs from eager"
            check(static_out, q, k_cache, v_cache, kv_start, kv_end, window=window, what=f"replay step {step}")


@requires_cuda
@pytest.mark.parametrize("splits", ["1", "8", "16", "auto"])
def test_deterministic(monkeypatch, splits):
    monkeypatch.setenv("DOTS1_EXT_ATTENTION_SPLITS", splits)
    B, Hq, Hk, D, S = 4, 32, 8, 128, 3000
    q = make_q(B, Hq, Hk, D, torch.bfloat16, "cuda")
    k_cache, v_cache = make_cache(B, S, Hk, D, torch.bfloat16, "cuda")
    kv_start, kv_end = bounds(random_pairs(B, S), "cuda")
    first = A.decode_attention(q, k_cache, v_cache, kv_start, kv_end)
    for _ in range(3):
        assert torch.equal(first, A.decode_attention(q, k_cache, v_cache, kv_start, kv_end))


@requires_cuda
@pytest.mark.parametrize("splits", ["1", "16", "auto"])
def test_pdl_off_same_bits(monkeypatch, splits):
    # Programmatic dependent launch changes when the CTAs start, never what they compute. The producer
    # of q runs right before the op (the PDL predecessor): q must be read after it completed.
    monkeypatch.setenv("DOTS1_EXT_ATTENTION_SPLITS", splits)
    B, Hq, Hk, D, S = 2, 32, 32, 128, 4096
    k_cache, v_cache = make_cache(B, S, Hk, D, torch.bfloat16, "cuda")
    kv_start, kv_end = bounds(random_pairs(B, S), "cuda")
    base = make_q(B, Hq, Hk, D, torch.bfloat16, "cuda")
    outs = []
    for pdl in ("1", "0"):
        monkeypatch.setenv("DOTS1_EXT_PDL", pdl)
        q = torch.zeros_like(base)
        q.copy_(base * 2)  # a kernel writing q immediately before the op
        outs.append(A.decode_attention(q, k_cache, v_cache, kv_start, kv_end))
    assert torch.equal(outs[0], outs[1])
    check(outs[0], base * 2, k_cache, v_cache, kv_start, kv_end, window=0, what=f"pdl splits={splits}")


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [128, 96, 34])
def test_writes_every_element(dtype, D):
    # The caching allocator hands the freed poisoned block back to the op's output.
    B, Hq, Hk, S = 5, 12, 3, 300
    poison = poison_(torch.empty(B, Hq, D, dtype=dtype, device="cuda"))
    del poison
    q = make_q(B, Hq, Hk, D, dtype, "cuda")
    k_cache, v_cache = make_cache(B, S, Hk, D, dtype, "cuda")
    out = A.decode_attention(q, k_cache, v_cache, *bounds(random_pairs(B, S), "cuda"))
    assert torch.isfinite(out).all()


@requires_cuda
def test_batch_past_the_grid_limit():
    B, Hq, Hk, D, S = 65536 + 7, 2, 1, 8, 3
    q = make_q(B, Hq, Hk, D, torch.float32, "cuda", "contiguous")
    k_cache, v_cache = make_cache(B, S, Hk, D, torch.float32, "cuda")
    kv_end = torch.randint(0, S + 1, (B,), device="cuda")
    kv_start = torch.zeros(B, dtype=torch.int64, device="cuda")
    out = A.decode_attention(q, k_cache, v_cache, kv_start, kv_end)
    # The reference, vectorised over the batch (a Python loop over 65543 sequences would take minutes).
    scores = torch.einsum("bhd,bsd->bhs", q, k_cache[:, :, 0]) / math.sqrt(D)
    attend = torch.arange(S, device="cuda")[None, None] < kv_end[:, None, None]
    probs = torch.softmax(scores.masked_fill(~attend, float("-inf")), dim=-1).nan_to_num(0.0)  # empty -> 0
    ref = torch.einsum("bhs,bsd->bhd", probs, v_cache[:, :, 0])
    assert_rows_close(out, ref, torch.float32)
    assert torch.equal(out[kv_end == 0], torch.zeros_like(out[kv_end == 0]))


@requires_cuda
def test_nan_in_attended_keys_propagates():
    B, Hq, Hk, D, S = 2, 4, 4, 128, 500
    q = make_q(B, Hq, Hk, D, torch.bfloat16, "cuda")
    k_cache, v_cache = make_cache(B, S, Hk, D, torch.bfloat16, "cuda")
    k_cache[0, 123, 1, 5] = float("nan")  # attended by sequence 0, head 1 only
    k_cache[1, 400, :, :] = float("nan")  # outside sequence 1's range
    kv_start, kv_end = bounds([(0, S), (0, 300)], "cuda")
    out = A.decode_attention(q, k_cache, v_cache, kv_start, kv_end)
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, [0, 2, 3]]).all()
    assert torch.isfinite(out[1]).all()


# ------------------------------------------------------------------------------------------------
# opcheck, torch.compile


def test_opcheck(device):
    B, Hq, Hk, D, S = 3, 8, 2, 128, 40
    q = make_q(B, Hq, Hk, D, torch.bfloat16, device, "contiguous")
    k_cache, v_cache = make_cache(B, S, Hk, D, torch.bfloat16, device)
    kv_start, kv_end = bounds([(0, 40), (2, 17), (5, 5)], device)
    torch.library.opcheck(torch.ops.dots1_ext.decode_attention.default, (q, k_cache, v_cache, kv_start, kv_end, 0, 0.1))
    torch.library.opcheck(torch.ops.dots1_ext.decode_attention.default, (q, k_cache, v_cache, kv_start, kv_end, 9, 0.1))


def _decode_step(qkv, k_cache, v_cache, kv_start, kv_end):
    # The model's shape: q as a view of the fused projection output, attention, then an output projection.
    B = qkv.shape[0]
    q = qkv.view(B, 16, 64)[:, :8]
    out = A.decode_attention(q, k_cache, v_cache, kv_start, kv_end, window=0, scale=0.125)
    return out.reshape(B, -1) * 2.0


def test_under_torch_compile(device):
    # CPU: aot_eager (the fake and functionalisation); CUDA: inductor + CUDA graphs, lengths changed
    # between calls (one graph serves every length).
    backend = "inductor" if device == "cuda" else "aot_eager"
    mode = "reduce-overhead" if device == "cuda" else None
    fn = torch.compile(_decode_step, backend=backend, mode=mode, fullgraph=True)
    B, S = 3, 70
    qkv = torch.randn(B, 16 * 64, device=device, dtype=torch.bfloat16)
    k_cache, v_cache = make_cache(B, S, 4, 64, torch.bfloat16, device)
    kv_start = torch.zeros(B, dtype=torch.int64, device=device)
    for step, ends in enumerate([[70, 1, 33], [5, 70, 0], [69, 2, 40], [1, 1, 1]]):
        kv_end = torch.tensor(ends, device=device)
        got = fn(qkv, k_cache, v_cache, kv_start, kv_end)
        expect = _decode_step(qkv, k_cache, v_cache, kv_start, kv_end)
        assert torch.equal(got, expect), f"step {step}: compiled differs from eager"
