"""decode_step_inputs (the decode step's embedding and integer inputs in one launch) against
dots1_ext.reference and against what Dots1Model computed before it (embed + step_inputs).

Covers fp32/bf16/fp16 embeddings; B in {0, 1, 3, 8, 65} and hidden sizes that take the 16-byte path
and the element path (odd H, a misaligned row stride); left padding (cache_start > 0, positions
clamped at 0); bad token ids (NaN rows, the other rows intact); slots outside the cache or past
cache_filled (cache row and kv_end -1, cache_filled unchanged), slots before a sequence's first real
slot (that sequence's cache row and kv_end -1) and usable ones (cache_filled set to slot + 1, rolling
back included); every output element written (outputs poisoned by the allocator are not read: the
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
    """(tokens, slot, cache_start, embed_weight): the op's leading arguments; run() adds the rest."""
    weight = torch.randn(V, row_stride or H, dtype=dtype, device=device)[:, :H]
    if tokens is None:
        tokens = torch.randint(0, V, (B,), device=device)
    tokens = torch.as_tensor(tokens, dtype=torch.int64, device=device)
    if starts is None:
        starts = torch.randint(0, max(min(slot, S) + 1, 1), (B,)) if B else torch.zeros(0)
    cache_start = torch.as_tensor(starts, dtype=torch.int64, device=device).reshape(B)
    return tokens, torch.tensor([slot], dtype=torch.int64, device=device), cache_start, weight


def filled_tensor(n, device):
    return torch.tensor([n], dtype=torch.int64, device=device)


def run(case, S, filled=None, fn=decode_step_inputs):
    """The op (or ``fn``) on ``case`` with cache_filled = ``filled`` (default: the slot itself, the next one
    to write). Returns (outputs, cache_filled after the call)."""
    filled = filled_tensor(int(case[1]) if filled is None else filled, case[0].device)
    return fn(*case, S, filled), filled


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
    got, filled = run(case, S)
    want, want_filled = run(case, S, fn=reference.decode_step_inputs)
    assert_equal_outputs(got, want)
    assert int(filled) == int(want_filled) == (slot + 1 if B else slot)
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
    (x, positions, cache_rows, kv_end), _ = run(case, S)
    bad = torch.tensor([False, True, True, False, True, False], device=device)
    assert bool(torch.isnan(x[bad]).all()), "a bad id must give a NaN row"
    assert torch.equal(x[~bad], case[3][case[0][~bad]])
    assert torch.equal(kv_end, torch.full((len(tokens),), slot + 1, device=device))  # the ints are unaffected
    assert_equal_outputs((x, positions, cache_rows, kv_end), run(case, S, fn=reference.decode_step_inputs)[0])


@pytest.mark.parametrize("slot", [-1, 16, 17, 2**40, -(2**40)])
def test_slot_outside_the_cache_gives_minus_one(device, slot):
    B, V, H, S = 4, 20, 32, 16
    case = make_case(B, V, H, S, torch.float32, device, slot, starts=[0, 1, 2, 3])
    (x, positions, cache_rows, kv_end), filled = run(case, S, filled=2**50)  # every slot counts as written
    assert torch.equal(cache_rows, torch.full((B,), -1, device=device))
    assert torch.equal(kv_end, torch.full((B,), -1, device=device))
    assert int(filled) == 2**50, "an unusable slot must leave cache_filled as it was"
    assert_equal_outputs((x, positions, cache_rows, kv_end),
                         run(case, S, filled=2**50, fn=reference.decode_step_inputs)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("filled,usable", [(0, False), (4, False), (6, False), (7, True), (8, True), (15, True),
                                           (-1, False), (2**62, True)])
def test_slot_past_the_written_slots_gives_minus_one(device, dtype, filled, usable):
    """slot 7 with cache_filled slots written: usable iff 7 <= filled (7 itself is the next one to write;
    below it a row no step wrote). A usable slot sets cache_filled to 8, rolling a longer one back."""
    B, V, H, S, slot = 3, 20, 64, 16, 7
    case = make_case(B, V, H, S, dtype, device, slot, starts=[0, 2, 5])
    (x, positions, cache_rows, kv_end), after = run(case, S, filled=filled)
    want, want_after = run(case, S, filled=filled, fn=reference.decode_step_inputs)
    assert_equal_outputs((x, positions, cache_rows, kv_end), want)
    if usable:
        assert cache_rows.tolist() == [slot, S + slot, 2 * S + slot] and kv_end.tolist() == [slot + 1] * B
        assert int(after) == int(want_after) == slot + 1
    else:
        assert cache_rows.tolist() == [-1] * B and kv_end.tolist() == [-1] * B
        assert int(after) == int(want_after) == filled
    assert torch.equal(x, case[3][case[0]])  # the embedding and the positions do not depend on it
    assert positions.tolist() == [7, 5, 2]


def test_steps_advance_cache_filled_and_a_gap_stays_poisoned(device):
    """Step by step with one cache_filled tensor: slots 4, 5, 6 advance it; slot 8 (slot 7 unwritten) is
    poisoned and leaves it at 7, so slot 9 after it is poisoned too; slot 7 then works, and slot 2 rolls
    back to 3."""
    B, V, H, S = 2, 20, 32, 16
    filled = filled_tensor(4, device)
    for slot, usable, after in ((4, True, 5), (5, True, 6), (6, True, 7), (8, False, 7), (9, False, 7),
                                (7, True, 8), (2, True, 3), (4, False, 3)):
        case = make_case(B, V, H, S, torch.float32, device, slot, starts=[0, 1])
        _, _, cache_rows, kv_end = decode_step_inputs(*case, S, filled)
        assert (kv_end.tolist() == [slot + 1] * B) == usable and (cache_rows.tolist() == [-1] * B) != usable, slot
        assert int(filled) == after, slot


def test_positions_clamp_at_zero_under_left_padding(device):
    B, V, H, S, slot = 4, 20, 32, 16, 3
    case = make_case(B, V, H, S, torch.float32, device, slot, starts=[0, 3, 4, 15])
    (_, positions, cache_rows, kv_end), filled = run(case, S)
    assert positions.tolist() == [3, 0, 0, 0]
    # Sequences 2 and 3 start after slot 3: it is their padding. Sequence 1's first real slot is 3.
    assert cache_rows.tolist() == [3, S + 3, -1, -1] and kv_end.tolist() == [4, 4, -1, -1]
    assert int(filled) == 4  # the others wrote slot 3
    assert_equal_outputs(run(case, S)[0], run(case, S, fn=reference.decode_step_inputs)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_slot_before_a_sequences_first_real_slot_poisons_that_sequence_only(device, dtype):
    """A left-padded sequence whose cache_start is after the slot: the range [cache_start, slot + 1) is
    empty (or reversed), which decode_attention would read as a plausible zero; cache row and kv_end
    -1 for that sequence, the others untouched, cache_filled advanced (sequence 0 included)."""
    B, V, H, S, slot = 5, 20, 64, 16, 6
    case = make_case(B, V, H, S, dtype, device, slot, starts=[7, 0, 6, 12, 5])
    (x, positions, cache_rows, kv_end), filled = run(case, S)
    assert cache_rows.tolist() == [-1, S + slot, 2 * S + slot, -1, 4 * S + slot]
    assert kv_end.tolist() == [-1, slot + 1, slot + 1, -1, slot + 1]
    assert positions.tolist() == [0, 6, 0, 0, 1] and int(filled) == slot + 1
    assert torch.equal(x, case[3][case[0]])
    assert_equal_outputs((x, positions, cache_rows, kv_end), run(case, S, fn=reference.decode_step_inputs)[0])


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
    # Usable (but slots 8 and 2 are sequence 2's padding), past the written, outside the cache.
    for slot_value, filled in ((8, 8), (8, 20), (2, 20), (8, 7), (30, 40)):
        slot = torch.tensor([slot_value], device=device)
        model.model.cache_filled.fill_(filled)
        step = model.model.step_inputs(slot, S)  # reads cache_filled, leaves it alone
        assert int(model.model.cache_filled) == filled
        x, positions, cache_rows, kv_end = decode_step_inputs(tokens, slot, model.model.cache_start,
                                                              model.model.embed_tokens.weight, S,
                                                              model.model.cache_filled)
        assert torch.equal(positions, step.positions) and torch.equal(cache_rows, step.cache_rows), slot_value
        assert torch.equal(kv_end, step.kv_end), slot_value
    x_before = model.model.embed(tokens.view(B, 1))
    assert torch.equal(torch.isnan(x), torch.isnan(x_before)) and torch.equal(x.nan_to_num(), x_before.nan_to_num())


@requires_cuda
def test_graph_replay_reads_the_device_slot_and_tokens():
    V, H, S, B = 30, 128, 64, 4
    tokens, slot, cache_start, weight = make_case(B, V, H, S, torch.bfloat16, "cuda", 5)
    filled = filled_tensor(5, "cuda")
    decode_step_inputs(tokens, slot, cache_start, weight, S, filled)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = decode_step_inputs(tokens, slot, cache_start, weight, S, filled)
    for new_slot, new_filled, new_tokens in ((9, 9, [1, 2, 3, 4]), (63, 63, [29, 0, -1, 30]), (64, 64, [7, 7, 7, 7]),
                                             (20, 12, [1, 1, 1, 1]), (3, 40, [2, 2, 2, 2])):
        slot.fill_(new_slot)
        filled.fill_(new_filled)
        want_filled = filled.clone()
        tokens.copy_(torch.tensor(new_tokens))
        graph.replay()
        torch.cuda.synchronize()
        want = reference.decode_step_inputs(tokens, slot, cache_start, weight, S, want_filled)
        assert_equal_outputs(outs, want)
        assert int(filled) == int(want_filled), (new_slot, new_filled)


def test_compile_and_opcheck(device):
    case = make_case(3, 20, 32, 16, torch.float32, device, 4)
    torch.library.opcheck(torch.ops.dots1_ext.decode_step_inputs.default, (*case, 16, filled_tensor(4, device)))
    compiled = torch.compile(decode_step_inputs, fullgraph=True, backend="eager" if device == "cpu" else "inductor")
    for filled in (4, 3):  # usable (cache_filled -> 5 in place, through the compiled graph too), then not
        got, got_filled = run(case, 16, filled, fn=compiled)
        want, want_filled = run(case, 16, filled)
        assert_equal_outputs(got, want)
        assert int(got_filled) == int(want_filled) == (5 if filled == 4 else 3)


def test_bad_arguments_raise_naming_them(device):
    tokens, slot, cache_start, weight = make_case(3, 20, 32, 16, torch.float32, device, 4)
    filled = filled_tensor(4, device)
    with pytest.raises(TypeError, match="tokens"):
        decode_step_inputs(tokens.int(), slot, cache_start, weight, 16, filled)
    with pytest.raises(ValueError, match="tokens"):
        decode_step_inputs(tokens.view(3, 1), slot, cache_start, weight, 16, filled)
    with pytest.raises(ValueError, match="slot"):
        decode_step_inputs(tokens, slot.reshape(()), cache_start, weight, 16, filled)
    with pytest.raises(TypeError, match="slot"):
        decode_step_inputs(tokens, slot.int(), cache_start, weight, 16, filled)
    with pytest.raises(ValueError, match="cache_start"):
        decode_step_inputs(tokens, slot, cache_start[:2], weight, 16, filled)
    with pytest.raises(TypeError, match="embed_weight"):
        decode_step_inputs(tokens, slot, cache_start, weight.double(), 16, filled)
    with pytest.raises(ValueError, match="embed_weight"):
        decode_step_inputs(tokens, slot, cache_start, weight.t(), 16, filled)
    with pytest.raises(ValueError, match="cache_len"):
        decode_step_inputs(tokens, slot, cache_start, weight, 0, filled)
    with pytest.raises(ValueError, match="cache_len .* overflows"):  # b * cache_len would wrap to another row
        decode_step_inputs(tokens, slot, cache_start, weight, 2**63 - 1, filled)
    with pytest.raises(ValueError, match="cache_len .* overflows"):  # the op itself, as a compiled graph calls it
        torch.ops.dots1_ext.decode_step_inputs.default(tokens, slot, cache_start, weight, 2**62, filled)
    with pytest.raises(TypeError, match="cache_filled"):
        decode_step_inputs(tokens, slot, cache_start, weight, 16, filled.int())
    with pytest.raises(ValueError, match="cache_filled"):
        decode_step_inputs(tokens, slot, cache_start, weight, 16, filled.reshape(()))
    with pytest.raises(ValueError, match="cache_filled"):  # the op itself too
        torch.ops.dots1_ext.decode_step_inputs.default(tokens, slot, cache_start, weight, 16, filled.repeat(2))
    assert int(filled) == 4, "a rejected call must not touch cache_filled"
    if device == "cuda":
        with pytest.raises(ValueError, match="embed_weight"):
            decode_step_inputs(tokens, slot, cache_start, weight.cpu(), 16, filled)
        with pytest.raises(ValueError, match="cache_filled"):
            decode_step_inputs(tokens, slot, cache_start, weight, 16, filled.cpu())
