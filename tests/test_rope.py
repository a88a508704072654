"""The fp32 cos/sin cache against fp64, where precision matters: rope_theta 1e7, positions near 32768.

At theta 1e7 the lowest frequencies are tiny but the highest is 1 rad/position, so the angle at
position ~32767 is ~32767 rad; an fp32 product p * inv_freq there is off by up to ~2e-3 rad. The
cache computes angles in fp64 and rounds only cos/sin to fp32.
"""

from __future__ import annotations

import math

import pytest
import torch

from dots1_ext import reference
from dots1_ext.ops import norm as N
from dots1_ext.rope import build_cos_sin_cache, inv_freq
from tests.conftest import requires_cuda

THETA, D, P = 1e7, 128, 32768
TAIL = list(range(P - 16, P))


def cos_sin_fp64(positions, head_dim=D, theta=THETA, scale=1.0) -> torch.Tensor:
    """[len(positions), D] fp64 from scalar math (independent of the code under test)."""
    rows = []
    for p in positions:
        angles = [(p / scale) * theta ** (-2.0 * i / head_dim) for i in range(head_dim // 2)]
        rows.append([math.cos(a) for a in angles] + [math.sin(a) for a in angles])
    return torch.tensor(rows, dtype=torch.float64)


def test_cache_tail_matches_fp64():
    cache = build_cos_sin_cache(D, P, THETA)
    assert cache.dtype == torch.float32 and cache.shape == (P, D)
    err = (cache[TAIL].double() - cos_sin_fp64(TAIL)).abs().max().item()
    assert err < 1.2e-7, f"cos/sin near position {P} off by {err:.2e} (fp32 rounding is <= 6e-8)"


def test_fp32_angles_would_fail():
    # The check above can fail: the HF-style fp32 computation of the same table misses it by far.
    pos = torch.tensor(TAIL, dtype=torch.float32)
    angles = pos[:, None] * inv_freq(D, THETA).float()[None, :]
    naive = torch.cat((angles.cos(), angles.sin()), dim=-1)
    err = (naive.double() - cos_sin_fp64(TAIL)).abs().max().item()
    assert err > 1e-4


def test_cache_rows_are_unit_circle_and_start_at_identity():
    cache = build_cos_sin_cache(D, 1024, THETA).double()
    assert torch.allclose(cache[:, : D // 2] ** 2 + cache[:, D // 2 :] ** 2, torch.ones(1024, D // 2, dtype=torch.float64),
                          atol=3e-7)
    assert torch.equal(cache[0, : D // 2], torch.ones(D // 2, dtype=torch.float64))
    assert torch.equal(cache[0, D // 2 :], torch.zeros(D // 2, dtype=torch.float64))


def test_linear_scaling():
    cache = build_cos_sin_cache(64, 4096, 1e4, {"rope_type": "linear", "factor": 4.0})
    positions = [0, 3, 4095]
    err = (cache[positions].double() - cos_sin_fp64(positions, 64, 1e4, scale=4.0)).abs().max().item()
    assert err < 1.2e-7


def test_dynamic_equals_default_within_original_length():
    default = build_cos_sin_cache(D, 2048, THETA)
    dynamic = build_cos_sin_cache(D, 2048, THETA, {"rope_type": "dynamic", "factor": 2.0})
    assert torch.equal(default, dynamic)
    with pytest.raises(NotImplementedError, match="dynamic"):
        build_cos_sin_cache(D, 4096, THETA, {"rope_type": "dynamic", "factor": 2.0,
                                             "original_max_position_embeddings": 2048})


def test_default_type_spellings():
    base = build_cos_sin_cache(D, 16, THETA)
    for scaling in (None, {}, {"rope_type": "default", "rope_theta": THETA}, {"type": "default"}):
        assert torch.equal(build_cos_sin_cache(D, 16, THETA, scaling), base)


def test_unsupported_and_bad_arguments_raise():
    with pytest.raises(NotImplementedError, match="yarn"):
        build_cos_sin_cache(D, 16, THETA, {"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="even"):
        build_cos_sin_cache(127, 16, THETA)
    with pytest.raises(ValueError, match="max_positions"):
        build_cos_sin_cache(D, 0, THETA)
    # Each bad value is named; none gives a plausible table (negated angles) or an all-NaN one.
    for args, name in (((-2, 16, THETA), "head_dim"), ((D, 8.5, THETA), "max_positions"),
                       ((D, True, THETA), "max_positions"), ((D, 16, 0.0), "rope_theta"),
                       ((D, 16, -1e4), "rope_theta"), ((D, 16, float("nan")), "rope_theta")):
        with pytest.raises(ValueError, match=name):
            build_cos_sin_cache(*args)
    for factor in (-2.0, 0.0, float("nan"), float("inf"), None, "2"):
        with pytest.raises(ValueError, match="factor"):
            build_cos_sin_cache(D, 16, THETA, {"rope_type": "linear", "factor": factor})
    with pytest.raises(ValueError, match="factor"):
        build_cos_sin_cache(D, 16, THETA, {"rope_type": "linear"})
    assert torch.equal(build_cos_sin_cache(D, 16, 10000), build_cos_sin_cache(D, 16, 10000.0))  # an int theta


def test_bad_rope_scaling_fields_are_named():
    with pytest.raises(ValueError, match="rope_scaling must be a dict .*got 'linear'"):
        build_cos_sin_cache(D, 16, THETA, "linear")
    for partial in ("x", 0, -0.5, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=f"partial_rotary_factor must be a number in \\(0, 1\\].*got {partial!r}"):
            build_cos_sin_cache(D, 16, THETA, {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": partial})
    for original in (-5, 0, "abc", 16.0, True):
        why = f"original_max_position_embeddings must be a positive integer.*got {original!r}"
        with pytest.raises(ValueError, match=why):
            build_cos_sin_cache(D, 16, THETA, {"rope_type": "dynamic", "factor": 2.0,
                                               "original_max_position_embeddings": original})
    with pytest.raises(ValueError, match="'dynamic' needs a finite factor > 0, got None"):
        build_cos_sin_cache(D, 16, THETA, {"rope_type": "dynamic"})
    with pytest.raises(NotImplementedError, match="per-layer-type.*full_attention"):
        build_cos_sin_cache(D, 16, THETA, {"full_attention": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match=r"rope_theta=10000000.0 differs from rope_scaling's rope_theta=500000.0"):
        build_cos_sin_cache(D, 16, THETA, {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5})


def test_partial_rotary_factor_one_or_ignored_by_default_rope():
    base = build_cos_sin_cache(D, 16, THETA)
    linear = {"rope_type": "linear", "factor": 2.0}
    assert torch.equal(build_cos_sin_cache(D, 16, THETA, {**linear, "partial_rotary_factor": 1.0}),
                       build_cos_sin_cache(D, 16, THETA, linear))
    # transformers' Dots1 default RoPE rotates the whole head whatever the factor; its linear one does not.
    assert torch.equal(build_cos_sin_cache(D, 16, THETA, {"rope_type": "default", "partial_rotary_factor": 0.5}), base)
    with pytest.raises(NotImplementedError, match="partial_rotary_factor=0.5"):
        build_cos_sin_cache(D, 16, THETA, {**linear, "partial_rotary_factor": 0.5})


def test_null_rope_type_is_default_and_falls_back_on_type():
    base = build_cos_sin_cache(D, 16, THETA)
    assert torch.equal(build_cos_sin_cache(D, 16, THETA, {"rope_type": None}), base)
    assert torch.equal(build_cos_sin_cache(D, 16, THETA, {"rope_type": None, "type": "linear", "factor": 2.0}),
                       build_cos_sin_cache(D, 16, THETA, {"rope_type": "linear", "factor": 2.0}))


def _rope_fp64(x: torch.Tensor, positions) -> torch.Tensor:
    """fp64 RoPE of already-normalised fp64 x [T, H, D] with exact cos/sin."""
    cs = cos_sin_fp64(positions)
    cos, sin = cs[:, None, : D // 2], cs[:, None, D // 2 :]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _check_op_at_tail(device):
    T, H = len(TAIL), 4
    q = torch.randn(T, H, D, device=device)
    k = torch.randn(T, H, D, device=device)
    w = torch.ones(D, device=device)
    positions = torch.tensor(TAIL, device=device)
    cache = build_cos_sin_cache(D, P, THETA, device=device)
    # The norm in fp64 is the reference's up to fp32 rounding; the rotation is what is tested here.
    normed = reference.rms_norm(q, w, 1e-5).double().cpu()
    N.qk_norm_rope_(q, k, w, w, positions, cache, 1e-5)
    expect = _rope_fp64(normed, TAIL)
    err = ((q.double().cpu() - expect).norm() / expect.norm()).item()
    assert err < 1e-6, f"RoPE near position {P}: relative error {err:.2e}"


def test_op_rope_at_the_end_of_the_range_cpu():
    _check_op_at_tail("cpu")


@requires_cuda
def test_op_rope_at_the_end_of_the_range_cuda():
    _check_op_at_tail("cuda")
