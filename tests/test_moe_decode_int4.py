"""moe_decode_int4_gate_up / moe_decode_int4_down (int4 routed experts, W4A16) against the bf16 decode
ops and the fp32 reference on the dequantized weights (dots1_ext.quant.dequantize_int4).

The contract: exactly the bf16 ops on the dequantized weights (each element (u - z) * s rounded once
to the activations' dtype). On the CPU the op dequantizes each touched expert and runs the bf16 ops'
CPU math: bitwise equal to moe_decode_* on the dequantized weights. On CUDA the kernels dequantize in
registers (the same values, exactly) and differ from the bf16 kernels only in fp32 summation order
(one 128-k group per warp step instead of 32 k): per row within ROW_RTOL (two ulps at the row's largest
value) of the fp32 reference computed from the dequantized weights, as the bf16 tests.

CUDA paths: the tensor-core kernels (bf16; 1, 2 or 4 n-tiles; HF and interleaved gate_up rows;
symmetric and asymmetric), the fallback kernels (fp16 / fp32, DOTS1_EXT_MOE_DECODE_KERNEL=simple, k
past 512 pairs). Memory check: tests/sanitize_moe_decode_int4.py.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch

import dots1_ext  # noqa: F401  (registers the ops)
from dots1_ext import reference
from dots1_ext.ops.moe_decode_int4 import moe_decode_int4_down, moe_decode_int4_gate_up
from dots1_ext.quant import Int4Weight, dequantize_int4, quantize_int4

sys.path.insert(0, os.path.dirname(__file__))
from conftest import assert_rows_close, capture_cuda_graph, replay_poisoned, requires_cuda, set_env  # noqa: E402
from test_moe_decode import (SMALL_LAUNCHES, assert_bad_rows_nan, assert_same_bits,  # noqa: E402
                             check_hidden_settled_same_bits, check_outputs, decode_inputs, distinct_ids,
                             redraw_ids_, ref_gate_up, run_both, small_launch_inputs, topk_weights)

REAL = dict(E=128, k=6, H=4096, I=1408, Is=2816)


class Int4Weights:
    """Random experts quantized to int4 (gate_up's three tensors interleaved like the bf16 weight for
    "swiglu_interleaved"), their dequantized copies in ``dtype`` (the reference's weights) and bf16
    shared experts."""

    def __init__(self, E, H, I, Is, dtype, device, epilogue="swiglu_interleaved", symmetric=False, scale=1.0):
        self.E, self.H, self.I, self.Is, self.epilogue, self.dtype = E, H, I, Is, epilogue, dtype
        g = quantize_int4(torch.randn(E, 2 * I, H, device=device) * (scale / H**0.5), symmetric=symmetric)
        if epilogue == "swiglu_interleaved":
            g = Int4Weight(*(None if t is None else reference.interleave_gate_up(t) for t in
                             (g.qweight, g.scales, g.zeros)))
        self.gate_up = g
        self.down = quantize_int4(torch.randn(E, H, I, device=device) / max(I, 1) ** 0.5, symmetric=symmetric)
        self.gate_up_dq = dequantize_int4(g, dtype)
        self.down_dq = dequantize_int4(self.down, dtype)
        self.shared_gate_up = (torch.randn(2 * Is, H, device=device) / H**0.5).to(dtype) if Is else None
        self.shared_down = (torch.randn(H, Is, device=device) / Is**0.5).to(dtype) if Is else None

    @property
    def dequantized(self):
        """The same layer with the dequantized routed experts, shaped as test_moe_decode.Weights (what its
        reference and the bf16 ops take)."""
        return SimpleNamespace(E=self.E, H=self.H, I=self.I, Is=self.Is, epilogue=self.epilogue,
                               gate_up=self.gate_up_dq, down=self.down_dq, shared_gate_up=self.shared_gate_up,
                               shared_down=self.shared_down)

    def gate_up_args(self):
        return self.gate_up.qweight, self.gate_up.scales, self.gate_up.zeros

    def down_args(self):
        return self.down.qweight, self.down.scales, self.down.zeros


def run_int4(hidden, w: Int4Weights, ids, weights, residual):
    act = moe_decode_int4_gate_up(hidden, *w.gate_up_args(), ids, w.shared_gate_up, w.epilogue)
    out = moe_decode_int4_down(act, *w.down_args(), ids, weights, w.shared_down, residual)
    return act, out


def check_pair(hidden, w, ids, weights, residual, what="", equal_nan=False):
    """Runs the int4 ops; per row against the fp32 reference on the dequantized weights; on the CPU also
    bitwise against the bf16 ops on the dequantized weights (what the int4 ops must equal)."""
    act, out = run_int4(hidden, w, ids, weights, residual)
    check_outputs(act, out, hidden, w.dequantized, ids, weights, residual, hidden.dtype, what, equal_nan)
    if hidden.device.type == "cpu":
        act_dq, out_dq = run_both(hidden, w.dequantized, ids, weights, residual)
        assert_same_bits(act, act_dq, what)
        assert_same_bits(out, out_dq, what)
    return act, out


def switch_case(shape, T, symmetric):
    """The same-bits tests' case: bf16 int4 weights of shape (E, H, I, Is) and a T-token decode batch
    (top-k of the real shape) on CUDA -> (weights, (hidden, ids, topk weights, residual))."""
    E, H, I, Is = shape
    w = Int4Weights(E, H, I, Is, torch.bfloat16, "cuda", symmetric=symmetric)
    return w, decode_inputs(T, REAL["k"], E, H, torch.bfloat16, "cuda")


# ---------------------------------------------------------------- any device


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("T", [0, 1, 2, 8, 16, 17, 64, 65])
@pytest.mark.parametrize("epilogue", ["swiglu", "swiglu_interleaved"])
def test_matches_dequantized_reference(device, symmetric, T, epilogue):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu" and T > 17 and epilogue == "swiglu":
        pytest.skip("keeps the CPU suite short")
    E, k, H, I, Is = 12, 3, 256, 128, 64
    w = Int4Weights(E, H, I, Is, dtype, device, epilogue, symmetric)
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, device)
    check_pair(hidden, w, ids, weights, residual, f"T={T} symmetric={symmetric}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(device, dtype):
    # The dequantized values are rounded to the activations' dtype, then the bf16 ops' math (on CUDA fp16
    # and fp32 run the fallback kernels).
    E, k, H, I, Is, T = 8, 2, 128, 128, 32, 5
    w = Int4Weights(E, H, I, Is, dtype, device)
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, device)
    check_pair(hidden, w, ids, weights, residual, str(dtype))


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_optional_shared_and_residual(device, shared, with_residual):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    E, k, H, I, Is, T = 8, 2, 128, 128, 48 if shared else 0, 6
    w = Int4Weights(E, H, I, Is, dtype, device)
    hidden = torch.randn(T, H, device=device).to(dtype)
    ids = distinct_ids(T, k, E, device)
    residual = torch.randn(T, H, device=device).to(dtype) if with_residual else None
    check_pair(hidden, w, ids, topk_weights(T, k, device), residual, f"shared={shared} residual={with_residual}")


@pytest.mark.parametrize("routing", ["one_expert_for_all", "all_same_id", "duplicates_in_row", "k1", "k8"])
@pytest.mark.parametrize("T", [1, 8, 16, 64])
def test_routing_patterns(device, routing, T):
    # Hot experts: one_expert_for_all gives expert 7 every token (several items at T = 64), all_same_id
    # puts every pair on one expert; k8 at T = 64 is 512 pairs (the most one launch takes).
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    E, H, I, Is = 10, 128, 128, 32
    k = {"k1": 1, "k8": 8}.get(routing, 4)
    ids = distinct_ids(T, k, E, "cpu")
    if routing == "one_expert_for_all":
        ids = torch.stack([torch.cat([torch.tensor([7]), p[p != 7][: k - 1]]) for p in
                           (torch.randperm(E) for _ in range(T))]).to(torch.int32)
    elif routing == "all_same_id":
        ids = torch.full((T, k), 3, dtype=torch.int32)
    elif routing == "duplicates_in_row":
        ids[:, 1] = ids[:, 0]
    ids = ids.to(device)
    w = Int4Weights(E, H, I, Is, dtype, device)
    hidden = torch.randn(T, H, device=device).to(dtype)
    check_pair(hidden, w, ids, topk_weights(T, k, device), torch.randn(T, H, device=device).to(dtype), routing)


@pytest.mark.parametrize("T", [6, 64])
def test_bad_ids_poison_only_their_slots(device, T):
    # The bf16 ops' contract: NaN in the bad pair's act columns, the bad token's whole output row.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    E, k, H, I, Is = 8, 3, 128, 128, 32
    w = Int4Weights(E, H, I, Is, dtype, device)
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, device)
    bad = {(1, 2): -1, (3, 0): E, (4, 1): 2**30}
    if T > 6:
        bad.update({(40, 1): -(2**31), (T - 1, 0): E + 1})
    for (t, j), v in bad.items():
        ids[t, j] = v
    act, out = check_pair(hidden, w, ids, weights, residual, "bad ids", equal_nan=True)
    act_nan = act.isnan()
    for t in range(T):
        for j in range(k):
            cols = act_nan[t, j * I:(j + 1) * I]
            assert bool(cols.all()) == ((t, j) in bad) and bool(cols.any()) == ((t, j) in bad), (t, j)
        assert not act_nan[t, k * I:].any()
        assert bool(out[t].isnan().all()) == (t in {tt for tt, _ in bad})
    with pytest.raises(IndexError, match="topk_ids"):
        moe_decode_int4_gate_up(hidden, *w.gate_up_args(), ids, w.shared_gate_up, w.epilogue, check_ids=True)
    with pytest.raises(IndexError, match="topk_ids"):
        moe_decode_int4_down(act, *w.down_args(), ids, weights, w.shared_down, residual, check_ids=True)


@pytest.mark.parametrize("T", [16, 64])
def test_deterministic(device, T):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    E, k, H, I, Is = 16, 6, 256, 128, 64
    w = Int4Weights(E, H, I, Is, dtype, device)
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, device)
    a1, o1 = run_int4(hidden, w, ids, weights, residual)
    a2, o2 = run_int4(hidden, w, ids, weights, residual)
    assert torch.equal(a1, a2) and torch.equal(o1, o2)


def test_bad_inputs_raise(device):
    E, k, H, I, Is, T = 4, 2, 128, 128, 16, 3
    w = Int4Weights(E, H, I, Is, torch.float32, device)
    x = torch.randn(T, H, device=device)
    ids = distinct_ids(T, k, E, device)
    wts = topk_weights(T, k, device)
    q, s, z = w.gate_up_args()
    for bad in ("yes", 1):
        with pytest.raises(TypeError, match="hidden_settled must be a bool"):
            moe_decode_int4_gate_up(x, q, s, z, ids, hidden_settled=bad)
    with pytest.raises(RuntimeError, match="bool.*hidden_settled"):  # the schema's own check
        torch.ops.dots1_ext.moe_decode_int4_gate_up.default(x, q, s, z, ids, None, "swiglu_interleaved", "yes")
    with pytest.raises(TypeError, match="gate_up_qweight"):
        moe_decode_int4_gate_up(x, q.to(torch.int8), s, z, ids)
    with pytest.raises(TypeError, match="gate_up_scales"):
        moe_decode_int4_gate_up(x, q, s.float(), z, ids)
    with pytest.raises(ValueError, match="gate_up_scales"):
        moe_decode_int4_gate_up(x, q, s[:, :1].contiguous(), z, ids)
    with pytest.raises(TypeError, match="gate_up_zeros"):
        moe_decode_int4_gate_up(x, q, s, z.int(), ids)
    with pytest.raises(ValueError, match="gate_up_zeros"):
        moe_decode_int4_gate_up(x, q, s, z[:1].contiguous(), ids)
    with pytest.raises(ValueError, match="multiple of the int4 group size 128"):
        moe_decode_int4_gate_up(x[:, :96], q[:, :, :48].contiguous(), s[:, :, :1].contiguous(),
                                z[:, :, :1].contiguous(), ids)
    with pytest.raises(ValueError, match=r"gate_up_qweight must have shape \[E, 2I, H/2\]"):
        moe_decode_int4_gate_up(torch.randn(T, 2 * H, device=device), q, s, z, ids)
    with pytest.raises(ValueError, match="gate_up_qweight must be contiguous"):
        moe_decode_int4_gate_up(x, q.transpose(0, 1).contiguous().transpose(0, 1), s, z, ids)
    misaligned = torch.empty(q.numel() + 1, dtype=torch.uint8, device=device)[1:].view_as(q)
    with pytest.raises(ValueError, match="gate_up_qweight must start at a 16-byte aligned address"):
        moe_decode_int4_gate_up(x, misaligned, s, z, ids)
    with pytest.raises(ValueError, match="epilogue"):
        moe_decode_int4_gate_up(x, q, s, z, ids, epilogue="none")
    with pytest.raises(TypeError, match="topk_ids"):
        moe_decode_int4_gate_up(x, q, s, z, ids.long())
    with pytest.raises(TypeError, match="hidden"):
        moe_decode_int4_gate_up(x.long(), q, s, z, ids)
    with pytest.raises(TypeError, match="shared_gate_up"):
        moe_decode_int4_gate_up(x, q, s, z, ids, w.shared_gate_up.half())
    # The op itself (not only the wrapper) checks.
    with pytest.raises(ValueError, match="gate_up_scales"):
        torch.ops.dots1_ext.moe_decode_int4_gate_up(x, q, s[:, :-1].contiguous(), z, ids, None, "swiglu")

    act = moe_decode_int4_gate_up(x, q, s, z, ids, w.shared_gate_up)
    dq, ds, dz = w.down_args()
    with pytest.raises(TypeError, match="down_qweight"):
        moe_decode_int4_down(act, dq.float(), ds, dz, ids, wts, w.shared_down)
    with pytest.raises(ValueError, match="down_scales"):
        moe_decode_int4_down(act, dq, ds[:1].contiguous(), dz, ids, wts, w.shared_down)
    with pytest.raises(ValueError, match="act must have shape"):
        moe_decode_int4_down(act, dq, ds, dz, ids, wts)  # shared columns without shared_down
    with pytest.raises(ValueError, match="act must have shape"):
        torch.ops.dots1_ext.moe_decode_int4_down(act[:, 1:], dq, ds, dz, ids, wts, w.shared_down, None)
    with pytest.raises(TypeError, match="topk_weights"):
        moe_decode_int4_down(act, dq, ds, dz, ids, wts.half(), w.shared_down)
    with pytest.raises(ValueError, match="residual"):
        moe_decode_int4_down(act, dq, ds, dz, ids, wts, w.shared_down, torch.randn(T, H + 1, device=device))
    with pytest.raises(ValueError, match="multiple of the int4 group size 128"):
        moe_decode_int4_down(act, dq[:, :, :32].contiguous(), ds[:, :, :1].contiguous(), dz[:, :, :1].contiguous(),
                             ids, wts, w.shared_down)
    routed, shared = act[:, : k * I], act[:, k * I :]
    with pytest.raises(ValueError, match="shared_act needs shared_down"):
        moe_decode_int4_down(routed, dq, ds, dz, ids, wts, shared_act=shared)
    with pytest.raises(ValueError, match="shared_act"):
        torch.ops.dots1_ext.moe_decode_int4_down(routed, dq, ds, dz, ids, wts, w.shared_down, None, shared[:-1])
    with pytest.raises(ValueError, match=r"act must have shape \[T, k\*I\]"):
        moe_decode_int4_down(act, dq, ds, dz, ids, wts, w.shared_down, shared_act=shared)
    if device == "cuda":
        with pytest.raises(ValueError, match="same device"):
            moe_decode_int4_gate_up(x, q, s.cpu(), z, ids)
        with pytest.raises(ValueError, match="same device"):
            moe_decode_int4_down(act, dq, ds, dz, ids.cpu(), wts, w.shared_down)
        with pytest.raises(TypeError, match="shared_act"):
            moe_decode_int4_down(routed, dq, ds, dz, ids, wts, w.shared_down, shared_act=shared.half())


@pytest.mark.parametrize("T", [1, 5, 9, 65])
def test_shared_act_apart_same_bits(device, T):
    # test_moe_decode's case on int4 experts: down with the shared columns given apart (shared_act) is
    # bitwise down with them in act, poison included.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    E, k, H, I, Is = 6, 2, 128, 128, 48
    w = Int4Weights(E, H, I, Is, dtype, device)
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, device)
    ids[T // 2, 0] = -1
    act = moe_decode_int4_gate_up(hidden, *w.gate_up_args(), ids, w.shared_gate_up, w.epilogue)
    out = moe_decode_int4_down(act, *w.down_args(), ids, weights, w.shared_down, residual)
    apart = moe_decode_int4_down(act[:, : k * I].contiguous(), *w.down_args(), ids, weights, w.shared_down, residual,
                                 shared_act=act[:, k * I :].contiguous())
    assert out[T // 2].isnan().all()
    assert_same_bits(apart, out, f"T={T}")


@pytest.mark.parametrize("T", [1, 9, 65])
def test_hidden_settled_same_bits(device, T):
    # test_moe_decode's case on int4 experts: hidden_settled (the first shared tile before the PDL wait,
    # launched right after the router as in the model) changes no bit, poison included.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    E, k, H, I, Is = 16, 4, 256, 128, 96
    w = Int4Weights(E, H, I, Is, dtype, device)

    def gate_up(x, ids, settled):
        return moe_decode_int4_gate_up(x, *w.gate_up_args(), ids, w.shared_gate_up, w.epilogue,
                                       hidden_settled=settled)

    check_hidden_settled_same_bits(gate_up, T, k, E, H, I, dtype, device, 0, -1)


@pytest.mark.parametrize("symmetric", [False, True])
def test_opcheck(device, symmetric):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    E, k, H, I, Is, T = 6, 2, 128, 128, 16, 4
    w = Int4Weights(E, H, I, Is, dtype, device, symmetric=symmetric)
    hidden = torch.randn(T, H, device=device).to(dtype)
    ids = distinct_ids(T, k, E, device)
    for settled in (False, True):
        torch.library.opcheck(torch.ops.dots1_ext.moe_decode_int4_gate_up.default,
                              (hidden, *w.gate_up_args(), ids, w.shared_gate_up, "swiglu_interleaved", settled))
    act = moe_decode_int4_gate_up(hidden, *w.gate_up_args(), ids, w.shared_gate_up)
    torch.library.opcheck(torch.ops.dots1_ext.moe_decode_int4_down.default,
                          (act, *w.down_args(), ids, topk_weights(T, k, device), w.shared_down,
                           torch.randn(T, H, device=device).to(dtype)))


def test_compile_fullgraph(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    E, k, H, I, Is, T = 8, 3, 128, 128, 32, 4
    w = Int4Weights(E, H, I, Is, dtype, device)
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, device)
    compiled = torch.compile(lambda x, i, wt, r: run_int4(x, w, i, wt, r)[1], fullgraph=True)
    assert torch.equal(compiled(hidden, ids, weights, residual), run_int4(hidden, w, ids, weights, residual)[1])


# ---------------------------------------------------------------- CUDA


@requires_cuda
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("T", [1, 2, 8, 9, 16, 64])
@pytest.mark.parametrize("epilogue", ["swiglu", "swiglu_interleaved"])
def test_cuda_real_shapes(symmetric, T, epilogue):
    dtype = torch.bfloat16
    w = Int4Weights(REAL["E"], REAL["H"], REAL["I"], REAL["Is"], dtype, "cuda", epilogue, symmetric)
    hidden, ids, weights, residual = decode_inputs(T, REAL["k"], REAL["E"], REAL["H"], dtype, "cuda")
    act, out = check_pair(hidden, w, ids, weights, residual, f"real T={T}")
    # Against the bf16 kernels on the dequantized weights: the same values, another summation order.
    act_dq, out_dq = run_both(hidden, w.dequantized, ids, weights, residual)
    assert_rows_close(act, act_dq.float(), dtype, what="act vs bf16 kernels")
    assert_rows_close(out, out_dq.float(), dtype, what="out vs bf16 kernels")


@requires_cuda
@pytest.mark.parametrize("T", [1, 16, 64])
def test_cuda_real_shapes_hot_experts(T):
    # Every token on the same 6 experts (T pairs each: several items at T > 8), and one expert taking
    # every pair.
    dtype = torch.bfloat16
    w = Int4Weights(REAL["E"], REAL["H"], REAL["I"], REAL["Is"], dtype, "cuda")
    hidden = torch.randn(T, REAL["H"], device="cuda").to(dtype)
    ids = torch.randperm(REAL["E"])[: REAL["k"]].to(torch.int32).expand(T, -1).contiguous().cuda()
    check_pair(hidden, w, ids, topk_weights(T, REAL["k"], "cuda"), None, f"same experts T={T}")
    ids = torch.full((T, REAL["k"]), 5, dtype=torch.int32, device="cuda")
    check_pair(hidden, w, ids, topk_weights(T, REAL["k"], "cuda"), None, f"one expert T={T}")


@requires_cuda
@pytest.mark.parametrize("nt", ["1", "2", "4"])
@pytest.mark.parametrize("T", [5, 9, 64])
def test_cuda_n_tiles_override(nt, T, monkeypatch):
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_NT", nt)
    dtype = torch.bfloat16
    E, k, H, I, Is = 24, 6, 512, 256, 128
    w = Int4Weights(E, H, I, Is, dtype, "cuda")
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, "cuda")
    a1, o1 = check_pair(hidden, w, ids, weights, residual, f"NT={nt} T={T}")
    a2, o2 = run_int4(hidden, w, ids, weights, residual)
    assert torch.equal(a1, a2) and torch.equal(o1, o2)


@requires_cuda
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape", [(128, 4096, 1408, 2816), (16, 8192, 256, 128), (16, 256, 128, 0),
                                   (16, 1024, 384, 256)], ids=["real", "H8192 (registers)", "H256", "H1024"])
@pytest.mark.parametrize("T", [1, 8, 9, 64])
def test_cuda_staged_same_bits(symmetric, shape, T, monkeypatch):
    # The staged gate_up stream (DOTS1_EXT_MOE_DECODE_INT4_STAGED, default auto = above 8 tokens: the
    # routed tiles' weights through shared memory, the next tile copied while the current one computes)
    # moves no arithmetic: 1, 0 and auto give the same bits, and all the reference's values. H <= 4096
    # takes it (at 256 most warps have no step of a tile; at 1024 one each); H = 8192 keeps the register
    # stream. T = 9 and 64 run two n-tiles; 64 tokens also hot experts (items side by side). One row
    # group: the staged stream's tiles (up to 8 tokens the default unstaged launch takes 4 row groups).
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS", "1")
    w, (hidden, ids, weights, residual) = switch_case(shape, T, symmetric)
    results = {}
    for flag in ("1", "0", "auto"):
        monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_INT4_STAGED", flag)
        results[flag] = check_pair(hidden, w, ids, weights, residual, f"staged={flag} T={T} {shape}")
    for flag in ("0", "auto"):
        assert torch.equal(results["1"][0], results[flag][0]) and torch.equal(results["1"][1], results[flag][1])


@requires_cuda
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape", [(128, 4096, 1408, 2816), (16, 1024, 384, 256), (16, 256, 128, 0)],
                         ids=["real", "H1024", "H256 no shared"])
@pytest.mark.parametrize("T", [1, 2, 8, 9, 64])
def test_cuda_down_preload_same_bits(symmetric, shape, T, monkeypatch):
    # DOTS1_EXT_MOE_DECODE_DOWN_PRELOAD (default 1): the int4 down kernel's warps load their first batch
    # of the (bf16) shared experts' rows before the PDL wait, and each shared pass the next one's: 1, 0
    # and unset give the same bits, and the reference's values.
    w, (hidden, ids, weights, residual) = switch_case(shape, T, symmetric)
    results = {}
    for flag in ("1", "0", None):
        set_env(monkeypatch, "DOTS1_EXT_MOE_DECODE_DOWN_PRELOAD", flag)
        results[flag] = check_pair(hidden, w, ids, weights, residual, f"preload={flag} T={T} {shape}")
    for flag in ("0", None):
        assert torch.equal(results["1"][1], results[flag][1]), f"preload={flag} T={T} {shape}"


@requires_cuda
@pytest.mark.parametrize("name, value", [("STAGED", "yes"), ("STAGED", "2"), ("STAGED", "Auto"), ("ROW_GROUPS", "3"),
                                         ("ROW_GROUPS", "0"), ("ROW_GROUPS", "8"), ("ROW_GROUPS", "two"),
                                         ("ACT_SMEM", "2"), ("ACT_SMEM", "on"), ("DOWN_PRELOAD", "2")])
def test_cuda_bad_setting_raises(name, value, monkeypatch):
    variable = f"DOTS1_EXT_MOE_DECODE_{name}" if name == "DOWN_PRELOAD" else f"DOTS1_EXT_MOE_DECODE_INT4_{name}"
    monkeypatch.setenv(variable, value)
    dtype = torch.bfloat16
    w = Int4Weights(8, 128, 128, 0, dtype, "cuda")
    hidden, ids, weights, residual = decode_inputs(1, 2, 8, 128, dtype, "cuda")
    with pytest.raises(ValueError, match=variable):
        run_int4(hidden, w, ids, weights, residual)


@requires_cuda
@pytest.mark.parametrize("row_groups", ["2", "4"])
@pytest.mark.parametrize("shape", [(128, 4096, 1408, 2816), (16, 1024, 384, 256), (16, 256, 128, 0),
                                   (24, 8192, 256, 128)], ids=["real", "H1024", "H256 no shared", "H8192"])
@pytest.mark.parametrize("T", [1, 2, 5, 8, 9])
@pytest.mark.parametrize("epilogue", ["swiglu", "swiglu_interleaved"])
def test_cuda_row_groups(row_groups, shape, T, epilogue, monkeypatch):
    # DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS: routed gate_up tiles of 8 R features up to 8 tokens (each warp
    # one row group over 8 / R of H). The same values in another fp32 summation order: every setting
    # within the reference's tolerance and bitwise reproducible; T = 9 (two n-tiles) ignores it (the same
    # bits as R = 1). I = 128: one tile of 32 features is all of I at R = 4.
    E, H, I, Is = shape
    k = REAL["k"]
    dtype = torch.bfloat16
    w = Int4Weights(E, H, I, Is, dtype, "cuda", epilogue)
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, "cuda")
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS", "1")
    base = run_int4(hidden, w, ids, weights, residual)
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS", row_groups)
    act, out = check_pair(hidden, w, ids, weights, residual, f"row groups {row_groups} T={T} {shape}")
    again = run_int4(hidden, w, ids, weights, residual)
    assert torch.equal(act, again[0]) and torch.equal(out, again[1])
    if T > 8:
        assert torch.equal(act, base[0]) and torch.equal(out, base[1])
    # The down kernel never reads the setting: from the same act it gives the same bits under R = 1.
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS", "1")
    assert torch.equal(out, moe_decode_int4_down(act, *w.down_args(), ids, weights, w.shared_down, residual))


@requires_cuda
@pytest.mark.parametrize("T", [1, 8])
def test_cuda_row_groups_hot_experts_and_bad_ids(T, monkeypatch):
    # Every pair on one expert (one item of T columns), then bad ids: NaN in exactly their act slots
    # (and their tokens' output rows), every other value within the reference's tolerance.
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS", "4")
    dtype = torch.bfloat16
    E, k, H, I, Is = 16, 6, 512, 256, 128
    w = Int4Weights(E, H, I, Is, dtype, "cuda")
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, "cuda")
    check_pair(hidden, w, torch.full_like(ids, 3), weights, residual, f"row groups, one expert T={T}")
    bad = {(0, 1): E, (T - 1, 4): -1}
    for (t, j), v in bad.items():
        ids[t, j] = v
    act, out = check_pair(hidden, w, ids, weights, residual, f"row groups, bad ids T={T}", equal_nan=True)
    for t in range(T):
        for j in range(k):
            cols = act[t, j * I:(j + 1) * I].isnan()
            assert bool(cols.all()) == ((t, j) in bad) and bool(cols.any()) == ((t, j) in bad), (t, j)
        assert bool(out[t].isnan().all()) == (t in {tt for tt, _ in bad})


@requires_cuda
@pytest.mark.parametrize("T", [1, 8, 9])
def test_cuda_row_groups_default(T, monkeypatch):
    # Unset: 4 row groups up to 8 tokens, 1 where STAGED=1 makes the launch staged (its tiles take one
    # row group); above 8 tokens the setting does not apply (the same bits as R = 1).
    dtype = torch.bfloat16
    E, k, H, I, Is = 16, 6, 1024, 256, 128
    w = Int4Weights(E, H, I, Is, dtype, "cuda")
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, "cuda")
    results = {}
    for rg in ("1", "4"):
        monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS", rg)
        results[rg] = run_int4(hidden, w, ids, weights, residual)
    monkeypatch.delenv("DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS")
    default = check_pair(hidden, w, ids, weights, residual, f"row groups default T={T}")
    expected = results["4" if T <= 8 else "1"]
    assert torch.equal(default[0], expected[0]) and torch.equal(default[1], expected[1])
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_INT4_STAGED", "1")
    staged = run_int4(hidden, w, ids, weights, residual)
    assert torch.equal(staged[0], results["1"][0]) and torch.equal(staged[1], results["1"][1])
    if T <= 8:  # an explicit R > 1 and STAGED=1 contradict each other here
        monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS", "4")
        with pytest.raises(ValueError, match="cannot combine"):
            run_int4(hidden, w, ids, weights, residual)


@requires_cuda
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape", [(128, 4096, 1408, 2816), (16, 8192, 256, 128), (16, 256, 128, 0),
                                   (8, 16384, 128, 128)], ids=["real", "H8192", "H256 no shared", "H16384 (global)"])
@pytest.mark.parametrize("T", [1, 2, 5, 8, 9])
@pytest.mark.parametrize("epilogue", ["swiglu", "swiglu_interleaved"])
def test_cuda_act_smem_same_bits(symmetric, shape, T, epilogue, monkeypatch):
    # DOTS1_EXT_MOE_DECODE_INT4_ACT_SMEM (default 1): with 4 row groups at one token (H <= 8192) or 3-8
    # tokens (T H <= 32768) the routed gate_up tiles read the tokens' activations from a shared-memory copy
    # laid out as the MMA operands. The same values in the same order: 1, 0 and unset give the same bits,
    # and the reference's values. T = 1 / 5 / 8 take the copy where T H allows (real: 8 x 4096 is its
    # largest), T = 2 and 9, H = 16384 and H = 8192 at 5 / 8 tokens keep the global loads (the same bits
    # trivially). Also hot and bad ids.
    E, H, I, Is = shape
    k = REAL["k"]
    dtype = torch.bfloat16
    w = Int4Weights(E, H, I, Is, dtype, "cuda", epilogue, symmetric=symmetric)
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, "cuda")
    bad_ids = ids.clone()
    bad_ids[0, 1], bad_ids[T - 1, 4] = E, -1
    for what, routing in (("distinct", ids), ("one expert", torch.full_like(ids, E - 1)), ("bad ids", bad_ids)):
        results = {}
        for flag in ("1", "0", None):
            set_env(monkeypatch, "DOTS1_EXT_MOE_DECODE_INT4_ACT_SMEM", flag)
            results[flag] = check_pair(hidden, w, routing, weights, residual, f"act_smem={flag} {what} T={T} {shape}",
                                       equal_nan=what == "bad ids")
        for flag in ("0", None):
            assert_same_bits(results["1"][0], results[flag][0], f"act {flag} {what}")
            assert_same_bits(results["1"][1], results[flag][1], f"out {flag} {what}")
        if what == "bad ids":
            assert bool(results["1"][0][0, I:2 * I].isnan().all()) and bool(results["1"][1][0].isnan().all())


@requires_cuda
@pytest.mark.parametrize("shape", [(8, 1, 128, 128, 8), (130, 6, 384, 256, 264), (5, 2, 128, 128, 20),
                                   (7, 3, 128, 384, 0)], ids=["tiny", "odd-E", "Is%8 (fallback)", "no shared"])
@pytest.mark.parametrize("T", [1, 16, 33, 130])
def test_cuda_odd_shapes(shape, T):
    E, k, H, I, Is = shape
    dtype = torch.bfloat16
    w = Int4Weights(E, H, I, Is, dtype, "cuda")
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, "cuda")
    check_pair(hidden, w, ids, weights, residual, f"{shape} T={T}")


@requires_cuda
@pytest.mark.parametrize("T, k", SMALL_LAUNCHES)
@pytest.mark.parametrize("routing", ["distinct", "all_same_id", "bad_ids"])
def test_cuda_small_launch_schedules(T, k, routing):
    # test_moe_decode's cases (the down kernel's by-warp schedule and the CTA-wide one) on int4 experts.
    E, H, I, Is = 40, 256, 128, 128
    w = Int4Weights(E, H, I, Is, torch.bfloat16, "cuda")
    hidden, ids, weights, residual = small_launch_inputs(T, k, E, H, routing)
    _, out = check_pair(hidden, w, ids, weights, residual, f"{routing} T={T} k={k}", equal_nan=routing == "bad_ids")
    assert_bad_rows_nan(out, routing)


@requires_cuda
@pytest.mark.parametrize("T", [1, 7, 16, 64])
def test_cuda_fast_equals_simple(T, monkeypatch):
    dtype = torch.bfloat16
    E, k, H, I, Is = 32, 6, 256, 128, 128
    w = Int4Weights(E, H, I, Is, dtype, "cuda")
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, "cuda")
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_KERNEL", "simple")
    act_s, out_s = check_pair(hidden, w, ids, weights, residual, "simple")
    monkeypatch.delenv("DOTS1_EXT_MOE_DECODE_KERNEL")
    act_f, out_f = check_pair(hidden, w, ids, weights, residual, "fast")
    assert_rows_close(act_f, act_s.float(), dtype)
    assert_rows_close(out_f, out_s.float(), dtype)


@requires_cuda
def test_cuda_many_experts_per_token():
    # k = 520: past the fast kernels' 512 pairs (the fallback kernels).
    E, k, H, I, Is, T = 560, 520, 128, 128, 16, 2
    w = Int4Weights(E, H, I, Is, torch.bfloat16, "cuda")
    hidden = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    check_pair(hidden, w, distinct_ids(T, k, E, "cuda"), topk_weights(T, k, "cuda"), None, "k=520")


@requires_cuda
@pytest.mark.parametrize("kernel", ["fast", "simple"])
@pytest.mark.parametrize("T", [1, 16, 64, 65])
def test_cuda_every_element_written(kernel, T, monkeypatch):
    # The caching allocator hands the ops blocks just filled with NaN: an element not written stays NaN.
    if kernel == "simple":
        monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_KERNEL", "simple")
    dtype = torch.bfloat16
    E, k, H, I, Is = 16, 6, 256, 128, 64
    w = Int4Weights(E, H, I, Is, dtype, "cuda")
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, "cuda")
    torch.cuda.synchronize()
    for _ in range(4):
        junk = [torch.full((n,), float("nan"), device="cuda", dtype=dtype) for n in (T * (k * I + Is), T * H)]
        del junk
    check_pair(hidden, w, ids, weights, residual, f"{kernel} T={T}")


@requires_cuda
@pytest.mark.parametrize("T", [1, 16, 64])
def test_cuda_graph_replay_with_changed_ids(T):
    dtype = torch.bfloat16
    E, k, H, I, Is = 32, 6, 256, 128, 128
    w = Int4Weights(E, H, I, Is, dtype, "cuda")
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, "cuda")
    graph, (act, out) = capture_cuda_graph(lambda: run_int4(hidden, w, ids, weights, residual))
    for pattern in ["distinct", "same", "one_id", "bad"]:
        redraw_ids_(ids, pattern, E)
        hidden.copy_(torch.randn_like(hidden))
        replay_poisoned(graph, act, out)
        eager_act, eager_out = run_int4(hidden, w, ids, weights, residual)
        assert_same_bits(act, eager_act, pattern)
        assert_same_bits(out, eager_out, pattern)


@requires_cuda
@pytest.mark.parametrize("T", [1, 16])
def test_cuda_pdl_off_same_bits(T, monkeypatch):
    dtype = torch.bfloat16
    E, k, H, I, Is = 64, 6, 512, 256, 256
    w = Int4Weights(E, H, I, Is, dtype, "cuda")
    base = torch.randn(T, H, device="cuda").to(dtype)
    ids = distinct_ids(T, k, E, "cuda")
    weights, residual = topk_weights(T, k, "cuda"), torch.randn(T, H, device="cuda").to(dtype)
    outs = []
    for pdl in ("1", "0"):
        monkeypatch.setenv("DOTS1_EXT_PDL", pdl)
        hidden = torch.zeros_like(base)
        hidden.copy_(base * 2)  # the kernel right before gate_up writes hidden
        outs.append(run_int4(hidden, w, ids, weights, residual))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@requires_cuda
def test_cuda_extreme_codes_and_scales():
    # Every code and zero point at its ends (u - z = +-15), tiny and large scales, zero-scale groups: the
    # in-register dequantization equals dequantize_int4 element for element (checked through a one-hot
    # activation per k: act columns then hold single weights times SwiGLU).
    dtype = torch.bfloat16
    E, k, H, I, Is, T = 2, 1, 128, 128, 0, 1
    w = Int4Weights(E, H, I, Is, dtype, "cuda")
    g = w.gate_up
    g.qweight.copy_(torch.randint(0, 256, g.qweight.shape, dtype=torch.uint8))
    g.zeros.copy_(torch.randint(0, 16, g.zeros.shape, dtype=torch.uint8))
    g.zeros.view(-1)[::3] = 15
    g.zeros.view(-1)[1::3] = 0
    sc = torch.exp2(torch.randint(-30, 10, g.scales.shape, device="cuda").float()) * (1 + torch.rand(g.scales.shape,
                                                                                                       device="cuda"))
    sc.view(-1)[::7] = 0
    g.scales.copy_(sc.to(torch.bfloat16))
    w.gate_up_dq = dequantize_int4(g, dtype)
    for h in (0, 1, 37, 127):
        hidden = torch.zeros(T, H, device="cuda", dtype=dtype)
        hidden[0, h] = 1.0
        ids = torch.tensor([[1]], dtype=torch.int32, device="cuda")
        act = moe_decode_int4_gate_up(hidden, *w.gate_up_args(), ids, None, w.epilogue)
        ref = ref_gate_up(hidden, w.dequantized, ids)
        # Elementwise (the scales span 2^-30 .. 2^10 within a row): one rounding of silu(g) * u apart at most.
        r = ref.to(dtype).float()
        assert bool(((act.float() - r).abs() <= 2**-7 * r.abs()).all()), f"h={h}"
