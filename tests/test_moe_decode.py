"""moe_decode_gate_up / moe_decode_down against the fp32 reference and against the current MoE path
(permute -> grouped_gemm gate_up -> grouped_gemm down -> shared MLP -> unpermute).

CUDA paths: the tensor-core weight-streaming kernels (fp16 / bf16, H, I, Is multiples of 8; up to 64
tokens / 512 (t, j) pairs per launch, chunks above; 1, 2 or 4 n-tiles per MMA, DOTS1_EXT_MOE_DECODE_NT)
and the simple fallback (fp32, other shapes, or DOTS1_EXT_MOE_DECODE_KERNEL=simple). Every test that
runs the CUDA kernels runs under every weight-load mapping (DOTS1_EXT_MOE_DECODE_LOADS=frag | wide |
wide_all: wide takes launches of up to 8 tokens, wide_all every launch); the test_cuda_wide_* tests aim
at the wide mapping's cases.
Memory check of every CUDA path: tests/sanitize_moe_decode.py.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

import dots1_ext  # noqa: F401  (registers the ops)
from dots1_ext import ops, reference
from dots1_ext.ops.moe_decode import moe_decode_down, moe_decode_gate_up

sys.path.insert(0, os.path.dirname(__file__))
from conftest import (ROW_RTOL, assert_rows_close, capture_cuda_graph, replay_poisoned,  # noqa: E402
                      requires_cuda, set_env)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REAL = dict(E=128, k=6, H=4096, I=1408, Is=2816)

# ---------------------------------------------------------------- helpers


class Weights:
    """Random expert weights at a scale that keeps activations O(1). gate_up in the HF layout
    (``gate_up_hf``) and in the layout the epilogue wants (``gate_up``)."""

    def __init__(self, E, H, I, Is, dtype, device, epilogue="swiglu_interleaved"):
        self.E, self.H, self.I, self.Is, self.epilogue = E, H, I, Is, epilogue
        self.gate_up_hf = (torch.randn(E, 2 * I, H, device=device) / H**0.5).to(dtype)
        self.gate_up = ops.interleave_gate_up(self.gate_up_hf) if epilogue == "swiglu_interleaved" else self.gate_up_hf
        self.down = (torch.randn(E, H, I, device=device) / max(I, 1) ** 0.5).to(dtype)
        self.shared_gate_up = (torch.randn(2 * Is, H, device=device) / H**0.5).to(dtype) if Is else None
        self.shared_down = (torch.randn(H, Is, device=device) / Is**0.5).to(dtype) if Is else None


def distinct_ids(T, k, E, device):
    """Each token's k distinct experts, uniformly at random (decode routing)."""
    if T == 0:
        return torch.zeros(0, k, dtype=torch.int32, device=device)
    return torch.rand(T, E).argsort(dim=1)[:, :k].to(torch.int32).to(device)


def zipf_ids(T, k, E, device, s=1.2, seed=0):
    """Each token's k distinct experts drawn with popularity 1 / rank^s (skewed, as real routing): the
    head experts are chosen by most tokens (several items each at T = 64)."""
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    p = p[torch.randperm(E, generator=g)]
    ids = torch.multinomial(p.expand(T, E).contiguous(), k, replacement=False, generator=g)
    return ids.to(torch.int32).to(device)


def topk_weights(T, k, device):
    return (torch.rand(T, k, device=device) + 0.1).float()


def decode_inputs(T, k, E, H, dtype, device):
    """A decode step's inputs, drawn in this order: hidden [T, H], each token's k distinct experts of E
    (distinct_ids), the routing weights [T, k] (topk_weights) and a residual [T, H]."""
    hidden = torch.randn(T, H, device=device).to(dtype)
    ids = distinct_ids(T, k, E, device)
    weights, residual = topk_weights(T, k, device), torch.randn(T, H, device=device).to(dtype)
    return hidden, ids, weights, residual


def redraw_ids_(ids, pattern, E):
    """ids [T, k] (a captured graph's input) rewritten in place with fresh distinct experts of E, then per
    ``pattern``: "distinct" as drawn, "same" every token the first token's experts, "one_id" every pair
    expert 5, "bad" one id -3."""
    T, k = ids.shape
    new_ids = distinct_ids(T, k, E, "cpu")
    if pattern == "same":
        new_ids[:] = new_ids[0].clone()
    elif pattern == "one_id":
        new_ids.fill_(5)
    elif pattern == "bad":
        new_ids[0, 1] = -3
    ids.copy_(new_ids)


def assert_same_bits(got, expected, what):
    """Bit for bit equal, NaN at the same places."""
    assert torch.equal(got.isnan(), expected.isnan()), what
    assert torch.equal(got.nan_to_num(), expected.nan_to_num()), what


def ref_gate_up(hidden, w: Weights, ids):
    """The reference in fp32 on the same (rounded) inputs: the kernel's error is then its own."""
    sg = w.shared_gate_up.float() if w.shared_gate_up is not None else None
    return reference.moe_decode_gate_up(hidden.float(), w.gate_up.float(), ids, sg, w.epilogue)


def ref_down(act, w: Weights, ids, weights, residual):
    sd = w.shared_down.float() if w.shared_down is not None else None
    res = residual.float() if residual is not None else None
    return reference.moe_decode_down(act.float(), w.down.float(), ids, weights, sd, res)


def run_both(hidden, w: Weights, ids, weights, residual):
    act = moe_decode_gate_up(hidden, w.gate_up, ids, w.shared_gate_up, w.epilogue)
    out = moe_decode_down(act, w.down, ids, weights, w.shared_down, residual)
    return act, out


def current_path(hidden, w: Weights, ids, weights, residual):
    """Today's decode MoE: permute, the two grouped GEMMs, the shared experts as an MLP, unpermute."""
    permuted, offsets, row_map = ops.permute(hidden, ids, w.E)
    act = ops.grouped_gemm(permuted, w.gate_up, offsets, w.epilogue)
    expert_out = ops.grouped_gemm(act, w.down, offsets, "none")
    shared = None
    if w.shared_gate_up is not None:
        gate, up = F.linear(hidden, w.shared_gate_up).chunk(2, dim=-1)
        shared = F.linear(F.silu(gate) * up, w.shared_down)
    return ops.unpermute(expert_out, row_map, weights, shared_out=shared, residual=residual)


def check_outputs(act, out, hidden, w, ids, weights, residual, dtype, what="", equal_nan=False):
    """act and out of the two ops on these inputs: dtype, shape, and per row against the fp32 reference
    on w's weights (test_moe_decode_int4 passes the dequantized ones)."""
    T, k = ids.shape
    assert act.dtype == dtype and act.shape == (T, k * w.I + w.Is)
    assert out.dtype == dtype and out.shape == (T, w.H)
    assert_rows_close(act, ref_gate_up(hidden, w, ids), dtype, what=f"act {what}", equal_nan=equal_nan)
    assert_rows_close(out, ref_down(act, w, ids, weights, residual), dtype, what=f"out {what}", equal_nan=equal_nan)


def check_pair(hidden, w, ids, weights, residual, dtype, what=""):
    act, out = run_both(hidden, w, ids, weights, residual)
    check_outputs(act, out, hidden, w, ids, weights, residual, dtype, what)
    return act, out


def small_cuda_layer():
    """A 4-expert layer (H = 32, I = Is = 16, bf16), two tokens' hidden and their top-2 ids, on the GPU."""
    w = Weights(4, 32, 16, 16, torch.bfloat16, "cuda")
    x = torch.randn(2, 32, device="cuda").to(torch.bfloat16)
    ids = distinct_ids(2, 2, 4, "cuda")
    return w, x, ids


LOADS = ["frag", "wide", "wide_all"]
WIDE_MAX_TOKENS = 8  # moe_decode_kernels.cu kWideMaxTokens: launches of more tokens take frag


def pytest_generate_tests(metafunc):
    # With a GPU, the tests that can run the CUDA kernels run under both weight-load mappings (not those
    # that set the mapping themselves); the CPU kernels have one mapping.
    name = metafunc.function.__name__
    sets_its_own = name.startswith("test_cuda_wide_") or name == "test_cuda_bad_loads_setting_raises"
    cuda = name.startswith("test_cuda_") or "device" in metafunc.fixturenames
    if torch.cuda.is_available() and cuda and not sets_its_own:
        metafunc.parametrize("moe_loads", LOADS, indirect=True)


@pytest.fixture(autouse=True)
def moe_loads(request, monkeypatch):
    """DOTS1_EXT_MOE_DECODE_LOADS for the test (read per call by the ops); unparametrized: unset (wide_all)."""
    loads = getattr(request, "param", None)
    if loads is None:
        monkeypatch.delenv("DOTS1_EXT_MOE_DECODE_LOADS", raising=False)
        return "wide_all"
    if loads != "frag" and request.node.callspec.params.get("device") == "cpu":
        pytest.skip("the CPU kernels have one mapping")
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_LOADS", loads)
    return loads


@pytest.fixture
def simple_kernel(monkeypatch):
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_KERNEL", "simple")


# ---------------------------------------------------------------- any device


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [0, 1, 2, 5, 16, 17, 32, 33, 48, 64, 65, 130])
@pytest.mark.parametrize("epilogue", ["swiglu", "swiglu_interleaved"])
def test_matches_reference(device, dtype, T, epilogue):
    # 64 tokens (192 pairs here) in one fast launch; 65 and 130: a second / third chunk.
    if device == "cpu" and dtype != torch.float32 and T > 16 and epilogue == "swiglu":
        pytest.skip("keeps the CPU suite short")
    E, k, H, I, Is = 12, 3, 64, 32, 48
    w = Weights(E, H, I, Is, dtype, device, epilogue)
    hidden = torch.randn(T, H, device=device).to(dtype)
    ids = distinct_ids(T, k, E, device)
    residual = torch.randn(T, H, device=device).to(dtype)
    check_pair(hidden, w, ids, topk_weights(T, k, device), residual, dtype, f"T={T}")


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optional_shared_and_residual(device, shared, with_residual, dtype):
    E, k, H, I, Is, T = 8, 2, 32, 16, 24 if shared else 0, 6
    w = Weights(E, H, I, Is, dtype, device)
    hidden = torch.randn(T, H, device=device).to(dtype)
    ids = distinct_ids(T, k, E, device)
    residual = torch.randn(T, H, device=device).to(dtype) if with_residual else None
    check_pair(hidden, w, ids, topk_weights(T, k, device), residual, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 2, 5, 16, 17])
@pytest.mark.parametrize("epilogue", ["swiglu", "swiglu_interleaved"])
def test_matches_current_path(device, dtype, T, epilogue):
    # The same layer through permute -> grouped_gemm x2 -> shared MLP -> unpermute: that path rounds
    # expert outputs and the shared MLP's intermediates to the dtype, ours rounds once, hence 2x.
    E, k, H, I, Is = 16, 4, 64, 32, 64
    w = Weights(E, H, I, Is, dtype, device, epilogue)
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, device)
    _, out = run_both(hidden, w, ids, weights, residual)
    theirs = current_path(hidden, w, ids, weights, residual)
    assert_rows_close(out, theirs.float(), dtype, rtol=2 * ROW_RTOL[dtype], what="vs current path")
    # The routed act equals grouped_gemm's SwiGLU epilogue (same rounding), pair by pair.
    act = moe_decode_gate_up(hidden, w.gate_up, ids, None, epilogue)
    permuted, offsets, row_map = ops.permute(hidden, ids, E)
    gg = ops.grouped_gemm(permuted, w.gate_up, offsets, epilogue)
    assert_rows_close(act.view(T * k, I), gg[row_map.long()].float(), dtype, what="act vs grouped_gemm")


@pytest.mark.parametrize(
    "routing", ["one_expert_for_all", "same_experts_everywhere", "duplicates_in_row", "all_same_id", "k1", "k8"]
)
@pytest.mark.parametrize("T", [1, 5, 16, 17, 32, 64, 65, 130])
def test_routing_patterns(device, routing, T):
    # At T = 64: one_expert_for_all gives expert 7 64 columns (4 items of 16 on CUDA), all_same_id 256
    # pairs on one expert (16 items), k8 512 pairs (the most one launch takes).
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    E, H, I, Is = 10, 64, 32, 32
    k = {"k1": 1, "k8": 8}.get(routing, 4)
    ids = distinct_ids(T, k, E, "cpu")
    if routing == "one_expert_for_all":  # every token has expert 7 among its k
        ids = torch.stack([torch.cat([torch.tensor([7]), p[p != 7][: k - 1]]) for p in
                           (torch.randperm(E) for _ in range(T))]).to(torch.int32)
    elif routing == "same_experts_everywhere":  # every row the same k experts (T pairs per expert)
        ids = torch.randperm(E)[:k].to(torch.int32).expand(T, k).contiguous()
    elif routing == "duplicates_in_row":  # computed as given: the same expert twice in a row
        ids[:, 1] = ids[:, 0]
    elif routing == "all_same_id":  # T*k pairs on one expert: several 16-column items
        ids = torch.full((T, k), 3, dtype=torch.int32)
    ids = ids.to(device)
    w = Weights(E, H, I, Is, dtype, device)
    hidden = torch.randn(T, H, device=device).to(dtype)
    check_pair(hidden, w, ids, topk_weights(T, k, device), torch.randn(T, H, device=device).to(dtype), dtype, routing)


@pytest.mark.parametrize("E", [1, 3, 300])
def test_expert_counts(device, E):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    k, T, H, I, Is = min(E, 6), 9, 32, 16, 16
    w = Weights(E, H, I, Is, dtype, device)
    hidden = torch.randn(T, H, device=device).to(dtype)
    ids = distinct_ids(T, k, E, device)
    check_pair(hidden, w, ids, topk_weights(T, k, device), None, dtype, f"E={E}")


@pytest.mark.parametrize("T", [64, 65])
def test_all_distinct_experts(device, T):
    # Every pair its own expert: 64 tokens x top-8 = 512 pairs (the most one launch takes), 512 items
    # of one column each; T = 65: the 65th token in a second launch.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    E, k, H, I, Is = T * 8, 8, 32, 16, 16
    w = Weights(E, H, I, Is, dtype, device)
    hidden = torch.randn(T, H, device=device).to(dtype)
    ids = torch.randperm(E).view(T, k).to(torch.int32).to(device)
    check_pair(hidden, w, ids, topk_weights(T, k, device), torch.randn(T, H, device=device).to(dtype), dtype,
               f"all distinct T={T}")


@pytest.mark.parametrize("T", [17, 32, 64, 65])
def test_zipf_routing(device, T):
    # Skewed routing: a few experts take most tokens (hot experts cut into several items).
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    E, k, H, I, Is = 32, 6, 64, 32, 32
    w = Weights(E, H, I, Is, dtype, device)
    hidden = torch.randn(T, H, device=device).to(dtype)
    ids = zipf_ids(T, k, E, device)
    check_pair(hidden, w, ids, topk_weights(T, k, device), torch.randn(T, H, device=device).to(dtype), dtype,
               f"zipf T={T}")


def test_shared_only_k0(device):
    # k = 0: act is the shared experts' columns only, out = shared + residual.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    T, H, I, Is = 3, 32, 16, 16
    w = Weights(4, H, I, Is, dtype, device)
    hidden = torch.randn(T, H, device=device).to(dtype)
    ids = torch.zeros(T, 0, dtype=torch.int32, device=device)
    check_pair(hidden, w, ids, torch.zeros(T, 0, device=device), torch.randn(T, H, device=device).to(dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [6, 64, 65])
def test_bad_ids_poison_only_their_slots(device, dtype, T):
    # T = 64: one launch of 192 pairs with bad ids among them; 65: the last token's bad id is in the
    # second chunk.
    E, k, H, I, Is = 8, 3, 32, 16, 16
    w = Weights(E, H, I, Is, dtype, device)
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, device)
    bad_ids = {(1, 2): -1, (3, 0): E, (4, 1): 2**30}
    if T > 6:
        bad_ids.update({(40, 1): -(2**31), (T - 1, 0): E + 1})
    for (t, j), v in bad_ids.items():
        ids[t, j] = v
    act, out = run_both(hidden, w, ids, weights, residual)
    bad = list(bad_ids)
    bad_tokens = {t for t, _ in bad}
    act_nan = torch.isnan(act.view(T, -1))
    for t in range(T):
        for j in range(k):
            cols = act_nan[t, j * I : (j + 1) * I]
            assert bool(cols.all()) == ((t, j) in bad) and bool(cols.any()) == ((t, j) in bad), (t, j)
        assert not act_nan[t, k * I :].any(), "shared experts' columns poisoned"
    assert_rows_close(act, ref_gate_up(hidden, w, ids), dtype, equal_nan=True, what="act")
    out_nan = torch.isnan(out)
    for t in range(T):
        assert bool(out_nan[t].all()) == (t in bad_tokens) and bool(out_nan[t].any()) == (t in bad_tokens), t
    assert_rows_close(out, ref_down(act, w, ids, weights, residual), dtype, equal_nan=True, what="out")
    with pytest.raises(IndexError, match="topk_ids"):
        moe_decode_gate_up(hidden, w.gate_up, ids, w.shared_gate_up, w.epilogue, check_ids=True)
    with pytest.raises(IndexError, match="topk_ids"):
        moe_decode_down(act, w.down, ids, weights, w.shared_down, residual, check_ids=True)


def test_non_contiguous_inputs(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    E, k, H, I, Is, T = 8, 3, 64, 32, 32, 5
    w = Weights(E, H, I, Is, dtype, device)
    hidden = torch.randn(H, T, device=device).to(dtype).t()
    ids = distinct_ids(T, k, E, device).t().contiguous().t()
    weights = topk_weights(k, T, device).t()
    residual = torch.randn(H, T, device=device).to(dtype).t()
    assert not (hidden.is_contiguous() or ids.is_contiguous() or weights.is_contiguous() or residual.is_contiguous())
    act, out = check_pair(hidden, w, ids, weights, residual, dtype)
    wide = torch.zeros(T, act.shape[1] + 8, device=device, dtype=dtype)
    wide[:, 1:-7] = act  # a column slice: misaligned rows, copied by the op
    assert_rows_close(moe_decode_down(wide[:, 1:-7], w.down, ids, weights, w.shared_down, residual), out.float(),
                      dtype, rtol=0.0, what="down on a strided act")


@pytest.mark.parametrize("T", [16, 64])
def test_deterministic(device, T):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    E, k, H, I, Is = 16, 6, 128, 64, 64
    w = Weights(E, H, I, Is, dtype, device)
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, device)
    a1, o1 = run_both(hidden, w, ids, weights, residual)
    a2, o2 = run_both(hidden, w, ids, weights, residual)
    assert torch.equal(a1, a2) and torch.equal(o1, o2)


def test_bad_inputs_raise(device):
    E, k, H, I, Is, T = 4, 2, 32, 16, 16, 3
    w = Weights(E, H, I, Is, torch.float32, device)
    x = torch.randn(T, H, device=device)
    ids = distinct_ids(T, k, E, device)
    wts = topk_weights(T, k, device)
    gu = w.gate_up
    for bad in ("yes", 1):
        with pytest.raises(TypeError, match="hidden_settled must be a bool"):
            moe_decode_gate_up(x, gu, ids, hidden_settled=bad)
    with pytest.raises(RuntimeError, match="bool.*hidden_settled"):  # the schema's own check
        torch.ops.dots1_ext.moe_decode_gate_up.default(x, gu, ids, None, "swiglu_interleaved", "yes")
    with pytest.raises(TypeError, match="hidden"):
        moe_decode_gate_up(x.long(), gu, ids)
    with pytest.raises(TypeError, match="gate_up"):
        moe_decode_gate_up(x, gu.half(), ids)
    with pytest.raises(ValueError, match="gate_up"):
        moe_decode_gate_up(x, gu[:, :, :-1].contiguous(), ids)
    with pytest.raises(ValueError, match="even"):
        moe_decode_gate_up(x, torch.randn(E, 2 * I - 1, H, device=device), ids, epilogue="swiglu")
    with pytest.raises(ValueError, match="multiple of 16"):
        moe_decode_gate_up(x, torch.randn(E, 24, H, device=device), ids, epilogue="swiglu_interleaved")
    with pytest.raises(ValueError, match="epilogue"):
        moe_decode_gate_up(x, gu, ids, epilogue="none")
    with pytest.raises(TypeError, match="topk_ids"):
        moe_decode_gate_up(x, gu, ids.long())
    with pytest.raises(ValueError, match="topk_ids"):
        moe_decode_gate_up(x, gu, ids[:-1])
    with pytest.raises(ValueError, match="shared_gate_up"):
        moe_decode_gate_up(x, gu, ids, torch.randn(2 * Is, H + 1, device=device))
    with pytest.raises(ValueError, match="shared_gate_up"):
        moe_decode_gate_up(x, gu, ids, torch.randn(2 * Is + 1, H, device=device))
    with pytest.raises(TypeError, match="shared_gate_up"):
        moe_decode_gate_up(x, gu, ids, w.shared_gate_up.half())
    with pytest.raises(ValueError, match="gate_up must be contiguous"):
        moe_decode_gate_up(x, torch.randn(E, H, 2 * I, device=device).transpose(1, 2), ids)
    misaligned = torch.empty(gu.numel() + 1, device=device)[1:].view_as(gu)
    with pytest.raises(ValueError, match="gate_up must start at a 16-byte aligned address"):
        moe_decode_gate_up(x, misaligned, ids)
    with pytest.raises(ValueError, match="gate_up must be contiguous"):  # the op itself, not only the wrapper
        torch.ops.dots1_ext.moe_decode_gate_up(x, torch.randn(E, H, 2 * I, device=device).transpose(1, 2), ids,
                                               None, "swiglu")

    act = moe_decode_gate_up(x, gu, ids, w.shared_gate_up)
    with pytest.raises(TypeError, match="act"):
        moe_decode_down(act.long(), w.down, ids, wts)
    with pytest.raises(ValueError, match="act must have shape"):
        moe_decode_down(act, w.down, ids, wts)  # the shared columns without shared_down
    with pytest.raises(ValueError, match="act must have shape"):
        torch.ops.dots1_ext.moe_decode_down(act[:, 1:], w.down, ids, wts, w.shared_down, None)
    with pytest.raises(TypeError, match="down"):
        moe_decode_down(act, w.down.half(), ids, wts, w.shared_down)
    with pytest.raises(TypeError, match="topk_weights"):
        moe_decode_down(act, w.down, ids, wts.half(), w.shared_down)
    with pytest.raises(ValueError, match="topk_weights"):
        moe_decode_down(act, w.down, ids, wts[:, :1], w.shared_down)
    with pytest.raises(ValueError, match="shared_down"):
        moe_decode_down(act, w.down, ids, wts, torch.randn(H + 1, Is, device=device))
    with pytest.raises(ValueError, match="residual"):
        moe_decode_down(act, w.down, ids, wts, w.shared_down, torch.randn(T, H + 1, device=device))
    with pytest.raises(TypeError, match="residual"):
        moe_decode_down(act, w.down, ids, wts, w.shared_down, torch.randn(T, H, device=device).half())
    with pytest.raises(ValueError, match="down must be contiguous"):
        moe_decode_down(act, torch.randn(E, I, H, device=device).transpose(1, 2), ids, wts, w.shared_down)
    routed, shared = act[:, : k * I], act[:, k * I :]
    with pytest.raises(ValueError, match="shared_act needs shared_down"):
        moe_decode_down(routed, w.down, ids, wts, shared_act=shared)
    with pytest.raises(ValueError, match="shared_act"):
        moe_decode_down(routed, w.down, ids, wts, w.shared_down, shared_act=shared[:, 1:])
    with pytest.raises(ValueError, match="shared_act"):
        moe_decode_down(routed, w.down, ids, wts, w.shared_down, shared_act=shared[1:])
    with pytest.raises(TypeError, match="shared_act"):
        moe_decode_down(routed, w.down, ids, wts, w.shared_down, shared_act=shared.half())
    with pytest.raises(ValueError, match=r"act must have shape \[T, k\*I\]"):
        moe_decode_down(act, w.down, ids, wts, w.shared_down, shared_act=shared)  # the shared columns twice
    with pytest.raises(ValueError, match="shared_act"):  # the op itself
        torch.ops.dots1_ext.moe_decode_down(routed, w.down, ids, wts, w.shared_down, None, shared[:, 1:])
    if device == "cuda":
        with pytest.raises(ValueError, match="same device"):
            moe_decode_gate_up(x, gu, ids.cpu())
        with pytest.raises(ValueError, match="same device"):
            moe_decode_down(act, w.down, ids, wts.cpu(), w.shared_down)
        with pytest.raises(ValueError, match="same device"):
            moe_decode_down(routed, w.down, ids, wts, w.shared_down, shared_act=shared.cpu())


@pytest.mark.parametrize("shared", [True, False])
def test_opcheck(device, shared):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    E, k, H, I, Is, T = 6, 2, 32, 16, 16 if shared else 0, 4
    w = Weights(E, H, I, Is, dtype, device)
    hidden = torch.randn(T, H, device=device).to(dtype)
    ids = distinct_ids(T, k, E, device)
    for settled in (False, True):
        torch.library.opcheck(torch.ops.dots1_ext.moe_decode_gate_up.default,
                              (hidden, w.gate_up, ids, w.shared_gate_up, "swiglu_interleaved", settled))
    act = moe_decode_gate_up(hidden, w.gate_up, ids, w.shared_gate_up)
    residual = torch.randn(T, H, device=device).to(dtype)
    torch.library.opcheck(torch.ops.dots1_ext.moe_decode_down.default,
                          (act, w.down, ids, topk_weights(T, k, device), w.shared_down, residual))
    if shared:
        torch.library.opcheck(torch.ops.dots1_ext.moe_decode_down.default,
                              (act[:, : k * I].contiguous(), w.down, ids, topk_weights(T, k, device), w.shared_down,
                               residual, act[:, k * I :].contiguous()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 5, 9, 64, 65])
@pytest.mark.parametrize("views", [False, True])
def test_shared_act_apart_same_bits(device, dtype, T, views):
    # The down op with the shared experts' columns given apart (shared_act: what the decode step passes
    # when their gate_up ran on a side stream) sums the same terms in the same order as with them in
    # act: the same bits, bad-id poison included, on every launch shape (by-warp, CTA-wide, two
    # launches past 64 tokens), with contiguous tensors or strided views of one act.
    E, k, H, I, Is = 6, 2, 64, 32, 48
    w = Weights(E, H, I, Is, dtype, device)
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, device)
    ids[T // 2, 1] = E  # a bad id: its token's row is NaN either way
    act = moe_decode_gate_up(hidden, w.gate_up, ids, w.shared_gate_up, w.epilogue)
    routed, shared = act[:, : k * I], act[:, k * I :]
    if not views:
        routed, shared = routed.contiguous(), shared.contiguous()
    out = moe_decode_down(act, w.down, ids, weights, w.shared_down, residual)
    apart = moe_decode_down(routed, w.down, ids, weights, w.shared_down, residual, shared_act=shared)
    assert out[T // 2].isnan().all()
    assert_same_bits(apart, out, f"{dtype} T={T}")


def normed_and_routed(T, k, E, H, dtype, device, seed):
    """hidden and ids as the model makes them right before gate_up: the norm that writes hidden
    (add_rms_norm_), then the router that reads it (router_topk_gating), launched back to back; on CUDA
    the next launch (gate_up) follows the router under PDL, as in the decode step."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(device=device, dtype=dtype)
    residual = torch.randn(T, H, generator=g).to(device=device, dtype=dtype)
    norm_weight = (torch.rand(H, generator=g) + 0.5).to(device=device, dtype=dtype)
    router = torch.randn(E, H, generator=g).to(device=device, dtype=dtype)
    bias = torch.zeros(E, device=device)
    ops.add_rms_norm_(x, residual, norm_weight, 1e-6)
    _, ids = ops.router_topk_gating(x, router, bias, k)
    return x, ids


def check_hidden_settled_same_bits(gate_up, T, k, E, H, I, dtype, device, bad_slot, bad_id, between=None):
    """gate_up(x, ids, hidden_settled) launched as the model launches it (right after the router that
    follows the norm writing hidden, fresh inputs per seed) gives the same bits with hidden_settled as
    without; then with ids[T // 2, bad_slot] = bad_id, NaN in that pair's I columns, the rest the same.
    between(x, ids, plain), if given, runs on the last seed's inputs before the bad id is set."""
    for seed in range(3):
        x, ids = normed_and_routed(T, k, E, H, dtype, device, seed)
        settled = gate_up(x, ids, True)
        plain = gate_up(x, ids, False)
        assert_same_bits(settled, plain, f"T={T} seed={seed}")
    if between is not None:
        between(x, ids, plain)
    ids[T // 2, bad_slot] = bad_id
    settled = gate_up(x, ids, True)
    assert settled[T // 2, bad_slot * I : (bad_slot + 1) * I].isnan().all()
    assert_same_bits(settled, gate_up(x, ids, False), "bad id")


@pytest.mark.parametrize("T", [1, 9, 64, 65])
def test_hidden_settled_same_bits(device, T):
    # hidden_settled only moves the CUDA kernel's PDL wait (each CTA's first shared-expert tile streams
    # hidden and its weights before the wait and stores after it): the same bits as without it, a bad
    # id's NaN included. Launched as the model launches it, right after the router that follows the
    # norm writing hidden, over fresh inputs: an early read of hidden would show as changed bits.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    E, k, H, I, Is = 16, 4, 256, 64, 96
    w = Weights(E, H, I, Is, dtype, device)

    def gate_up(x, ids, settled):
        return moe_decode_gate_up(x, w.gate_up, ids, w.shared_gate_up, w.epilogue, hidden_settled=settled)

    def strided_hidden(x, ids, plain):
        # A strided hidden: the op's own contiguous copy is written by the launch right before the
        # kernel, so the promise cannot hold for it; the op waits for the copy (the same bits).
        strided = torch.cat([x, x], dim=1)[:, :H]
        assert_same_bits(gate_up(strided, ids, True), plain, f"T={T} strided hidden")

    check_hidden_settled_same_bits(gate_up, T, k, E, H, I, dtype, device, 1, E, strided_hidden)


def test_compile_fullgraph(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    E, k, H, I, Is, T = 8, 3, 64, 32, 32, 4
    w = Weights(E, H, I, Is, dtype, device)
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, device)

    def layer(x, i, wt, r):
        act = moe_decode_gate_up(x, w.gate_up, i, w.shared_gate_up, w.epilogue)
        return moe_decode_down(act, w.down, i, wt, w.shared_down, r)

    compiled = torch.compile(layer, fullgraph=True)
    _, eager = run_both(hidden, w, ids, weights, residual)
    assert torch.equal(compiled(hidden, ids, weights, residual), eager)


# ---------------------------------------------------------------- CUDA


@requires_cuda
# 8 | 9: the last one-n-tile launch | the first two-n-tile one; 64: one launch of 384 pairs (~122
# experts); 65, 130: two / three launches.
@pytest.mark.parametrize("T", [1, 2, 4, 8, 9, 16, 17, 32, 48, 64, 65, 130])
@pytest.mark.parametrize("epilogue", ["swiglu", "swiglu_interleaved"])
def test_cuda_real_shapes(T, epilogue):
    dtype = torch.bfloat16
    w = Weights(REAL["E"], REAL["H"], REAL["I"], REAL["Is"], dtype, "cuda", epilogue)
    hidden, ids, weights, residual = decode_inputs(T, REAL["k"], REAL["E"], REAL["H"], dtype, "cuda")
    check_pair(hidden, w, ids, weights, residual, dtype, f"real T={T}")
    _, out = run_both(hidden, w, ids, weights, residual)
    assert_rows_close(out, current_path(hidden, w, ids, weights, residual).float(), dtype,
                      rtol=2 * ROW_RTOL[dtype], what="real shapes vs current path")


@requires_cuda
@pytest.mark.parametrize("T", [1, 16, 17, 32, 64, 65])
def test_cuda_real_shapes_shared_everywhere(T):
    # Every token on the same 6 experts: T pairs per expert, at T = 64 four full 16-column items each
    # (the same expert read by four side-by-side tiles), the shared experts in four column groups.
    dtype = torch.bfloat16
    w = Weights(REAL["E"], REAL["H"], REAL["I"], REAL["Is"], dtype, "cuda")
    hidden = torch.randn(T, REAL["H"], device="cuda").to(dtype)
    ids = torch.randperm(REAL["E"])[: REAL["k"]].to(torch.int32).expand(T, -1).contiguous().cuda()
    check_pair(hidden, w, ids, topk_weights(T, REAL["k"], "cuda"), None, dtype, f"same experts T={T}")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape",
    [(8, 1, 8, 8, 8), (8, 3, 40, 16, 0), (5, 2, 72, 24, 40), (130, 6, 1032, 136, 264), (3, 2, 8, 0, 8),
     (7, 3, 24, 12, 20), (7, 3, 20, 16, 16)],
    ids=["tiny", "K-tail", "H%16", "odd-E", "I=0", "I%8 (fallback)", "H%8 (fallback)"],
)
@pytest.mark.parametrize("T", [1, 5, 16, 33, 64, 130])
def test_cuda_odd_shapes(dtype, shape, T):
    E, k, H, I, Is = shape
    epilogue = "swiglu_interleaved" if I % 8 == 0 else "swiglu"
    w = Weights(E, H, I, Is, dtype, "cuda", epilogue)
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, "cuda")
    check_pair(hidden, w, ids, weights, residual, dtype, f"{shape} T={T}")


@requires_cuda
@pytest.mark.parametrize("k", [20, 130, 520])
def test_cuda_many_experts_per_token(k):
    # k = 20: 25 tokens per fast launch (at most 512 pairs); k = 130: 3; k = 520: past the fast path's
    # limit (the simple kernels).
    E, H, I, Is, dtype = k + 40, 64, 16, 16, torch.bfloat16
    T = 17 if k < 512 else 3
    w = Weights(E, H, I, Is, dtype, "cuda")
    hidden = torch.randn(T, H, device="cuda").to(dtype)
    ids = distinct_ids(T, k, E, "cuda")
    check_pair(hidden, w, ids, topk_weights(T, k, "cuda"), None, dtype, f"k={k}")


# Launches of at most 32 pairs and 8 tokens build the down kernel's schedule in every warp (the frag
# mapping's by-warp path), larger ones once per CTA: (T, k) on both sides of that boundary (32 pairs, 33,
# 35 in 5 tokens, 27 in 9 tokens), with every pair on one expert (cut into items of 8 columns) and with
# bad ids (NaN in exactly their tokens' rows).
SMALL_LAUNCHES = [(8, 4), (4, 8), (1, 32), (1, 33), (5, 7), (9, 3)]


def small_launch_inputs(T, k, E, H, routing):
    """decode_inputs on the GPU (bf16) with the ids per ``routing`` (SMALL_LAUNCHES' cases)."""
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, torch.bfloat16, "cuda")
    if routing == "all_same_id":
        ids.fill_(5)
    elif routing == "bad_ids":
        ids[0, k - 1], ids[T - 1, 0] = E, -1
    return hidden, ids, weights, residual


def assert_bad_rows_nan(out, routing):
    """out's rows are all NaN exactly for the tokens small_launch_inputs gave a bad id, else none NaN."""
    T = out.shape[0]
    bad_rows = {0, T - 1} if routing == "bad_ids" else set()
    for t in range(T):
        assert bool(out[t].isnan().all()) == (t in bad_rows) and bool(out[t].isnan().any()) == (t in bad_rows), t


@requires_cuda
@pytest.mark.parametrize("T, k", SMALL_LAUNCHES)
@pytest.mark.parametrize("routing", ["distinct", "all_same_id", "bad_ids"])
def test_cuda_small_launch_schedules(T, k, routing):
    dtype = torch.bfloat16
    E, H, I, Is = 40, 256, 64, 128
    w = Weights(E, H, I, Is, dtype, "cuda")
    hidden, ids, weights, residual = small_launch_inputs(T, k, E, H, routing)
    act, out = run_both(hidden, w, ids, weights, residual)
    check_outputs(act, out, hidden, w, ids, weights, residual, dtype, f"{routing} T={T} k={k}",
                  equal_nan=routing == "bad_ids")
    assert_bad_rows_nan(out, routing)


@requires_cuda
@pytest.mark.parametrize("T", [1, 7, 16, 64])
def test_cuda_fast_equals_simple(T, simple_kernel, monkeypatch):
    # The fallback kernel (forced here) and the tensor-core kernel agree with the reference and each
    # other up to rounding.
    dtype = torch.bfloat16
    E, k, H, I, Is = 32, 6, 256, 64, 128
    w = Weights(E, H, I, Is, dtype, "cuda")
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, "cuda")
    act_s, out_s = check_pair(hidden, w, ids, weights, residual, dtype, "simple")
    monkeypatch.delenv("DOTS1_EXT_MOE_DECODE_KERNEL")
    act_f, out_f = check_pair(hidden, w, ids, weights, residual, dtype, "fast")
    assert_rows_close(act_f, act_s.float(), dtype)
    assert_rows_close(out_f, out_s.float(), dtype)


@requires_cuda
@pytest.mark.parametrize("kernel", ["fast", "simple"])
@pytest.mark.parametrize("T", [1, 16, 17, 64, 65])
def test_cuda_every_element_written(kernel, T, monkeypatch):
    # The caching allocator hands the ops blocks that were just filled with NaN: an element a kernel
    # fails to write stays NaN and fails the comparison.
    if kernel == "simple":
        monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_KERNEL", "simple")
    dtype = torch.bfloat16
    E, k, H, I, Is = 16, 6, 128, 64, 64
    w = Weights(E, H, I, Is, dtype, "cuda")
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, "cuda")
    torch.cuda.synchronize()
    for _ in range(4):
        junk = [torch.full((n,), float("nan"), device="cuda", dtype=dtype) for n in (T * (k * I + Is), T * H)]
        del junk
    check_pair(hidden, w, ids, weights, residual, dtype, f"{kernel} T={T}")


@requires_cuda
@pytest.mark.parametrize("T", [1, 4, 16, 20, 64, 65])
@pytest.mark.parametrize("shared", [True, False])
def test_cuda_graph_replay_with_changed_ids(T, shared):
    # T = 64: "same" puts 64 pairs on each of 6 experts (4 items each), "one_id" 384 pairs on one
    # expert (24 items); the schedule is rebuilt on the device at every replay.
    dtype = torch.bfloat16
    E, k, H, I, Is = 32, 6, 256, 128, 128 if shared else 0
    w = Weights(E, H, I, Is, dtype, "cuda")
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, "cuda")
    graph, (act, out) = capture_cuda_graph(lambda: run_both(hidden, w, ids, weights, residual))
    for pattern in ["distinct", "same", "one_id", "bad"]:
        redraw_ids_(ids, pattern, E)
        hidden.copy_(torch.randn_like(hidden))
        weights.copy_(topk_weights(T, k, "cuda"))
        replay_poisoned(graph, act, out)
        eager_act, eager_out = run_both(hidden, w, ids, weights, residual)
        assert_same_bits(act, eager_act, f"act after replay, {pattern}")
        assert_same_bits(out, eager_out, f"out after replay, {pattern}")
        assert_rows_close(out, ref_down(eager_act, w, ids, weights, residual), dtype, equal_nan=True, what=pattern)


@requires_cuda
@pytest.mark.parametrize("T", [32, 64])
def test_cuda_real_shapes_zipf(T):
    # Skewed routing at real shape: the head experts take most of the 64 tokens (several items each).
    dtype = torch.bfloat16
    w = Weights(REAL["E"], REAL["H"], REAL["I"], REAL["Is"], dtype, "cuda")
    hidden = torch.randn(T, REAL["H"], device="cuda").to(dtype)
    ids = zipf_ids(T, REAL["k"], REAL["E"], "cuda")
    weights, residual = topk_weights(T, REAL["k"], "cuda"), torch.randn(T, REAL["H"], device="cuda").to(dtype)
    check_pair(hidden, w, ids, weights, residual, dtype, f"zipf real T={T}")


@requires_cuda
@pytest.mark.parametrize("nt", ["1", "2", "4"])
@pytest.mark.parametrize("T", [5, 9, 64])
@pytest.mark.parametrize("routing", ["distinct", "one_expert_for_all"])
def test_cuda_n_tiles_override(nt, T, routing, monkeypatch):
    # DOTS1_EXT_MOE_DECODE_NT forces the n-tiles per MMA: items of 8, 16 or 32 columns, the shared
    # experts in as many column groups; every setting correct (the bits may differ between settings).
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_NT", nt)
    dtype = torch.bfloat16
    E, k, H, I, Is = 24, 6, 256, 64, 128
    w = Weights(E, H, I, Is, dtype, "cuda")
    hidden = torch.randn(T, H, device="cuda").to(dtype)
    ids = distinct_ids(T, k, E, "cpu")
    if routing == "one_expert_for_all":
        ids = torch.stack([torch.cat([torch.tensor([7]), r[r != 7][: k - 1]]) for r in
                           (torch.randperm(E) for _ in range(T))]).to(torch.int32)
    ids = ids.cuda()
    weights, residual = topk_weights(T, k, "cuda"), torch.randn(T, H, device="cuda").to(dtype)
    a1, o1 = check_pair(hidden, w, ids, weights, residual, dtype, f"NT={nt} T={T} {routing}")
    a2, o2 = run_both(hidden, w, ids, weights, residual)
    assert torch.equal(a1, a2) and torch.equal(o1, o2)


@requires_cuda
def test_cuda_n_tiles_bad_setting_raises(monkeypatch):
    w, x, ids = small_cuda_layer()
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_NT", "3")
    with pytest.raises(ValueError, match="DOTS1_EXT_MOE_DECODE_NT"):
        moe_decode_gate_up(x, w.gate_up, ids, w.shared_gate_up)
    monkeypatch.delenv("DOTS1_EXT_MOE_DECODE_NT")
    act = moe_decode_gate_up(x, w.gate_up, ids, w.shared_gate_up)
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_NT", "8")
    with pytest.raises(ValueError, match="DOTS1_EXT_MOE_DECODE_NT"):
        moe_decode_down(act, w.down, ids, topk_weights(2, 2, "cuda"), w.shared_down)


@requires_cuda
@pytest.mark.parametrize("T", [1, 16, 64])
def test_cuda_pdl_off_same_bits(T, monkeypatch):
    # Programmatic dependent launch changes when the CTAs start, never what they compute. Kernels
    # writing hidden and the ids run right before gate_up (its PDL predecessor), and act is written
    # by gate_up right before down: both must read them only after the wait.
    dtype = torch.bfloat16
    E, k, H, I, Is = 128, 6, 512, 128, 256
    w = Weights(E, H, I, Is, dtype, "cuda")
    base_hidden = torch.randn(T, H, device="cuda").to(dtype)
    base_ids = zipf_ids(T, k, E, "cuda")
    weights, residual = topk_weights(T, k, "cuda"), torch.randn(T, H, device="cuda").to(dtype)
    outs = []
    for pdl in ("1", "0"):
        monkeypatch.setenv("DOTS1_EXT_PDL", pdl)
        hidden = torch.zeros_like(base_hidden)
        ids = torch.zeros_like(base_ids)
        ids.copy_(base_ids)
        hidden.copy_(base_hidden * 2)  # the kernel right before gate_up
        outs.append(run_both(hidden, w, ids, weights, residual))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    check_pair(base_hidden * 2, w, base_ids, weights, residual, dtype, f"pdl T={T}")


@requires_cuda
def test_cuda_compile_reduce_overhead():
    dtype = torch.bfloat16
    E, k, H, I, Is, T = 16, 6, 256, 64, 128, 8
    w = Weights(E, H, I, Is, dtype, "cuda")
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, "cuda")

    def layer(x, i, wt, r):
        act = moe_decode_gate_up(x, w.gate_up, i, w.shared_gate_up, w.epilogue)
        return moe_decode_down(act, w.down, i, wt, w.shared_down, r)

    # A CUDA graph keeps the kernels its capture launched: the load mapping of an earlier test's capture
    # of this same code (dynamo reuses it for new weights) must not stand in for this test's.
    torch._dynamo.reset()
    fn = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        out = fn(hidden, ids, weights, residual)
    _, eager = run_both(hidden, w, ids, weights, residual)
    assert torch.equal(out, eager)


@requires_cuda
def test_cuda_read_only_inputs_unchanged():
    dtype = torch.bfloat16
    E, k, H, I, Is, T = 8, 3, 64, 32, 32, 5
    w = Weights(E, H, I, Is, dtype, "cuda")
    hidden = torch.randn(T, H, device="cuda").to(dtype)
    ids = distinct_ids(T, k, E, "cuda")
    ids[0, 0] = 99
    weights, residual = topk_weights(T, k, "cuda"), torch.randn(T, H, device="cuda").to(dtype)
    before = [t.clone() for t in (hidden, ids, weights, residual, w.gate_up, w.down, w.shared_gate_up, w.shared_down)]
    run_both(hidden, w, ids, weights, residual)
    torch.cuda.synchronize()
    after = (hidden, ids, weights, residual, w.gate_up, w.down, w.shared_gate_up, w.shared_down)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@requires_cuda
def test_cuda_bad_kernel_setting_raises(monkeypatch):
    # An unrecognised DOTS1_EXT_MOE_DECODE_KERNEL is an error naming the variable, not the default.
    dtype = torch.bfloat16
    E, k, H, I, Is = 16, 6, 128, 64, 64
    w = Weights(E, H, I, Is, dtype, "cuda")
    hidden = torch.randn(2, H, device="cuda").to(dtype)
    ids = distinct_ids(2, k, E, "cuda")
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_KERNEL", "fastest")
    with pytest.raises(ValueError, match="DOTS1_EXT_MOE_DECODE_KERNEL"):
        moe_decode_gate_up(hidden, w.gate_up, ids, w.shared_gate_up)
    act = torch.randn(2, k * I + Is, device="cuda").to(dtype)
    with pytest.raises(ValueError, match="DOTS1_EXT_MOE_DECODE_KERNEL"):
        moe_decode_down(act, w.down, ids, topk_weights(2, k, "cuda"), w.shared_down)


# ---------------------------------------------------------------- CUDA, the wide mapping


def run_with_loads(loads, monkeypatch, *args):
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_LOADS", loads)
    return run_both(*args)


@requires_cuda
@pytest.mark.parametrize("T", list(range(1, WIDE_MAX_TOKENS + 2)))
@pytest.mark.parametrize("epilogue", ["swiglu", "swiglu_interleaved"])
def test_cuda_wide_every_token_count(T, epilogue, monkeypatch):
    # Every launch size the wide mapping takes (P = 4 up to 2 tokens, 2 above; one n-tile up to 4, two
    # up to 8) and the first one it leaves to frag (9), at the real shape: matches the reference, and
    # frag within tolerance (a different fp32 summation order).
    dtype = torch.bfloat16
    w = Weights(REAL["E"], REAL["H"], REAL["I"], REAL["Is"], dtype, "cuda", epilogue)
    hidden, ids, weights, residual = decode_inputs(T, REAL["k"], REAL["E"], REAL["H"], dtype, "cuda")
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_LOADS", "wide")
    act_w, out_w = check_pair(hidden, w, ids, weights, residual, dtype, f"wide T={T}")
    act_f, out_f = run_with_loads("frag", monkeypatch, hidden, w, ids, weights, residual)
    assert_rows_close(act_w, act_f.float(), dtype, what="act wide vs frag")
    assert_rows_close(out_w, out_f.float(), dtype, what="out wide vs frag")
    if T > WIDE_MAX_TOKENS:  # frag either way
        assert torch.equal(act_w, act_f) and torch.equal(out_w, out_f)


@requires_cuda
@pytest.mark.parametrize("routing", ["random", "hot"])
@pytest.mark.parametrize("T", [9, 16, 17, 33, 64, 65, 130])
def test_cuda_wide_all_batched(routing, T, monkeypatch):
    # DOTS1_EXT_MOE_DECODE_LOADS=wide_all above 8 tokens: P = 2, NT = 2 (items of 8 pairs, the shared
    # experts in T / 8 column groups), at the real shape; 65 and 130 tokens take two and three launches.
    # Matches the reference, and frag within tolerance (a different fp32 summation order).
    dtype = torch.bfloat16
    w = Weights(REAL["E"], REAL["H"], REAL["I"], REAL["Is"], dtype, "cuda", "swiglu_interleaved")
    hidden, ids, weights, residual = decode_inputs(T, REAL["k"], REAL["E"], REAL["H"], dtype, "cuda")
    if routing == "hot":  # one expert in every token's top-k, another in half: items of 8 pairs, many per expert
        ids[:, 0] = 5
        ids[::2, 1] = 77
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_LOADS", "wide_all")
    act_w, out_w = check_pair(hidden, w, ids, weights, residual, dtype, f"wide_all T={T} {routing}")
    act_f, out_f = run_with_loads("frag", monkeypatch, hidden, w, ids, weights, residual)
    assert_rows_close(act_w, act_f.float(), dtype, what="act wide_all vs frag")
    assert_rows_close(out_w, out_f.float(), dtype, what="out wide_all vs frag")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape",
    [(8, 1, 8, 8, 8), (8, 3, 40, 16, 0), (5, 2, 72, 24, 40), (13, 6, 1032, 136, 264), (3, 2, 8, 0, 8),
     (9, 4, 264, 40, 24)],
    ids=["tiny", "K-tail", "H%16", "odd-E", "I=0", "H-I-Is-tails"],
)
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8])
def test_cuda_wide_odd_shapes(dtype, shape, T, monkeypatch):
    # K not a multiple of a wide step (32 P), H % 16 == 8 (the down kernel's last CTA has no hi rows),
    # fewer steps than K ranges (tiny), no routed rows (I = 0), no shared experts (Is = 0).
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_LOADS", "wide")
    E, k, H, I, Is = shape
    w = Weights(E, H, I, Is, dtype, "cuda")
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, "cuda")
    check_pair(hidden, w, ids, weights, residual, dtype, f"wide {shape} T={T}")


def check_switch_same_bits(monkeypatch, variable, dtype, shape, T, loads_list, one_expert=False):
    """The pair under ``variable`` = 1, 0 and unset, per load mapping and routing (distinct, Zipf, bad ids
    and, with ``one_expert``, every token on experts 0..k-1): the same bits, the reference's values, and
    bad ids NaN in their tokens' rows."""
    E, k, H, I, Is = shape
    w = Weights(E, H, I, Is, dtype, "cuda", "swiglu_interleaved")
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, "cuda")
    bad_ids = ids.clone()
    bad_ids[0, 1], bad_ids[T - 1, k - 1] = E, -1
    routings = {"distinct": ids, "zipf": zipf_ids(T, k, E, "cuda"), "bad ids": bad_ids}
    if one_expert:
        routings["one expert"] = torch.arange(k, dtype=torch.int32, device="cuda").expand(T, k).contiguous()
    for loads in loads_list:
        monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_LOADS", loads)
        for what, routing in routings.items():
            results = {}
            for flag in ("1", "0", None):
                set_env(monkeypatch, variable, flag)
                results[flag] = run_both(hidden, w, routing, weights, residual)
            if what != "bad ids":
                check_outputs(*results["1"], hidden, w, routing, weights, residual, dtype, f"{variable} {loads} {what}")
            else:
                assert bool(results["1"][1][0].isnan().all()) and bool(results["1"][1][T - 1].isnan().all())
            for flag in ("0", None):
                assert_same_bits(results["1"][0], results[flag][0], f"act {variable}={flag} {loads} {what} T={T}")
                assert_same_bits(results["1"][1], results[flag][1], f"out {variable}={flag} {loads} {what} T={T}")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(128, 6, 4096, 1408, 2816), (13, 6, 1032, 136, 264), (8, 3, 40, 16, 0)],
                         ids=["real", "K-tail", "tiny"])
@pytest.mark.parametrize("T", [5, 8, 9, 33, 64, 65])
def test_cuda_wide_carry_same_bits(dtype, shape, T, monkeypatch):
    # DOTS1_EXT_MOE_DECODE_CARRY (default 1): in the wide launches of two n-tiles (5-8 tokens under wide,
    # 5-64 per launch under wide_all) each warp loads its first weight batch of the CTA's next routed
    # gate_up tile before the current tile's reduction and store. The same loads, issued earlier: 1, 0 and
    # unset give the same bits, and the reference's values; distinct, Zipf, one-expert (many items of one
    # expert, each tile's next one the same rows' neighbour) and bad ids; K not a multiple of the wide step
    # (K-tail: a partial first batch) and fewer routed tiles than CTAs (tiny: no next tile anywhere).
    check_switch_same_bits(monkeypatch, "DOTS1_EXT_MOE_DECODE_CARRY", dtype, shape, T, ("wide", "wide_all"),
                           one_expert=True)


@requires_cuda
def test_cuda_bad_carry_setting_raises(monkeypatch):
    w, x, ids = small_cuda_layer()
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_CARRY", "yes")
    with pytest.raises(ValueError, match="DOTS1_EXT_MOE_DECODE_CARRY"):
        moe_decode_gate_up(x, w.gate_up, ids, w.shared_gate_up, w.epilogue)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(128, 6, 4096, 1408, 2816), (13, 6, 1032, 136, 264), (8, 3, 40, 16, 0)],
                         ids=["real", "K-tail", "tiny no shared"])
@pytest.mark.parametrize("T", [1, 2, 8, 9, 33, 64, 65])
def test_cuda_down_preload_same_bits(dtype, shape, T, monkeypatch):
    # DOTS1_EXT_MOE_DECODE_DOWN_PRELOAD (default 1): the down kernel's warps load their first weight batch
    # of the shared experts' first pass before the PDL wait (right after gate_up here, so the wait is
    # real), and each pass loads the next pass's (more tokens than a pass's columns: 9-65). The same loads,
    # issued earlier: 1, 0 and unset give the same bits and the reference's values, in every load mapping;
    # K-tail: a partial first batch; no shared experts: nothing to preload.
    check_switch_same_bits(monkeypatch, "DOTS1_EXT_MOE_DECODE_DOWN_PRELOAD", dtype, shape, T,
                           ("frag", "wide", "wide_all"))


@requires_cuda
def test_cuda_bad_down_preload_setting_raises(monkeypatch):
    w, x, ids = small_cuda_layer()
    act = moe_decode_gate_up(x, w.gate_up, ids, w.shared_gate_up, w.epilogue)
    weights = torch.rand(ids.shape, device="cuda")
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_DOWN_PRELOAD", "on")
    with pytest.raises(ValueError, match="DOTS1_EXT_MOE_DECODE_DOWN_PRELOAD"):
        moe_decode_down(act, w.down, ids, weights, w.shared_down, None)


@requires_cuda
@pytest.mark.parametrize("routing", ["all_same_id", "duplicates_in_row", "same_experts_everywhere"])
@pytest.mark.parametrize("T", [1, 2, 3, 4, 6, 8])
def test_cuda_wide_hot_experts(routing, T, monkeypatch):
    # More pairs on one expert than a wide item's columns (2 at P = 4, 4 at P = 2 and one n-tile): the
    # expert becomes several items, re-read side by side.
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_LOADS", "wide")
    dtype = torch.bfloat16
    E, k, H, I, Is = 10, 4, 256, 64, 64
    ids = distinct_ids(T, k, E, "cpu")
    if routing == "all_same_id":
        ids = torch.full((T, k), 3, dtype=torch.int32)
    elif routing == "duplicates_in_row":
        ids[:, 1] = ids[:, 0]
        ids[:, 2] = ids[:, 0]
    else:
        ids = torch.randperm(E)[:k].to(torch.int32).expand(T, k).contiguous()
    ids = ids.cuda()
    w = Weights(E, H, I, Is, dtype, "cuda")
    hidden = torch.randn(T, H, device="cuda").to(dtype)
    weights, residual = topk_weights(T, k, "cuda"), torch.randn(T, H, device="cuda").to(dtype)
    check_pair(hidden, w, ids, weights, residual, dtype, f"wide {routing} T={T}")
    a1, o1 = run_both(hidden, w, ids, weights, residual)
    a2, o2 = run_both(hidden, w, ids, weights, residual)
    assert torch.equal(a1, a2) and torch.equal(o1, o2)


@requires_cuda
@pytest.mark.parametrize("T", [1, 2, 4, 7])
def test_cuda_wide_shared_only_and_no_shared(T, monkeypatch):
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_LOADS", "wide")
    dtype = torch.bfloat16
    H, I, Is = 128, 32, 48
    w = Weights(4, H, I, Is, dtype, "cuda")
    hidden = torch.randn(T, H, device="cuda").to(dtype)
    ids = torch.zeros(T, 0, dtype=torch.int32, device="cuda")
    check_pair(hidden, w, ids, torch.zeros(T, 0, device="cuda"), torch.randn(T, H, device="cuda").to(dtype), dtype,
               "wide shared only")
    w0 = Weights(6, H, I, 0, dtype, "cuda")
    ids = distinct_ids(T, 3, 6, "cuda")
    check_pair(hidden, w0, ids, topk_weights(T, 3, "cuda"), None, dtype, "wide no shared")


@requires_cuda
@pytest.mark.parametrize("T", [1, 2, 4, 8])
def test_cuda_wide_bad_ids(T, monkeypatch):
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_LOADS", "wide")
    dtype = torch.bfloat16
    E, k, H, I, Is = 8, 3, 64, 32, 32
    w = Weights(E, H, I, Is, dtype, "cuda")
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, "cuda")
    ids[0, 1] = -1
    ids[T - 1, 2] = E
    act, out = run_both(hidden, w, ids, weights, residual)
    bad = {(0, 1), (T - 1, 2)}
    for t in range(T):
        for j in range(k):
            assert bool(act[t, j * I:(j + 1) * I].isnan().all()) == ((t, j) in bad), (t, j)
            assert bool(act[t, j * I:(j + 1) * I].isnan().any()) == ((t, j) in bad), (t, j)
        assert not act[t, k * I:].isnan().any()
        assert bool(out[t].isnan().all()) == (t in {0, T - 1})
    assert_rows_close(act, ref_gate_up(hidden, w, ids), dtype, equal_nan=True, what="act")
    assert_rows_close(out, ref_down(act, w, ids, weights, residual), dtype, equal_nan=True, what="out")


@requires_cuda
@pytest.mark.parametrize("T", [1, 3, 8])
def test_cuda_wide_graph_replay(T, monkeypatch):
    # Captured under wide, replayed with new ids (the schedule is rebuilt on the device), equal to eager
    # wide bit for bit; the setting is read at capture, so a later frag setting does not change the graph.
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_LOADS", "wide")
    dtype = torch.bfloat16
    E, k, H, I, Is = 32, 6, 256, 128, 128
    w = Weights(E, H, I, Is, dtype, "cuda")
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, "cuda")
    graph, (act, out) = capture_cuda_graph(lambda: run_both(hidden, w, ids, weights, residual))
    for pattern in ["distinct", "one_id", "bad"]:
        redraw_ids_(ids, pattern, E)
        hidden.copy_(torch.randn_like(hidden))
        monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_LOADS", "frag")
        replay_poisoned(graph, act, out)
        monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_LOADS", "wide")
        eager_act, eager_out = run_both(hidden, w, ids, weights, residual)
        assert_same_bits(act, eager_act, pattern)
        assert_same_bits(out, eager_out, pattern)


@requires_cuda
@pytest.mark.parametrize("T", [2, 4, 8, 16])
def test_cuda_wide_ignores_n_tiles_override(T, monkeypatch):
    # DOTS1_EXT_MOE_DECODE_NT forces the frag launches' n-tiles; the wide launches (T <= 8) pick their own.
    dtype = torch.bfloat16
    E, k, H, I, Is = 24, 6, 256, 64, 128
    w = Weights(E, H, I, Is, dtype, "cuda")
    hidden, ids, weights, residual = decode_inputs(T, k, E, H, dtype, "cuda")
    base = run_with_loads("wide", monkeypatch, hidden, w, ids, weights, residual)
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_NT", "4")
    forced = check_pair(hidden, w, ids, weights, residual, dtype, f"wide NT=4 T={T}")
    if T <= WIDE_MAX_TOKENS:
        assert torch.equal(base[0], forced[0]) and torch.equal(base[1], forced[1])


@requires_cuda
def test_cuda_bad_loads_setting_raises(monkeypatch):
    w, x, ids = small_cuda_layer()
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_LOADS", "wider")
    with pytest.raises(ValueError, match="DOTS1_EXT_MOE_DECODE_LOADS"):
        moe_decode_gate_up(x, w.gate_up, ids, w.shared_gate_up)
    monkeypatch.delenv("DOTS1_EXT_MOE_DECODE_LOADS")
    act = moe_decode_gate_up(x, w.gate_up, ids, w.shared_gate_up)  # unset: frag
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_LOADS", "")
    assert torch.equal(moe_decode_gate_up(x, w.gate_up, ids, w.shared_gate_up), act)  # empty: frag
    monkeypatch.setenv("DOTS1_EXT_MOE_DECODE_LOADS", "Wide")
    with pytest.raises(ValueError, match="DOTS1_EXT_MOE_DECODE_LOADS"):
        moe_decode_down(act, w.down, ids, topk_weights(2, 2, "cuda"), w.shared_down)
