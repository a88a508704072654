"""permute / unpermute against dots1_ext.reference: exact equality (both are pure data movement or
the same fp32 operations in the same order), round trips, skewed routing, bad inputs."""

from __future__ import annotations

import pytest
import torch

from dots1_ext import reference as R
from dots1_ext.ops import permute, permuted_rows, unpermute
from tests.conftest import requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ids(T, k, E, device, mode="random"):
    if mode == "random":  # k distinct experts per token, as routing produces
        return torch.rand(T, E, device=device).argsort(dim=1)[:, :k].to(torch.int32).contiguous()
    if mode == "one_expert":  # every slot of every token on expert E-1
        return torch.full((T, k), E - 1, dtype=torch.int32, device=device)
    if mode == "half_empty":  # only even experts receive tokens
        return (torch.randint(0, (E + 1) // 2, (T, k), device=device) * 2).to(torch.int32)
    raise ValueError(mode)


def _assert_permute_equal(hidden, ids, E, pad_to):
    out = permute(hidden, ids, E, pad_to)
    ref = R.permute(hidden, ids, E, pad_to)
    for name, a, b in zip(("permuted", "expert_offsets", "row_map"), out, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{name} differs from the reference"
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,k,E,H", [(1, 6, 128, 64), (7, 2, 8, 24), (37, 6, 128, 40), (100, 8, 64, 13), (5, 1, 8, 8)])
@pytest.mark.parametrize("pad_to", [1, 16])
def test_permute_matches_reference(device, dtype, T, k, E, H, pad_to):
    hidden = torch.randn(T, H, device=device).to(dtype)
    _assert_permute_equal(hidden, _ids(T, k, E, device), E, pad_to)


@pytest.mark.parametrize("mode", ["one_expert", "half_empty"])
@pytest.mark.parametrize("pad_to", [1, 8])
def test_permute_skewed(device, mode, pad_to):
    T, k, E, H = 257, 6, 128, 32
    hidden = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    _assert_permute_equal(hidden, _ids(T, k, E, device, mode), E, pad_to)


@pytest.mark.parametrize("T,k,H", [(0, 6, 64), (1, 6, 4096), (7, 6, 4096), (4096, 6, 4096), (65536, 6, 64), (65536, 16, 32)])
def test_permute_token_counts(device, T, k, H):
    if device == "cpu" and T * H > 1 << 20:
        pytest.skip("large shapes only on CUDA (CPU suite stays fast)")
    E = 128
    hidden = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    _assert_permute_equal(hidden, _ids(T, k, E, device), E, 1)


def test_permute_non_contiguous(device):
    T, k, E, H = 33, 4, 16, 48
    hidden = torch.randn(T, 2 * H, device=device)[:, ::2]
    ids = _ids(T, 2 * k, E, device)[:, ::2]
    _assert_permute_equal(hidden, ids, E, 4)


def test_permute_unaligned_rows(device):
    # A row offset of one element: the CUDA kernel takes its element-wise path.
    T, k, E, H = 19, 3, 8, 64
    hidden = torch.randn(T * H + 1, device=device, dtype=torch.bfloat16)[1:].view(T, H)
    _assert_permute_equal(hidden, _ids(T, k, E, device), E, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_shared,with_residual", [(False, False), (True, False), (True, True), (False, True)])
# CUDA forms: k=6 with H a multiple of 16 bytes takes the compile-time top-6 kernel; other k (2, 8) the
# run-time one; k=40 reads slots past the 32 staged in shared memory; H=13 the unvectorized kernel.
@pytest.mark.parametrize("T,k,E,H", [(1, 6, 128, 64), (23, 6, 32, 72), (9, 40, 64, 8), (40, 2, 8, 13), (7, 2, 8, 32),
                                     (11, 8, 16, 24)])
def test_unpermute_matches_reference(device, dtype, with_shared, with_residual, T, k, E, H):
    S = permuted_rows(T, k, E, 4)
    expert_out = torch.randn(S, H, device=device).to(dtype)
    _, _, row_map = permute(torch.randn(T, H, device=device).to(dtype), _ids(T, k, E, device), E, 4)
    weights = torch.rand(T, k, device=device) * 2.5
    shared = torch.randn(T, H, device=device).to(dtype) if with_shared else None
    residual = torch.randn(T, H, device=device).to(dtype) if with_residual else None
    out = unpermute(expert_out, row_map, weights, shared, residual)
    ref = R.unpermute(expert_out, row_map, weights, shared, residual)
    assert out.dtype == dtype and out.shape == (T, H)
    # Same fp32 operations in the same order as the reference: equal bit for bit.
    assert torch.equal(out, ref), f"max abs diff {(out.float() - ref.float()).abs().max().item()}"


def test_unpermute_non_contiguous_and_empty(device):
    T, k, E, H = 12, 3, 8, 16
    big = torch.randn(T * k, 2 * H, device=device)
    expert_out = big[:, H:]
    row_map = torch.randperm(T * k, device=device).to(torch.int32)
    weights = torch.rand(k, T, device=device).t()
    assert torch.equal(unpermute(expert_out, row_map, weights), R.unpermute(expert_out, row_map, weights, None, None))
    out = unpermute(torch.randn(0, H, device=device), torch.zeros(0, dtype=torch.int32, device=device),
                    torch.rand(0, k, device=device))
    assert out.shape == (0, H)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pad_to", [1, 128])
def test_round_trip_exact(device, dtype, pad_to):
    T, k, E, H = 129, 6, 128, 256
    hidden = torch.randn(T, H, device=device).to(dtype)
    ids = _ids(T, k, E, device)
    permuted, offsets, row_map = permute(hidden, ids, E, pad_to)
    rows = row_map.long().view(T, k)
    for j in range(k):
        assert torch.equal(permuted[rows[:, j]], hidden)
    # Each segment sits at its offset, in (token, slot) order, starting at a multiple of pad_to.
    assert (offsets % pad_to == 0).all() and (offsets.diff() >= 0).all()
    counts = torch.bincount(ids.flatten().long(), minlength=E)
    assert torch.equal(offsets.diff(), (counts + pad_to - 1) // pad_to * pad_to)
    one_hot = torch.zeros(T, k, device=device)
    one_hot[:, 2] = 1.0
    assert torch.equal(unpermute(permuted, row_map, one_hot), hidden)


def test_unpermute_batch_independent(device):
    T, k, E, H = 64, 6, 32, 128
    expert_out = torch.randn(T * k, H, device=device, dtype=torch.bfloat16)
    _, _, row_map = permute(torch.randn(T, H, device=device), _ids(T, k, E, device), E, 1)
    weights = torch.rand(T, k, device=device)
    full = unpermute(expert_out, row_map, weights)
    part = unpermute(expert_out, row_map[: 5 * k], weights[:5])
    assert torch.equal(full[:5], part)
    assert torch.equal(full, unpermute(expert_out, row_map, weights))


@pytest.mark.parametrize("pad_to", [1, 4])
def test_out_of_range_ids_poison_their_tokens(device, pad_to):
    # Poison policy (every backend): a bad id takes no row (row_map -1) and the tokens it belongs to
    # come out of unpermute as NaN rows; everything else is exactly the reference's.
    T, k, E, H = 50, 4, 16, 64
    hidden = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    ids = _ids(T, k, E, device)
    bad = torch.rand(T, k, device=device) < 0.2
    bad[3, 1] = True
    bad[7, :] = False
    n_bad = int(bad.sum())
    ids[bad] = torch.tensor([-1, E, E + 100, -(2**31)], dtype=torch.int32, device=device).repeat(T * k)[:n_bad]
    permuted, offsets, row_map = _assert_permute_equal(hidden, ids, E, pad_to)  # == the reference, bit for bit
    flat_bad = bad.flatten()
    assert (row_map[flat_bad] == -1).all(), "a bad id must take no row"
    good = ~flat_bad
    assert torch.equal(permuted[row_map[good].long()], hidden.repeat_interleave(k, 0)[good])
    # Only valid ids counted: the segments are the reference's on the valid ids alone.
    counts = torch.bincount(ids.flatten()[good].long(), minlength=E)
    assert torch.equal(offsets.diff().long(), (counts + pad_to - 1) // pad_to * pad_to)
    assert (permuted[offsets[E].item():] == 0).all()
    expert_out = torch.randn(permuted.shape[0], H, device=device, dtype=torch.bfloat16)
    weights = torch.rand(T, k, device=device)
    out = unpermute(expert_out, row_map, weights, hidden, None)
    bad_tok = bad.any(dim=1)
    assert torch.isnan(out[bad_tok]).all(), "a token with a bad id must come out NaN"
    assert not torch.isnan(out[~bad_tok]).any()
    ref = R.unpermute(expert_out, row_map, weights, hidden, None)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(out[~bad_tok], ref[~bad_tok])
    with pytest.raises(IndexError, match="topk_ids"):
        permute(hidden, ids, E, pad_to, check_ids=True)


# k=6 with 16-byte rows takes the CUDA kernel's compile-time top-6 form, k=3 its run-time form.
@pytest.mark.parametrize("k,dtype", [(3, torch.float32), (6, torch.float32), (6, torch.bfloat16), (3, torch.bfloat16)])
def test_out_of_range_row_map_poisons_the_row(device, k, dtype):
    T, H = 12, 16
    expert_out = torch.randn(T * k, H, device=device).to(dtype)
    row_map = torch.randperm(T * k, device=device).to(torch.int32)
    row_map[k + 1] = -5  # token 1
    row_map[3 * k + 1] = T * k  # token 3
    row_map[4 * k - 1] = 2**31 - 1  # token 3
    weights = torch.rand(T, k, device=device)
    out = unpermute(expert_out, row_map, weights, None, expert_out[:T])
    ref = R.unpermute(expert_out, row_map, weights, None, expert_out[:T])
    poisoned = torch.zeros(T, dtype=torch.bool, device=device)
    poisoned[[1, 3]] = True
    assert torch.isnan(out[poisoned]).all() and torch.isnan(ref[poisoned]).all()
    assert torch.equal(out[~poisoned], ref[~poisoned]) and not torch.isnan(out[~poisoned]).any()
    # S == 0: every entry is out of range.
    out = unpermute(torch.randn(0, H, device=device), torch.zeros(2 * k, dtype=torch.int32, device=device),
                    torch.rand(2, k, device=device))
    assert out.shape == (2, H) and torch.isnan(out).all()


@requires_cuda
def test_dispatch_run_to_run_bitwise():
    T, k, E, H = 4096, 6, 128, 4096
    hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = _ids(T, k, E, "cuda")
    a, b = permute(hidden, ids, E), permute(hidden, ids, E)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    weights = torch.rand(T, k, device="cuda")
    shared = torch.randn_like(hidden)
    assert torch.equal(unpermute(a[0], a[2], weights, shared, hidden), unpermute(b[0], b[2], weights, shared, hidden))


@requires_cuda
@pytest.mark.parametrize("form", ["single", "multi"])
@pytest.mark.parametrize("T,k,E,mode,pad_to", [
    (1, 1, 8, "random", 1),          # one id: the multi-block form with an empty block
    (3, 6, 128, "random", 16),
    (1500, 6, 128, "random", 1),     # 9000 ids
    (2000, 6, 128, "one_expert", 8),  # one bin's ranks run across every block
    (2000, 6, 128, "half_empty", 1),
    (5000, 8, 1024, "random", 1),     # the most experts
    (4000, 3, 1, "one_expert", 4),    # one expert
    (65536, 6, 128, "random", 1),     # 393216 ids: the most blocks (256)
    (70001, 7, 64, "random", 32),     # more ids than 256 blocks of the least size
])
def test_permute_index_forms_match_the_reference(monkeypatch, form, T, k, E, mode, pad_to):
    # The CUDA index is one block (small N) or three launches over many blocks (large N); both must
    # give the reference's expert_offsets and row_map, with bad ids, padding and skewed routing.
    monkeypatch.setenv("DOTS1_EXT_PERMUTE_INDEX", form)
    hidden = torch.randn(T, 8, device="cuda", dtype=torch.bfloat16)
    ids = _ids(T, k, E, "cuda", mode)
    if T > 1:
        ids.view(-1)[torch.randperm(T * k, device="cuda")[: T * k // 50 + 1]] = -1  # bad ids take no row
    _assert_permute_equal(hidden, ids, E, pad_to)


@requires_cuda
def test_permute_index_form_variable_is_checked(monkeypatch):
    hidden = torch.randn(4, 8, device="cuda")
    monkeypatch.setenv("DOTS1_EXT_PERMUTE_INDEX", "blocks")
    with pytest.raises(ValueError, match="DOTS1_EXT_PERMUTE_INDEX must be auto, single or multi, got 'blocks'"):
        permute(hidden, _ids(4, 2, 8, "cuda"), 8)


@requires_cuda
@pytest.mark.parametrize("T,pad_to", [(100, 1), (100, 64), (2000, 1), (2000, 64)])
def test_dispatch_cuda_graph_replay(T, pad_to):
    # 100 tokens (600 ids) take the single-block index, 2000 (12000 ids) the multi-block one.
    k, E, H = 6, 128, 256
    hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = _ids(T, k, E, "cuda")
    weights = torch.rand(T, k, device="cuda")
    shared = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    outs = {}

    def step():
        permuted, offsets, row_map = permute(hidden, ids, E, pad_to)
        outs["p"] = (permuted, offsets, row_map)
        outs["u"] = unpermute(permuted * 2, row_map, weights, shared, hidden)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for mode in ("random", "one_expert", "half_empty"):
        hidden.copy_(torch.randn_like(hidden))
        ids.copy_(_ids(T, k, E, "cuda", mode))
        weights.copy_(torch.rand_like(weights))
        graph.replay()
        torch.cuda.synchronize()
        ref = R.permute(hidden, ids, E, pad_to)
        assert all(torch.equal(a, b) for a, b in zip(outs["p"], ref)), mode
        assert torch.equal(outs["u"], R.unpermute(ref[0] * 2, ref[2], weights, shared, hidden)), mode


def test_opcheck(device):
    T, k, E, H = 11, 3, 8, 16
    hidden = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    ids = _ids(T, k, E, device)
    torch.library.opcheck(torch.ops.dots1_ext.permute.default, (hidden, ids, E, 1))
    torch.library.opcheck(torch.ops.dots1_ext.permute.default, (hidden, ids, E, 8))
    permuted, _, row_map = permute(hidden, ids, E, 1)
    w = torch.rand(T, k, device=device)
    torch.library.opcheck(torch.ops.dots1_ext.unpermute.default, (permuted, row_map, w, None, None))
    torch.library.opcheck(torch.ops.dots1_ext.unpermute.default, (permuted, row_map, w, hidden, hidden))


def test_bad_inputs(device):
    T, k, E, H = 4, 2, 8, 16
    hidden = torch.randn(T, H, device=device)
    ids = _ids(T, k, E, device)
    with pytest.raises(TypeError, match="topk_ids"):
        permute(hidden, ids.long(), E)
    with pytest.raises(TypeError, match="hidden"):
        permute(hidden.int(), ids, E)
    with pytest.raises(ValueError, match="topk_ids"):
        permute(hidden, ids[:3], E)
    with pytest.raises(ValueError, match="hidden"):
        permute(hidden[0], ids, E)
    with pytest.raises(ValueError, match="num_experts"):
        permute(hidden, ids, 0)
    with pytest.raises(ValueError, match="num_experts"):
        permute(hidden, ids, 5000)
    with pytest.raises(ValueError, match="pad_to"):
        permute(hidden, ids, E, 0)
    with pytest.raises(ValueError, match="int32"):
        permute(hidden, ids, E, 2**30)
    permuted, _, row_map = permute(hidden, ids, E)
    w = torch.rand(T, k, device=device)
    with pytest.raises(ValueError, match="row_map"):
        unpermute(permuted, row_map[:-1], w)
    with pytest.raises(TypeError, match="row_map"):
        unpermute(permuted, row_map.long(), w)
    with pytest.raises(TypeError, match="topk_weights"):
        unpermute(permuted, row_map, w.half())
    with pytest.raises(TypeError, match="shared_out"):
        unpermute(permuted, row_map, w, hidden.half())
    with pytest.raises(ValueError, match="residual"):
        unpermute(permuted, row_map, w, None, hidden[:, :8])
    with pytest.raises(TypeError, match="expert_out"):
        unpermute(permuted.int(), row_map, w)


@requires_cuda
def test_bad_device():
    hidden = torch.randn(4, 16, device="cuda")
    with pytest.raises((ValueError, RuntimeError), match="topk_ids"):
        permute(hidden, _ids(4, 2, 8, "cpu"), 8)
    with pytest.raises((ValueError, RuntimeError), match="row_map"):
        unpermute(torch.randn(8, 16, device="cuda"), torch.arange(8, dtype=torch.int32), torch.rand(4, 2, device="cuda"))
