"""decode_step_inputs (the decode step's embedding and integer inputs in one launch) against
dots1_ext.reference and against what Dots1Model computed before it (embed + step_inputs).

Covers fp32/bf16/fp16 embeddings; B in {0, 1, 3, 8, 65} and hidden sizes that take the 16-byte path
and the element path (odd H, a misaligned row stride); left padding (cache_start > 0, positions
clamped at 0); bad token ids (NaN rows, the other rows intact) and slots outside the cache (cache row
and kv_end -1); every output element written (outputs poisoned by the allocator are not read: the
op allocates them, so the check is exact equality with the reference, bitwise); CUDA graph replay
with the slot and tokens changed on the device; torch.compile and opcheck; bad arguments raising
errors that name them.
"""

from __future__ import annotations

import pytest
import torch

from dots1_ext import reference
from dots1_ext.ops import decode_step_inputs
from tests.conftest import requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_case(B, V, H, S, dtype, device, slot, starts=None, tokens=None, row_stride=None):
    weight = torch.randn(V, row_stride or H, dtype=dtype, device=device)[:, :H]
    if tokens is None:
        tokens = torch.randint(0, V, (B,), device=device)
    tokens = torch.as_tensor(tokens, dtype=torch.int64, device=device)
    if starts is None:
        starts = torch.randint(0, max(min(slot, S) + 1, 1), (B,)) if B else torch.zeros(0)
    cache_start = torch.as_tensor(starts, dtype=torch.int64, device=device).reshape(B)
    return tokens, torch.tensor([slot], dtype=torch.int64, device=device), cache_start, weight


def assert_equal_outputs(got, want):
    names = ("x", "positions", "cache_rows", "kv_end")
    for g, w, name in zip(got, want, names):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        assert torch.equal(torch.isnan(g), torch.isnan(w)) if g.is_floating_point() else True, name
        assert torch.equal(g.nan_to_num(0.0), w.nan_to_num(0.0)) if g.is_floating_point() else torch.equal(g, w), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [0, 1, 3, 8, 65])
@pytest.mark.parametrize("H,row_stride", [(64, None), (256, None), (37, None), (64, 65)])
def test_matches_reference(device, dtype, B, H, row_stride):
    V, S, slot = 50, 40, 17
    case = make_case(B, V, H, S, dtype, device, slot, row_stride=row_stride)
    got = decode_step_inputs(*case, S)
    assert_equal_outputs(got, reference.decode_step_inputs(*case, S))
    if B:
        tokens, _, cache_start, weight = case
        x, positions, cache_rows, kv_end = got
        assert torch.equal(x, weight[tokens])  # the embedding rows, bitwise
        assert torch.equal(positions, (slot - cache_start).clamp_min(0))
        assert torch.equal(cache_rows, torch.arange(B, device=device) * S + slot)
        assert torch.equal(kv_end, torch.full((B,), slot + 1, device=device))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bad_token_ids_poison_their_rows_only(device, dtype):
    V, H, S, slot = 20, 64, 16, 5
    tokens = [3, -1, V, 0, 2**40, V - 1]
    case = make_case(len(tokens), V, H, S, dtype, device, slot, tokens=tokens)
    x, positions, cache_rows, kv_end = decode_step_inputs(*case, S)
    bad = torch.tensor([False, True, True, False, True, False], device=device)
    assert bool(torch.isnan(x[bad]).all()), "a bad id must give a NaN row"
    assert torch.equal(x[~bad], case[3][case[0][~bad]])
    assert torch.equal(kv_end, torch.full((len(tokens),), slot + 1, device=device))  # the ints are unaffected
    assert_equal_outputs((x, positions, cache_rows, kv_end), reference.decode_step_inputs(*case, S))


@pytest.mark.parametrize("slot", [-1, 16, 17, 2**40, -(2**40)])
def test_slot_outside_the_cache_gives_minus_one(device, slot):
    B, V, H, S = 4, 20, 32, 16
    case = make_case(B, V, H, S, torch.float32, device, slot, starts=[0, 1, 2, 3])
    x, positions, cache_rows, kv_end = decode_step_inputs(*case, S)
    assert torch.equal(cache_rows, torch.full((B,), -1, device=device))
    assert torch.equal(kv_end, torch.full((B,), -1, device=device))
    assert_equal_outputs((x, positions, cache_rows, kv_end), reference.decode_step_inputs(*case, S))


def test_positions_clamp_at_zero_under_left_padding(device):
    B, V, H, S, slot = 4, 20, 32, 16, 3
    case = make_case(B, V, H, S, torch.float32, device, slot, starts=[0, 3, 4, 15])
    _, positions, cache_rows, _ = decode_step_inputs(*case, S)
    assert positions.tolist() == [3, 0, 0, 0]
    assert cache_rows.tolist() == [3, S + 3, 2 * S + 3, 3 * S + 3]


def test_matches_what_the_model_computed_before(device):
    """The model's decode step: the op's outputs equal Dots1Model.embed + step_inputs (the path prefill
    and the upcast parity run still take)."""
    from dots1_ext.model import build_random_model
    from dots1_ext.tiny import tiny_config

    model = build_random_model(tiny_config(), device=device, dtype=torch.float32)
    B, S = 3, 24
    model.setup_cache(B, S)
    model.model.cache_start.copy_(torch.tensor([0, 2, 9]))
    tokens = torch.tensor([5, -3, 7], device=device)
    slot = torch.tensor([8], device=device)
    x, positions, cache_rows, kv_end = decode_step_inputs(tokens, slot, model.model.cache_start,
                                                          model.model.embed_tokens.weight, S)
    step = model.model.step_inputs(slot, S)
    x_before = model.model.embed(tokens.view(B, 1))
    assert torch.equal(torch.isnan(x), torch.isnan(x_before)) and torch.equal(x.nan_to_num(), x_before.nan_to_num())
    assert torch.equal(positions, step.positions) and torch.equal(cache_rows, step.cache_rows)
    assert torch.equal(kv_end, step.kv_end)


@requires_cuda
def test_graph_replay_reads_the_device_slot_and_tokens():
    V, H, S, B = 30, 128, 64, 4
    tokens, slot, cache_start, weight = make_case(B, V, H, S, torch.bfloat16, "cuda", 5)
    decode_step_inputs(tokens, slot, cache_start, weight, S)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = decode_step_inputs(tokens, slot, cache_start, weight, S)
    for new_slot, new_tokens in ((9, [1, 2, 3, 4]), (63, [29, 0, -1, 30]), (64, [7, 7, 7, 7])):
        slot.fill_(new_slot)
        tokens.copy_(torch.tensor(new_tokens))
        graph.replay()
        torch.cuda.synchronize()
        assert_equal_outputs(outs, reference.decode_step_inputs(tokens, slot, cache_start, weight, S))


def test_compile_and_opcheck(device):
    case = make_case(3, 20, 32, 16, torch.float32, device, 4)
    torch.library.opcheck(torch.ops.dots1_ext.decode_step_inputs.default, (*case, 16))
    compiled = torch.compile(decode_step_inputs, fullgraph=True, backend="eager" if device == "cpu" else "inductor")
    assert_equal_outputs(compiled(*case, 16), decode_step_inputs(*case, 16))


def test_bad_arguments_raise_naming_them(device):
    tokens, slot, cache_start, weight = make_case(3, 20, 32, 16, torch.float32, device, 4)
    with pytest.raises(TypeError, match="tokens"):
        decode_step_inputs(tokens.int(), slot, cache_start, weight, 16)
    with pytest.raises(ValueError, match="tokens"):
        decode_step_inputs(tokens.view(3, 1), slot, cache_start, weight, 16)
    with pytest.raises(ValueError, match="slot"):
        decode_step_inputs(tokens, slot.reshape(()), cache_start, weight, 16)
    with pytest.raises(TypeError, match="slot"):
        decode_step_inputs(tokens, slot.int(), cache_start, weight, 16)
    with pytest.raises(ValueError, match="cache_start"):
        decode_step_inputs(tokens, slot, cache_start[:2], weight, 16)
    with pytest.raises(TypeError, match="embed_weight"):
        decode_step_inputs(tokens, slot, cache_start, weight.double(), 16)
    with pytest.raises(ValueError, match="embed_weight"):
        decode_step_inputs(tokens, slot, cache_start, weight.t(), 16)
    with pytest.raises(ValueError, match="cache_len"):
        decode_step_inputs(tokens, slot, cache_start, weight, 0)
    with pytest.raises(ValueError, match="cache_len .* overflows"):  # b * cache_len would wrap to another row
        decode_step_inputs(tokens, slot, cache_start, weight, 2**63 - 1)
    with pytest.raises(ValueError, match="cache_len .* overflows"):  # the op itself, as a compiled graph calls it
        torch.ops.dots1_ext.decode_step_inputs.default(tokens, slot, cache_start, weight, 2**62)
    if device == "cuda":
        with pytest.raises(ValueError, match="embed_weight"):
            decode_step_inputs(tokens, slot, cache_start, weight.cpu(), 16)
