"""rms_norm, add_rms_norm_, qk_norm_rope_ and qk_norm_rope_kv_cache_ against dots1_ext.reference.

Shapes cover T = 0, 1, 3 and 4096 (GPU), hidden sizes on and off the 16-byte vector path (and past
the register-resident limit), strided and non-collapsible rows, q/k as views of a fused QKV buffer
(aligned, misaligned and head-strided), GQA head counts, decode positions, weights of another dtype,
skipped tokens and KV-cache rows.
"""

from __future__ import annotations

import pytest
import torch

from dots1_ext import reference
from dots1_ext.ops import norm as N
from dots1_ext.rope import build_cos_sin_cache
from tests.conftest import RTOL, assert_close_rel, assert_rows_close, assert_ulps, poison_, requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-5

# The norm kernels are exact up to rounding: they repeat the reference's roundings step by step and
# differ only where the fp32 sum of squares (another summation order) moves a value across a rounding
# boundary. Elementwise bound in ulps of the output dtype against the reference on the same inputs.
# 16-bit: the normalised value moves by at most 1 ulp, the product with the weight by 1 more (measured
# on CPU, H up to 20000: bf16 0, fp16 2). fp32: the sum of H squares itself differs by a few ulps
# between summation orders, halved by the rsqrt (measured on CPU: up to 5).
NORM_ULPS = {torch.float32: 8, torch.bfloat16: 2, torch.float16: 2}
# QK-norm + RoPE: the rotation a*c - b*s cancels, so an ulp of the normalised value can be many ulps of
# a small output element (measured on CPU: up to 8192 ulp in fp32, 8 in fp16): bounded instead in ulps
# at the largest magnitude of each head (row) (measured on CPU: fp32 3.1, fp16 0.7, bf16 0.3).
QK_ROW_ULPS = {torch.float32: 8, torch.bfloat16: 3, torch.float16: 3}


def assert_norm_close(out, ref, dtype, what="output"):
    """Per element in ulps against the reference on the same inputs, and per row against fp32."""
    assert_ulps(out, ref, NORM_ULPS[dtype], what)


def assert_qk_close(out, ref, dtype, what="output", equal_nan=False):
    """Per head (row) of out [T, H, D]: max error <= QK_ROW_ULPS ulps at the head's largest magnitude."""
    ulp_at_max = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    assert_rows_close(out, ref, dtype, rtol=QK_ROW_ULPS[dtype] * ulp_at_max, what=what, equal_nan=equal_nan)


def _skip_big_on_cpu(device: str, numel: int) -> None:
    if device == "cpu" and numel > 4_000_000:
        pytest.skip("large shape: GPU only (keeps the CPU suite fast)")


# ------------------------------------------------------------------------------------------------
# rms_norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [(1, 4096), (3, 4096), (4096, 4096), (5, 8), (7, 100), (3, 16384), (2, 3, 1000), (2, 20000), (1, 1), (64, 2048)],
)
def test_rms_norm_matches_reference(device, dtype, shape):
    _skip_big_on_cpu(device, torch.Size(shape).numel())
    x = torch.randn(shape, dtype=dtype, device=device) * 3
    weight = torch.randn(shape[-1], dtype=dtype, device=device)
    out = N.rms_norm(x, weight, EPS)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert_norm_close(out, reference.rms_norm(x, weight, EPS), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["column_slice", "transposed_leading", "broadcast_rows"])
def test_rms_norm_non_contiguous(device, dtype, layout):
    H = 256
    if layout == "column_slice":  # rows evenly spaced, wider than H: read in place
        x = torch.randn(5, 3 * H, dtype=dtype, device=device)[:, H : 2 * H]
    elif layout == "transposed_leading":  # leading dims do not collapse: copied first
        x = torch.randn(4, 3, H, dtype=dtype, device=device).transpose(0, 1)
    else:  # stride-0 rows
        x = torch.randn(1, H, dtype=dtype, device=device).expand(6, H)
    weight = torch.randn(H, dtype=dtype, device=device)
    assert_norm_close(N.rms_norm(x, weight, EPS), reference.rms_norm(x, weight, EPS), dtype)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16)])
def test_rms_norm_weight_of_another_dtype(device, x_dtype, w_dtype):
    x = torch.randn(9, 512, dtype=x_dtype, device=device)
    weight = torch.randn(512, dtype=torch.float32, device=device).to(w_dtype)
    out = N.rms_norm(x, weight, EPS)
    assert out.dtype == x_dtype
    # The reference multiplies by weight.float(): an fp32 weight must not be rounded to x's dtype first.
    assert_norm_close(out, reference.rms_norm(x, weight, EPS), x_dtype)


@pytest.mark.parametrize("shape", [(0, 4096), (2, 0, 64), (3, 0)])
def test_rms_norm_empty(device, shape):
    x = torch.randn(shape, device=device)
    out = N.rms_norm(x, torch.randn(shape[-1], device=device), EPS)
    assert out.shape == x.shape


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [4096, 100, 16384])
def test_rms_norm_writes_every_element(dtype, H):
    # The caching allocator hands the freed poisoned block back to the op's output.
    T = 37
    poison = poison_(torch.empty(T, H, dtype=dtype, device="cuda"))
    del poison
    x = torch.randn(T, H, dtype=dtype, device="cuda")
    out = N.rms_norm(x, torch.randn(H, dtype=dtype, device="cuda"), EPS)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# add_rms_norm_


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4096), (3, 4096), (4096, 4096), (7, 100), (2, 16384), (3, 20000), (2, 5, 64)])
def test_add_rms_norm_matches_reference(device, dtype, shape):
    _skip_big_on_cpu(device, torch.Size(shape).numel())
    x = torch.randn(shape, dtype=dtype, device=device)
    residual = torch.randn(shape, dtype=dtype, device=device) * 4
    weight = torch.randn(shape[-1], dtype=dtype, device=device)
    x_ref, residual_ref = x.clone(), residual.clone()
    reference.add_rms_norm_(x_ref, residual_ref, weight, EPS)
    returned = N.add_rms_norm_(x, residual, weight, EPS)
    assert returned is x
    assert_norm_close(x, x_ref, dtype, "x")
    # residual = round(residual + x) is exact elementwise arithmetic: identical to the reference.
    assert torch.equal(residual, residual_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["column_slice", "transposed_leading"])
def test_add_rms_norm_strided_in_place(device, dtype, layout):
    H = 512
    if layout == "column_slice":
        x_buf = torch.randn(6, 3 * H, dtype=dtype, device=device)
        r_buf = torch.randn(6, 2 * H, dtype=dtype, device=device)
        x, residual = x_buf[:, H : 2 * H], r_buf[:, :H]
    else:
        x_buf = torch.randn(4, 3, H, dtype=dtype, device=device)
        r_buf = torch.randn(3, 4, H, dtype=dtype, device=device)
        x, residual = x_buf.transpose(0, 1), r_buf
    x_before, r_buf_before, x_buf_before = x.clone(), r_buf.clone(), x_buf.clone()
    weight = torch.randn(H, dtype=dtype, device=device)
    x_ref, residual_ref = x.clone(), residual.clone()
    reference.add_rms_norm_(x_ref, residual_ref, weight, EPS)
    N.add_rms_norm_(x, residual, weight, EPS)
    assert_norm_close(x, x_ref, dtype, "x")
    assert torch.equal(residual, residual_ref)
    if layout == "column_slice":  # columns outside the views are untouched
        assert torch.equal(x_buf[:, :H], x_buf_before[:, :H]) and torch.equal(x_buf[:, 2 * H :], x_buf_before[:, 2 * H :])
        assert torch.equal(r_buf[:, H:], r_buf_before[:, H:])
    assert not torch.equal(x, x_before)


def test_add_rms_norm_fp32_weight_with_bf16(device):
    x = torch.randn(5, 1024, dtype=torch.bfloat16, device=device)
    residual = torch.randn_like(x)
    weight = torch.randn(1024, device=device)
    x_ref, residual_ref = x.clone(), residual.clone()
    reference.add_rms_norm_(x_ref, residual_ref, weight, EPS)
    N.add_rms_norm_(x, residual, weight, EPS)
    assert_norm_close(x, x_ref, torch.bfloat16)
    assert torch.equal(residual, residual_ref)


def test_add_rms_norm_empty(device):
    x = torch.randn(0, 4096, device=device)
    N.add_rms_norm_(x, torch.randn_like(x), torch.randn(4096, device=device), EPS)


# ------------------------------------------------------------------------------------------------
# qk_norm_rope_ / qk_norm_rope_kv_cache_


def qkv_views(T, Hq, Hk, D, dtype, device, layout="fused"):
    """q [T, Hq, D], k and v [T, Hk, D], plus the buffer they view.

    fused: columns of one [T, (Hq + 2 Hk) D] projection output; misaligned: the same, shifted by one
    element (no 16-byte alignment); head_strided: every head padded to 2 D; contiguous: own tensors.
    """
    if layout == "contiguous":
        q, k, v = (torch.randn(T, h, D, dtype=dtype, device=device) for h in (Hq, Hk, Hk))
        return q, k, v, None
    if layout == "head_strided":
        buf = torch.randn(T, Hq + 2 * Hk, 2 * D, dtype=dtype, device=device)
        return buf[:, :Hq, :D], buf[:, Hq : Hq + Hk, :D], buf[:, Hq + Hk :, :D], buf
    shift = 1 if layout == "misaligned" else 0
    buf = torch.randn(T, (Hq + 2 * Hk) * D + shift, dtype=dtype, device=device)
    body = buf[:, shift:]
    q = body[:, : Hq * D].view(T, Hq, D)
    k = body[:, Hq * D : (Hq + Hk) * D].view(T, Hk, D)
    v = body[:, (Hq + Hk) * D :].view(T, Hk, D)
    return q, k, v, buf


def qk_inputs(T, Hq, Hk, D, dtype, device, layout="fused", P=4096, start=None, w_dtype=None):
    q, k, v, buf = qkv_views(T, Hq, Hk, D, dtype, device, layout)
    w_dtype = w_dtype or dtype
    q_weight = (1 + 0.3 * torch.randn(D, device=device)).to(w_dtype)
    k_weight = (1 + 0.3 * torch.randn(D, device=device)).to(w_dtype)
    cache = build_cos_sin_cache(D, P, 1e7, device=device)
    if start is None:
        positions = torch.randint(0, P, (T,), device=device)
    else:  # decode / chunked prefill: consecutive positions from `start`
        positions = torch.arange(start, start + T, device=device)
    return q, k, v, buf, q_weight, k_weight, positions, cache


def run_reference(q, k, q_weight, k_weight, positions, cache):
    q_ref, k_ref = q.clone(), k.clone()
    reference.qk_norm_rope_(q_ref, k_ref, q_weight, k_weight, positions, cache, EPS)
    return q_ref, k_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128, 256, 96, 2])
@pytest.mark.parametrize("T", [1, 3, 4096])
def test_qk_norm_rope_matches_reference(device, dtype, D, T):
    if device == "cpu" and T == 4096:
        pytest.skip("large shape: GPU only (keeps the CPU suite fast)")
    q, k, v, buf, qw, kw, positions, cache = qk_inputs(T, 4, 2, D, dtype, device)
    v_before = v.clone()
    q_ref, k_ref = run_reference(q, k, qw, kw, positions, cache)
    N.qk_norm_rope_(q, k, qw, kw, positions, cache, EPS)
    assert_qk_close(q, q_ref, dtype, "q")
    assert_qk_close(k, k_ref, dtype, "k")
    assert torch.equal(v, v_before), "v (the rest of the QKV buffer) was modified"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["fused", "misaligned", "head_strided", "contiguous"])
@pytest.mark.parametrize("heads", [(32, 32), (8, 2), (4, 1), (3, 0)])
def test_qk_norm_rope_layouts_and_heads(device, dtype, layout, heads):
    Hq, Hk = heads
    T, D = 5, 128
    q, k, v, buf, qw, kw, positions, cache = qk_inputs(T, Hq, Hk, D, dtype, device, layout)
    q_ref, k_ref = run_reference(q, k, qw, kw, positions, cache)
    if buf is not None:  # which elements of the buffer q and k cover; the rest must stay as they are
        owned = torch.zeros(buf.shape, dtype=torch.uint8, device=device)
        q_owned, k_owned = _views_like(owned, Hq, Hk, D, layout)
        q_owned.fill_(1)
        k_owned.fill_(1)
        owned = owned.bool()
        others_before = buf[~owned].clone()
    N.qk_norm_rope_(q, k, qw, kw, positions, cache, EPS)
    assert_qk_close(q, q_ref, dtype, "q")
    if Hk:
        assert_qk_close(k, k_ref, dtype, "k")
    if buf is not None:
        assert torch.equal(buf[~owned], others_before), "elements outside q and k were modified"


def _views_like(buf, Hq, Hk, D, layout):
    """The q and k views of qkv_views(layout) taken on another buffer of the same shape."""
    T = buf.shape[0]
    if layout == "head_strided":
        return buf[:, :Hq, :D], buf[:, Hq : Hq + Hk, :D]
    body = buf[:, 1 if layout == "misaligned" else 0 :]
    return body[:, : Hq * D].view(T, Hq, D), body[:, Hq * D : (Hq + Hk) * D].view(T, Hk, D)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope_decode_positions(device, dtype):
    # Positions not starting at 0, up to the end of the cache.
    P = 32768
    for start, T in ((1000, 1), (P - 3, 3), (P - 64, 64)):
        q, k, v, buf, qw, kw, positions, cache = qk_inputs(T, 8, 8, 128, dtype, device, P=P, start=start)
        q_ref, k_ref = run_reference(q, k, qw, kw, positions, cache)
        N.qk_norm_rope_(q, k, qw, kw, positions, cache, EPS)
        assert_qk_close(q, q_ref, dtype, f"q at start {start}")
        assert_qk_close(k, k_ref, dtype, f"k at start {start}")


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float16])
def test_qk_norm_rope_weight_of_another_dtype(device, w_dtype):
    q, k, v, buf, qw, kw, positions, cache = qk_inputs(7, 4, 2, 128, torch.bfloat16, device, w_dtype=w_dtype)
    q_ref, k_ref = run_reference(q, k, qw, kw, positions, cache)
    N.qk_norm_rope_(q, k, qw, kw, positions, cache, EPS)
    assert_qk_close(q, q_ref, torch.bfloat16, "q")
    assert_qk_close(k, k_ref, torch.bfloat16, "k")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,layout", [(128, "fused"), (96, "fused"), (64, "misaligned")])
def test_qk_norm_rope_poisons_out_of_range_positions(device, dtype, D, layout):
    # Poison policy: a position outside [0, P) makes every q and k head of its token NaN (never a
    # plausible number, never an out-of-bounds read); the other tokens are as usual.
    P = 64
    q, k, v, buf, qw, kw, positions, cache = qk_inputs(6, 4, 2, D, dtype, device, layout, P=P)
    positions[1], positions[4], positions[5] = P, -1, 2**40
    bad = torch.tensor([1, 4, 5], device=device)
    good = torch.tensor([0, 2, 3], device=device)
    v_before = v.clone()
    q_ref, k_ref = run_reference(q, k, qw, kw, positions, cache)
    assert torch.isnan(q_ref[bad]).all() and torch.isnan(k_ref[bad]).all(), "the reference must poison too"
    q_good, k_good = run_reference(q[good], k[good], qw, kw, positions[good], cache)
    N.qk_norm_rope_(q, k, qw, kw, positions, cache, EPS)
    assert torch.isnan(q[bad]).all() and torch.isnan(k[bad]).all(), "bad positions must poison q and k"
    assert_qk_close(q[good], q_good, dtype, "q")
    assert_qk_close(k[good], k_good, dtype, "k")
    assert_qk_close(q, q_ref, dtype, "q vs reference", equal_nan=True)
    assert torch.equal(v, v_before)
    with pytest.raises(IndexError, match="positions"):
        N.qk_norm_rope_(q, k, qw, kw, positions, cache, EPS, check_positions=True)


def test_qk_norm_rope_empty_table_poisons_everything(device):
    q, k, v, buf, qw, kw, positions, cache = qk_inputs(3, 4, 2, 128, torch.bfloat16, device, "contiguous")
    empty = cache[:0]
    N.qk_norm_rope_(q, k, qw, kw, positions, empty, EPS)
    assert torch.isnan(q).all() and torch.isnan(k).all()


def test_qk_norm_rope_empty(device):
    q, k, v, buf, qw, kw, positions, cache = qk_inputs(0, 4, 2, 128, torch.bfloat16, device)
    N.qk_norm_rope_(q, k, qw, kw, positions, cache, EPS)
    k_cache = torch.zeros(2, 8, 2, 128, dtype=torch.bfloat16, device=device)
    v_cache = torch.zeros_like(k_cache)
    N.qk_norm_rope_kv_cache_(q, k, v, qw, kw, positions, cache, EPS, k_cache, v_cache,
                             torch.zeros(0, dtype=torch.long, device=device), check_positions=True)
    assert not k_cache.any() and not v_cache.any()


def test_qk_norm_rope_kv_cache_empty_cache_poisons_q(device):
    # A cache of zero rows: every cache row is out of range, so every q is poisoned and k is still
    # rotated (an empty tensor has no data pointer; the op must not take that for "no cache").
    q, k, v, buf, qw, kw, positions, cache = qk_inputs(3, 4, 2, 128, torch.bfloat16, device, "contiguous")
    q_ref, k_ref = run_reference(q, k, qw, kw, positions, cache)
    k_cache = torch.zeros(0, 8, 2, 128, dtype=torch.bfloat16, device=device)
    v_cache = torch.zeros_like(k_cache)
    q_r, k_r = q.clone(), k.clone()
    reference.qk_norm_rope_kv_cache_(q_r, k_r, v, qw, kw, positions, cache, EPS, k_cache.clone(), v_cache.clone(),
                                     torch.arange(3, device=device))
    N.qk_norm_rope_kv_cache_(q, k, v, qw, kw, positions, cache, EPS, k_cache, v_cache, torch.arange(3, device=device))
    assert torch.isnan(q).all() and torch.isnan(q_r).all(), "an empty cache must poison every q"
    assert_qk_close(k, k_ref, torch.bfloat16, "k")
    assert_qk_close(k_r, k_ref, torch.bfloat16, "reference k")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,layout", [(128, "fused"), (64, "head_strided"), (256, "contiguous"), (128, "misaligned"),
                                      (96, "fused")])
def test_qk_norm_rope_kv_cache_writes_exactly_target_rows(device, dtype, D, layout):
    B, S, Hq, Hk, T = 3, 16, 8, 2, 5
    q, k, v, buf, qw, kw, positions, cache = qk_inputs(T, Hq, Hk, D, dtype, device, layout)
    k_cache = torch.randn(B, S, Hk, D, dtype=dtype, device=device)
    v_cache = torch.randn(B, S, Hk, D, dtype=dtype, device=device)
    cache_rows = torch.randperm(B * S, device=device)[:T]
    k_cache.view(-1, Hk, D)[cache_rows] = float("nan")  # target rows poisoned: each must be written
    v_cache.view(-1, Hk, D)[cache_rows] = float("nan")
    k_expect, v_expect = k_cache.clone(), v_cache.clone()
    q_ref, k_ref = run_reference(q, k, qw, kw, positions, cache)
    k_expect.view(-1, Hk, D)[cache_rows] = k_ref
    v_expect.view(-1, Hk, D)[cache_rows] = v
    N.qk_norm_rope_kv_cache_(q, k, v, qw, kw, positions, cache, EPS, k_cache, v_cache, cache_rows)
    assert_qk_close(q, q_ref, dtype, "q")
    assert_qk_close(k, k_ref, dtype, "k")
    assert torch.equal(k_cache.view(-1, Hk, D)[cache_rows], k), "cached k differs from the rotated k"
    assert torch.equal(v_cache, v_expect), "v cache: wrong rows written or rows not written"
    others = torch.ones(B * S, dtype=torch.bool, device=device)
    others[cache_rows] = False
    assert torch.equal(k_cache.view(-1, Hk, D)[others], k_expect.view(-1, Hk, D)[others])
    assert torch.isfinite(k_cache).all()


@pytest.mark.parametrize("D,layout", [(128, "fused"), (96, "fused")])
def test_qk_norm_rope_kv_cache_poisons_bad_rows_and_positions(device, D, layout):
    # Poison policy: a bad cache row writes nothing and poisons the token's q (its attention output is
    # NaN); a bad position poisons q and k, and its valid cache row receives that NaN k (and its v).
    Hq, Hk, P, rows = 4, 2, 32, 8
    q, k, v, buf, qw, kw, positions, cache = qk_inputs(5, Hq, Hk, D, torch.bfloat16, device, layout, P=P)
    positions[2] = P + 5  # token 2: bad position, valid row 5
    cache_rows = torch.tensor([0, rows, 5, -1, 2**40], device=device)  # tokens 1, 3, 4: bad rows
    k_cache = torch.randn(rows, Hk, D, dtype=torch.bfloat16, device=device)
    v_cache = torch.randn_like(k_cache)
    k_cache_before, v_cache_before = k_cache.clone(), v_cache.clone()
    # The reference, on copies, must agree element for element (NaN included).
    q_r, k_r, kc_r, vc_r = q.clone(), k.clone(), k_cache.clone(), v_cache.clone()
    reference.qk_norm_rope_kv_cache_(q_r, k_r, v, qw, kw, positions, cache, EPS, kc_r, vc_r, cache_rows)
    good_pos = torch.tensor([0, 1, 3, 4], device=device)
    q_ref, k_ref = run_reference(q[good_pos], k[good_pos], qw, kw, positions[good_pos], cache)
    N.qk_norm_rope_kv_cache_(q, k, v, qw, kw, positions, cache, EPS, k_cache, v_cache, cache_rows)
    poisoned_q = torch.tensor([1, 2, 3, 4], device=device)
    assert torch.isnan(q[poisoned_q]).all(), "a bad cache row or position must poison q"
    assert torch.isnan(k[2]).all(), "a bad position must poison k"
    assert_qk_close(q[0], q_ref[0], torch.bfloat16, "q of the good token")
    assert_qk_close(k[good_pos], k_ref, torch.bfloat16, "k of tokens with a good position")
    assert torch.equal(k_cache[0], k[0]) and torch.equal(v_cache[0], v[0])
    assert torch.isnan(k_cache[5]).all() and torch.equal(v_cache[5], v[2])
    untouched = torch.tensor([1, 2, 3, 4, 6, 7], device=device)
    assert torch.equal(k_cache[untouched], k_cache_before[untouched])
    assert torch.equal(v_cache[untouched], v_cache_before[untouched])
    for got, want, name in ((q, q_r, "q"), (k, k_r, "k"), (k_cache, kc_r, "k_cache"), (v_cache, vc_r, "v_cache")):
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN pattern differs from the reference"
        assert_qk_close(got, want, torch.bfloat16, f"{name} vs reference", equal_nan=True)
    with pytest.raises(IndexError, match="positions"):
        N.qk_norm_rope_kv_cache_(q, k, v, qw, kw, positions, cache, EPS, k_cache, v_cache, cache_rows,
                                 check_positions=True)
    positions[2] = 0
    with pytest.raises(IndexError, match="cache_rows"):
        N.qk_norm_rope_kv_cache_(q, k, v, qw, kw, positions, cache, EPS, k_cache, v_cache, cache_rows,
                                 check_positions=True)
    duplicate_rows = torch.tensor([0, 3, 5, 3, 1], device=device)  # in range, one row twice
    with pytest.raises(ValueError, match="cache_rows holds duplicate rows"):
        N.qk_norm_rope_kv_cache_(q, k, v, qw, kw, positions, cache, EPS, k_cache, v_cache, duplicate_rows,
                                 check_positions=True)


# ------------------------------------------------------------------------------------------------
# In-place arguments that share memory: rejected before anything is written


def test_add_rms_norm_rejects_overlapping_x_before_writing(device):
    H = 64
    weight = torch.randn(H, device=device)
    residual = torch.randn(4, H, device=device)
    before = residual.clone()
    x = torch.randn(1, H, device=device).expand(4, H)  # expanded: every row is the same memory
    with pytest.raises(ValueError, match="x is written in place but some of its elements share memory"):
        N.add_rms_norm_(x, residual, weight, EPS)
    assert torch.equal(residual, before), "residual was modified before the error"
    with pytest.raises(ValueError, match="residual is written in place"):
        N.add_rms_norm_(torch.randn(4, H, device=device), torch.randn(1, H, device=device).expand(4, H), weight, EPS)
    with pytest.raises(ValueError, match="x and residual overlap"):
        N.add_rms_norm_(residual, residual, weight, EPS)
    assert torch.equal(residual, before)
    buf = torch.randn(5, H, device=device)
    buf_before = buf.clone()
    with pytest.raises(ValueError, match="x and residual overlap"):
        N.add_rms_norm_(buf[1:], buf[:-1], weight, EPS)  # rows shifted by one: partial overlap
    assert torch.equal(buf, buf_before)
    # Disjoint views of one buffer are fine (the model's fused layouts).
    buf = torch.randn(4, 2 * H, device=device)
    N.add_rms_norm_(buf[:, :H], buf[:, H:], weight, EPS)


def test_qk_norm_rope_rejects_overlapping_q_k_before_writing(device):
    T, D = 3, 128
    q, k, v, buf, qw, kw, positions, cache = qk_inputs(T, 4, 2, D, torch.bfloat16, device, "fused")
    buf_before = buf.clone()
    body = buf
    q_wide = body[:, : 4 * D].view(T, 4, D)
    k_in_q = body[:, 2 * D : 4 * D].view(T, 2, D)  # k = q's last two heads
    with pytest.raises(ValueError, match="q and k overlap"):
        N.qk_norm_rope_(q_wide, k_in_q, qw, kw, positions, cache, EPS)
    with pytest.raises(ValueError, match="q and k overlap"):
        N.qk_norm_rope_(q, q[:, :2], qw, kw, positions, cache, EPS)
    with pytest.raises(ValueError, match="q is written in place but some of its elements share memory"):
        N.qk_norm_rope_(q[:1].expand(T, 4, D), k, qw, kw, positions, cache, EPS)  # stride-0 q
    with pytest.raises(ValueError, match="k is written in place"):
        N.qk_norm_rope_(q, k[:, :1].expand(T, 2, D), qw, kw, positions, cache, EPS)
    assert torch.equal(buf, buf_before), "q/k were modified before the error"
    k_cache = torch.randn(8, 2, D, dtype=torch.bfloat16, device=device)
    rows = torch.arange(T, device=device)
    with pytest.raises(ValueError, match="k_cache and v_cache overlap"):
        N.qk_norm_rope_kv_cache_(q, k, v, qw, kw, positions, cache, EPS, k_cache, k_cache, rows)
    with pytest.raises(ValueError, match="k and v overlap"):
        N.qk_norm_rope_kv_cache_(q, k, k, qw, kw, positions, cache, EPS, k_cache, k_cache.clone(), rows)
    assert torch.equal(buf, buf_before)


# ------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_raise_clear_errors(device):
    x = torch.randn(4, 64, device=device)
    w = torch.randn(64, device=device)
    with pytest.raises(TypeError, match="x must have dtype"):
        N.rms_norm(x.long(), w, EPS)
    with pytest.raises(ValueError, match="weight must have shape"):
        N.rms_norm(x, torch.randn(63, device=device), EPS)
    with pytest.raises(TypeError, match="weight must have dtype"):
        N.rms_norm(x, w.int(), EPS)
    with pytest.raises(ValueError, match="residual must have shape"):
        N.add_rms_norm_(x, torch.randn(4, 32, device=device), w, EPS)
    with pytest.raises(TypeError, match="residual must have dtype"):
        N.add_rms_norm_(x, x.half(), w, EPS)

    q, k, v, buf, qw, kw, positions, cache = qk_inputs(3, 4, 2, 128, torch.bfloat16, device)
    q_odd = torch.randn(3, 4, 127, dtype=torch.bfloat16, device=device)
    k_odd = torch.randn(3, 2, 127, dtype=torch.bfloat16, device=device)
    w_odd = torch.randn(127, device=device)
    with pytest.raises(ValueError, match="head_dim"):
        N.qk_norm_rope_(q_odd, k_odd, w_odd, w_odd, positions, torch.randn(8, 127, device=device), EPS)
    with pytest.raises(TypeError, match="positions must have dtype"):
        N.qk_norm_rope_(q, k, qw, kw, positions.int(), cache, EPS)
    with pytest.raises(ValueError, match="positions must have shape"):
        N.qk_norm_rope_(q, k, qw, kw, positions[:2], cache, EPS)
    with pytest.raises(TypeError, match="cos_sin_cache must have dtype"):
        N.qk_norm_rope_(q, k, qw, kw, positions, cache.double(), EPS)
    with pytest.raises(ValueError, match="cos_sin_cache must have shape"):
        N.qk_norm_rope_(q, k, qw, kw, positions, cache[:, :64], EPS)
    with pytest.raises(ValueError, match="k must have shape"):
        N.qk_norm_rope_(q, k[:, :, :64], qw, kw, positions, cache, EPS)
    with pytest.raises(TypeError, match="k must have dtype"):
        N.qk_norm_rope_(q, k.float(), qw, kw, positions, cache, EPS)
    with pytest.raises(ValueError, match="q_weight must have shape"):
        N.qk_norm_rope_(q, k, qw[:64], kw, positions, cache, EPS)
    with pytest.raises(ValueError, match="q must have a contiguous last dimension"):
        N.qk_norm_rope_(q.transpose(1, 2).contiguous().transpose(1, 2), k, qw, kw, positions, cache, EPS)
    with pytest.raises(IndexError, match="positions"):
        N.qk_norm_rope_(q, k, qw, kw, positions + 4096, cache, EPS, check_positions=True)

    k_cache = torch.randn(8, 2, 128, dtype=torch.bfloat16, device=device)
    rows = torch.arange(3, device=device)
    with pytest.raises(ValueError, match=r"k_cache must have shape \[\.\.\., 2, 128\]"):
        N.qk_norm_rope_kv_cache_(q, k, v, qw, kw, positions, cache, EPS, k_cache[:, :1], k_cache[:, :1], rows)
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        nc = torch.randn(2, 8, 2, 128, dtype=torch.bfloat16, device=device).transpose(0, 1)
        N.qk_norm_rope_kv_cache_(q, k, v, qw, kw, positions, cache, EPS, nc, nc, rows)
    with pytest.raises(ValueError, match="v_cache must have k_cache's shape"):
        N.qk_norm_rope_kv_cache_(q, k, v, qw, kw, positions, cache, EPS, k_cache, k_cache[:4], rows)
    with pytest.raises(TypeError, match="cache_rows must have dtype"):
        N.qk_norm_rope_kv_cache_(q, k, v, qw, kw, positions, cache, EPS, k_cache, k_cache.clone(), rows.int())
    with pytest.raises(ValueError, match="v must have shape"):
        N.qk_norm_rope_kv_cache_(q, k, v[:, :1], qw, kw, positions, cache, EPS, k_cache, k_cache.clone(), rows)
    # A negative or non-finite eps would give plausible numbers (or partial NaN): every op refuses it.
    for bad in (-1e-6, float("inf"), float("nan")):
        for call in (lambda: N.rms_norm(x, w, bad), lambda: N.add_rms_norm_(x, x.clone(), w, bad),
                     lambda: N.qk_norm_rope_(q, k, qw, kw, positions, cache, bad),
                     lambda: N.qk_norm_rope_kv_cache_(q, k, v, qw, kw, positions, cache, bad, k_cache,
                                                      k_cache.clone(), rows),
                     lambda: torch.ops.dots1_ext.rms_norm.default(x, w, bad)):
            with pytest.raises(ValueError, match="eps must be finite and >= 0"):
                call()


@requires_cuda
def test_device_mismatch_raises():
    x = torch.randn(4, 64, device="cuda")
    with pytest.raises((ValueError, RuntimeError), match="weight must be on the same device as x"):
        N.rms_norm(x, torch.randn(64), EPS)
    q, k, v, buf, qw, kw, positions, cache = qk_inputs(3, 4, 2, 128, torch.bfloat16, "cuda")
    with pytest.raises((ValueError, RuntimeError), match="positions must be on the same device as q"):
        N.qk_norm_rope_(q, k, qw, kw, positions.cpu(), cache, EPS)


# ------------------------------------------------------------------------------------------------
# opcheck, torch.compile


def _opcheck_cases(device):
    x = torch.randn(5, 256, device=device, dtype=torch.bfloat16)
    w = torch.randn(256, device=device, dtype=torch.bfloat16)
    # q, k, v as separate tensors: opcheck clones inputs, and aliasing graph inputs are another test's job.
    q, k, v, buf, qw, kw, positions, cache = qk_inputs(3, 4, 2, 128, torch.bfloat16, device, "contiguous")
    k_cache = torch.randn(2, 4, 2, 128, dtype=torch.bfloat16, device=device)
    return {
        "rms_norm": (x, w, EPS),
        "add_rms_norm_": (x.clone(), torch.randn_like(x), w, EPS),
        "qk_norm_rope_": (q, k, qw, kw, positions, cache, EPS),
        "qk_norm_rope_kv_cache_": (q, k, v, qw, kw, positions, cache, EPS, k_cache, torch.randn_like(k_cache),
                                   torch.tensor([7, 0, 3], device=device)),
    }


@pytest.mark.parametrize("name", ["rms_norm", "add_rms_norm_", "qk_norm_rope_", "qk_norm_rope_kv_cache_"])
def test_opcheck(device, name):
    args = _opcheck_cases(device)[name]
    torch.library.opcheck(getattr(torch.ops.dots1_ext, name).default, args)


def _layer_front(x, residual, w, w_qkv, qw, kw, positions, cache, k_cache, v_cache, cache_rows):
    # T = tokens; q, k, v are views of one fused projection output, as in the model.
    N.add_rms_norm_(x, residual, w, EPS)
    qkv = x @ w_qkv.t()
    T = qkv.shape[0]
    q = qkv[:, :512].view(T, 4, 128)
    k = qkv[:, 512:768].view(T, 2, 128)
    v = qkv[:, 768:].view(T, 2, 128)
    N.qk_norm_rope_kv_cache_(q, k, v, qw, kw, positions, cache, EPS, k_cache, v_cache, cache_rows)
    return N.rms_norm(residual, w, EPS), q, k


def test_under_torch_compile(device):
    # CPU: aot_eager (exercises the fakes and functionalisation cheaply); CUDA: inductor + CUDA graphs.
    backend = "inductor" if device == "cuda" else "aot_eager"
    mode = "reduce-overhead" if device == "cuda" else None
    fn = torch.compile(_layer_front, backend=backend, mode=mode, fullgraph=True)
    dt = torch.bfloat16
    x = torch.randn(4, 256, device=device, dtype=dt)
    residual = torch.randn_like(x)
    w = torch.randn(256, device=device, dtype=dt)
    w_qkv = torch.randn(1024, 256, device=device, dtype=dt) / 16
    qw, kw = torch.randn(128, device=device, dtype=dt), torch.randn(128, device=device, dtype=dt)
    positions = torch.tensor([5, 6, 7, 8], device=device)
    cache = build_cos_sin_cache(128, 64, 1e7, device=device)
    k_cache = torch.zeros(16, 2, 128, device=device, dtype=dt)
    cache_rows = torch.tensor([1, 3, 5, 7], device=device)
    state = (x, residual, k_cache, torch.zeros_like(k_cache))

    def call(f):
        xs, rs, kc, vc = (t.clone() for t in state)
        outs = f(xs, rs, w, w_qkv, qw, kw, positions, cache, kc, vc, cache_rows)
        return [*outs, xs, rs, kc, vc]

    expect = call(_layer_front)
    for _ in range(3):  # several calls: record, then replay the CUDA graph
        got = call(fn)
        for i, (g, e) in enumerate(zip(got, expect)):
            # Inductor may fuse the projection differently from eager: compare with a tolerance.
            assert_close_rel(g, e, RTOL[dt], f"output {i}")
