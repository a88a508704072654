"""topk_gating / router_topk_gating against dots1_ext.reference (ids exactly, weights to fp32 tolerance)."""

from __future__ import annotations

import pytest
import torch

from dots1_ext import reference as R
from dots1_ext.ops import router_topk_gating, topk_gating
from tests.conftest import assert_rows_close, requires_cuda

DOTS1 = dict(k=6, n_group=1, topk_group=1, renormalize=True, scale=2.5)


def _draw(T, E, device, spread=2.0):
    logits = torch.randn(T, E, device=device) * spread
    bias = torch.randn(E, device=device) * 0.1
    return logits, bias


def _routing_cases():
    cases = []
    for E in (8, 64, 128, 256):
        for k in (1, 2, 6, 8):
            for n_group in (1, 4, 8):
                if k > E or E % n_group:
                    continue
                topk_group = max(1, n_group // 2)
                if k > topk_group * (E // n_group):
                    topk_group = n_group
                cases.append((E, k, n_group, topk_group))
    return cases


def _check(logits, bias, k, n_group, topk_group, renormalize=True, scale=1.0):
    w, ids = topk_gating(logits, bias, k, n_group, topk_group, renormalize, scale)
    rw, rids = R.topk_gating(logits, bias, k, n_group, topk_group, renormalize, scale)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, rids), f"ids differ in {int((ids != rids).any(1).sum())} of {ids.shape[0]} tokens"
    assert_rows_close(w, rw, torch.float32, what="weights", equal_nan=True)
    return w, ids


@pytest.mark.parametrize("E,k,n_group,topk_group", _routing_cases())
def test_topk_gating_matches_reference(device, E, k, n_group, topk_group):
    for draw in range(4):
        T = (37, 1, 7, 200)[draw] if device == "cpu" else (37, 1, 7, 4096)[draw]
        logits, bias = _draw(T, E, device)
        _check(logits, bias, k, n_group, topk_group, renormalize=draw % 2 == 0, scale=(1.0, 2.5)[draw % 2])


@pytest.mark.parametrize("T", [0, 1, 7, 4096, 65536])
def test_topk_gating_token_counts(device, T):
    if device == "cpu" and T > 4096:
        pytest.skip("large T only on CUDA (CPU suite stays fast)")
    logits, bias = _draw(T, 128, device)
    _check(logits, bias, **DOTS1)


@pytest.mark.parametrize("E,k,n_group,topk_group", [(128, 6, 1, 1), (64, 8, 8, 4), (256, 8, 8, 4), (8, 8, 1, 1), (512, 16, 8, 2)])
def test_topk_gating_ties_lower_id_wins(device, E, k, n_group, topk_group):
    T = 64
    # Few distinct values: many exact ties among experts and among groups.
    logits = torch.randint(-2, 2, (T, E), device=device).float()
    bias = torch.randint(0, 2, (E,), device=device).float() * 0.5
    _check(logits, bias, k, n_group, topk_group)
    # All equal: experts 0..k-1 (within the lowest groups) in order.
    w, ids = topk_gating(torch.zeros(3, E, device=device), torch.zeros(E, device=device), k, n_group, topk_group)
    assert ids.tolist() == [list(range(k))] * 3
    torch.testing.assert_close(w, torch.full_like(w, 1.0 / k))


def test_topk_gating_non_contiguous(device):
    logits = torch.randn(128, 50, device=device).t()  # [50, 128], strided
    bias = torch.randn(256, device=device)[::2] * 0.1
    _check(logits, bias, **DOTS1)


def test_topk_gating_extreme_logits(device):
    logits = torch.randn(33, 128, device=device) * 40  # saturated sigmoids: many scores 0 or 1 exactly
    bias = torch.zeros(128, device=device)
    _check(logits, bias, **DOTS1)


def _nan(negative: bool = False) -> float:
    return -float("nan") if negative else float("nan")


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("E,k,n_group,topk_group", [(128, 6, 1, 1), (64, 8, 8, 4), (256, 8, 8, 4), (32, 4, 4, 1),
                                                     (40, 3, 1, 1), (512, 16, 8, 2)])
def test_topk_gating_nan_ranks_highest(device, E, k, n_group, topk_group, renormalize):
    # torch.topk's policy on every backend: NaN (either sign) ranks above every number, NaN ties to the
    # lower id; a group holding a NaN is kept first. CPU kernel, CUDA kernel and reference agree.
    T = 48
    logits, bias = _draw(T, E, device)
    g = torch.Generator().manual_seed(E * 31 + k)
    for t in range(T):
        n = t % 5  # 0..4 NaN per token, at random experts, random signs
        where = torch.randperm(E, generator=g)[:n].tolist()
        for j, e in enumerate(where):
            logits[t, e] = _nan(negative=(t + j) % 2 == 1)
    logits[T - 1] = float("nan")  # every expert NaN: ids 0..k-1 of the first groups, in order
    logits[T - 2, :] = -float("inf")
    logits[T - 2, E - 1] = float("nan")  # NaN beats -inf everywhere (and +inf: next token)
    logits[T - 3, 0] = float("inf")
    logits[T - 3, E // 2] = float("nan")
    w, ids = _check(logits, bias, k, n_group, topk_group, renormalize, 2.5)
    choice = logits.sigmoid() + bias
    nan_choice = torch.isnan(choice)
    for t in range(T):
        nan_ids = torch.nonzero(nan_choice[t]).flatten().tolist()
        if n_group == 1 and nan_ids:
            # The NaN experts come first, in id order, as far as k allows.
            assert ids[t, : min(k, len(nan_ids))].tolist() == nan_ids[:k], f"token {t}"
            if len(nan_ids) <= k:  # and the same set as torch.topk picks
                assert set(ids[t].tolist()) == set(torch.topk(choice[t], k).indices.tolist()), f"token {t}"
        if nan_ids:
            assert torch.isnan(w[t]).any(), f"token {t}: a NaN expert must give NaN weights"
            if renormalize:
                assert torch.isnan(w[t]).all()
    assert ids[T - 1].tolist() == list(range(k))
    assert ids[T - 2, 0].item() == E - 1 and ids[T - 3, 0].item() == E // 2
    # A NaN in the bias is a NaN score for every token.
    bias_nan = bias.clone()
    bias_nan[5] = float("nan")
    _, ids = _check(torch.randn(9, E, device=device), bias_nan, k, n_group, topk_group, renormalize, 1.0)
    if n_group == 1:
        assert (ids[:, 0] == 5).all()


def _well_separated(choice: torch.Tensor, k: int, margin: float) -> torch.Tensor:
    top = choice.sort(dim=-1, descending=True).values[:, : k + 1]
    return (top[:, :-1] - top[:, 1:]).min(dim=-1).values > margin


@pytest.mark.parametrize("T", [1, 3, 8, 9, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("E,H,n_group,topk_group", [(128, 4096, 1, 1), (64, 264, 4, 2), (40, 100, 1, 1)])
def test_router_topk_gating(device, T, dtype, E, H, n_group, topk_group):
    if device == "cpu" and H > 1024 and T > 8:
        pytest.skip("keep the CPU suite fast")
    k = 6
    hidden = torch.randn(T, H, device=device).to(dtype)
    router_weight = (torch.randn(E, H, device=device) / H**0.5).to(dtype)
    bias = torch.randn(E, device=device) * 0.1
    w, ids = router_topk_gating(hidden, router_weight, bias, k, n_group, topk_group, True, 2.5)
    rw, rids = R.router_topk_gating(hidden, router_weight, bias, k, n_group, topk_group, True, 2.5)
    # The fused decode path sums the projection in another order than cuBLAS: compare ids where the
    # biased scores are separated by more than that rounding; weights to a matching tolerance.
    logits = hidden.float() @ router_weight.float().t()
    choice = logits.sigmoid() + bias
    sep = _well_separated(choice, k, 1e-5) if n_group == 1 else torch.ones(T, dtype=torch.bool, device=device)
    assert sep.float().mean() > 0.5
    assert torch.equal(ids[sep], rids[sep])
    assert_rows_close(w[sep], rw[sep], torch.float32, rtol=1e-4, what="weights")
    if device == "cpu":
        assert torch.equal(ids, rids)  # same GEMM as the reference: exact


def test_router_topk_gating_mixed_dtypes(device):
    hidden = torch.randn(4, 256, device=device, dtype=torch.bfloat16)
    router_weight = torch.randn(64, 256, device=device) / 16  # fp32 weight, bf16 hidden: GEMM path
    bias = torch.randn(64, device=device) * 0.1
    w, ids = router_topk_gating(hidden, router_weight, bias, 4)
    rw, rids = R.router_topk_gating(hidden, router_weight, bias, 4, 1, 1, True, 1.0)
    assert torch.equal(ids, rids)
    assert_rows_close(w, rw, torch.float32, rtol=1e-5, what="weights")


def test_router_topk_gating_empty(device):
    w, ids = router_topk_gating(torch.randn(0, 64, device=device), torch.randn(16, 64, device=device),
                                torch.zeros(16, device=device), 2)
    assert w.shape == (0, 2) and ids.shape == (0, 2)


@requires_cuda
def test_gating_run_to_run_bitwise():
    logits, bias = _draw(4096, 128, "cuda")
    a = topk_gating(logits, bias, **DOTS1)
    b = topk_gating(logits, bias, **DOTS1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    hidden = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(128, 4096, device="cuda", dtype=torch.bfloat16) / 64
    a = router_topk_gating(hidden, weight, bias, 6, 1, 1, True, 2.5)
    b = router_topk_gating(hidden, weight, bias, 6, 1, 1, True, 2.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@requires_cuda
@pytest.mark.parametrize("T", [1, 8, 512])
def test_gating_cuda_graph_replay(T):
    E, H = 128, 512
    logits, bias = _draw(T, E, "cuda")
    hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(E, H, device="cuda") / H**0.5).to(torch.bfloat16)
    outs = {}

    def step():
        outs["g"] = topk_gating(logits, bias, **DOTS1)
        outs["r"] = router_topk_gating(hidden, weight, bias, 6, 1, 1, True, 2.5)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up (cluster-size query, cuBLAS handles) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        logits.copy_(torch.randn_like(logits) * 2)
        hidden.copy_(torch.randn_like(hidden))
        graph.replay()
        torch.cuda.synchronize()
        rw, rids = R.topk_gating(logits, bias, 6, 1, 1, True, 2.5)
        assert torch.equal(outs["g"][1], rids)
        assert_rows_close(outs["g"][0], rw, torch.float32, rtol=1e-5, what="weights")
        rw, rids = R.router_topk_gating(hidden, weight, bias, 6, 1, 1, True, 2.5)
        choice = (hidden.float() @ weight.float().t()).sigmoid() + bias
        sep = _well_separated(choice, 6, 1e-5)
        assert torch.equal(outs["r"][1][sep], rids[sep])


def test_opcheck(device):
    logits, bias = _draw(9, 64, device)
    torch.library.opcheck(torch.ops.dots1_ext.topk_gating.default, (logits, bias, 6, 4, 2, True, 2.5))
    hidden = torch.randn(3, 96, device=device, dtype=torch.bfloat16)
    weight = torch.randn(64, 96, device=device, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.dots1_ext.router_topk_gating.default, (hidden, weight, bias, 6, 1, 1, True, 1.0))


ERRORS = (TypeError, ValueError, RuntimeError)


def test_bad_inputs(device):
    logits, bias = _draw(4, 64, device)
    with pytest.raises(TypeError, match="logits"):
        topk_gating(logits.half(), bias, 6)
    with pytest.raises(TypeError, match="bias"):
        topk_gating(logits, bias.double(), 6)
    with pytest.raises(ValueError, match="logits"):
        topk_gating(logits[0], bias, 6)
    with pytest.raises(ValueError, match="bias"):
        topk_gating(logits, bias[:32], 6)
    with pytest.raises(ValueError, match="k must be"):
        topk_gating(logits, bias, 65)
    with pytest.raises(ValueError, match="k must be"):
        topk_gating(logits[:, :8], bias[:8], 9)
    with pytest.raises(ValueError, match="k must be"):
        topk_gating(logits, bias, 0)
    with pytest.raises(ValueError, match="n_group"):
        topk_gating(logits, bias, 6, n_group=5, topk_group=1)
    with pytest.raises(ValueError, match="topk_group"):
        topk_gating(logits, bias, 6, n_group=4, topk_group=5)
    with pytest.raises(ValueError, match="exceeds the experts in the kept groups"):
        topk_gating(logits, bias, 6, n_group=16, topk_group=1)
    with pytest.raises(ValueError, match="number of experts"):
        topk_gating(torch.randn(2, 520, device=device), torch.zeros(520, device=device), 2)
    hidden = torch.randn(2, 32, device=device)
    with pytest.raises(ValueError, match="router_weight"):
        router_topk_gating(hidden, torch.randn(64, 31, device=device), bias, 6)
    with pytest.raises(TypeError, match="hidden"):
        router_topk_gating(hidden.int(), torch.randn(64, 32, device=device), bias, 6)
    with pytest.raises(ValueError, match="bias"):
        router_topk_gating(hidden, torch.randn(64, 32, device=device), bias[:10], 6)


@requires_cuda
def test_bad_device():
    logits, bias = _draw(4, 64, "cuda")
    with pytest.raises(ERRORS, match="bias"):
        topk_gating(logits, bias.cpu(), 6)
    with pytest.raises(ERRORS, match="router_weight"):
        router_topk_gating(torch.randn(2, 32, device="cuda"), torch.randn(64, 32), bias, 6)


# ---- every router kernel for T <= ROUTER_FUSED_MAX_TOKENS, forced by DOTS1_EXT_ROUTER_KERNEL ----

ROUTER_KERNELS = ["grid", "cluster", "gemm"]


def _router_case(T, E, H, dtype, device, offset=0):
    hidden = torch.randn(T * H + offset, device=device).to(dtype)[offset:].view(T, H)  # offset: unaligned rows
    router_weight = (torch.randn(E, H, device=device) / max(H, 1) ** 0.5).to(dtype)
    bias = torch.randn(E, device=device) * 0.1
    return hidden, router_weight, bias


def _check_router(hidden, router_weight, bias, k, n_group, topk_group, renormalize=True, scale=2.5):
    w, ids = router_topk_gating(hidden, router_weight, bias, k, n_group, topk_group, renormalize, scale)
    rw, rids = R.router_topk_gating(hidden, router_weight, bias, k, n_group, topk_group, renormalize, scale)
    assert w.shape == rw.shape and ids.shape == rids.shape
    logits = hidden.float() @ router_weight.float().t()
    choice = logits.sigmoid() + bias
    T = hidden.shape[0]
    sep = _well_separated(choice, k, 1e-5) if n_group == 1 else torch.ones(T, dtype=torch.bool, device=hidden.device)
    assert torch.equal(ids[sep], rids[sep])
    assert_rows_close(w[sep], rw[sep], torch.float32, rtol=1e-4, what="weights")
    assert not torch.isnan(w).any()  # every output element written
    return w, ids


@requires_cuda
@pytest.mark.parametrize("kernel", ROUTER_KERNELS)
@pytest.mark.parametrize("T", [1, 2, 4, 7, 8, 9, 15, 16, 17])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("E,H,k,n_group,topk_group", [(128, 4096, 6, 1, 1), (64, 264, 6, 4, 2), (40, 100, 3, 1, 1),
                                                       (512, 1536, 16, 8, 2), (8, 8, 8, 1, 1), (256, 5000, 8, 8, 4)])
def test_router_kernels(monkeypatch, kernel, T, dtype, E, H, k, n_group, topk_group):
    monkeypatch.setenv("DOTS1_EXT_ROUTER_KERNEL", kernel)
    hidden, router_weight, bias = _router_case(T, E, H, dtype, "cuda")
    _check_router(hidden, router_weight, bias, k, n_group, topk_group)
    _check_router(hidden, router_weight, bias, k, n_group, topk_group, renormalize=False, scale=1.0)


@requires_cuda
@pytest.mark.parametrize("kernel", ROUTER_KERNELS)
@pytest.mark.parametrize("T", [1, 5, 16])
def test_router_kernels_unaligned_and_odd(monkeypatch, kernel, T):
    # Unaligned hidden rows and H not a multiple of a 16-byte vector: the fused kernels' scalar paths.
    monkeypatch.setenv("DOTS1_EXT_ROUTER_KERNEL", kernel)
    for H, offset in ((4096, 1), (1027, 0), (1, 0), (0, 0)):
        hidden, router_weight, bias = _router_case(T, 128, H, torch.bfloat16, "cuda", offset)
        _check_router(hidden, router_weight, bias, 6, 1, 1)


@pytest.mark.parametrize("kernel", ROUTER_KERNELS)
def test_router_strided_bias_same_result(monkeypatch, device, kernel):
    # The fused kernels read the bias before their PDL wait, as a weight; a strided bias is copied by the
    # op first (that copy is then the launch right before), so the op launches without PDL: same result.
    if device == "cpu" and kernel != "grid":
        pytest.skip("the kernels are CUDA ones; the CPU kernel runs once")
    monkeypatch.setenv("DOTS1_EXT_ROUTER_KERNEL", kernel)
    T, E, H = 3, 128, 512
    hidden, weight, bias = _router_case(T, E, H, torch.bfloat16, device)
    strided = torch.zeros(2 * E, device=device)[::2]
    strided.copy_(bias)
    for renormalize, scale in ((True, 2.5), (False, 1.0)):
        w, ids = router_topk_gating(hidden, weight, strided, 6, 1, 1, renormalize, scale)
        w_ref, ids_ref = router_topk_gating(hidden, weight, bias, 6, 1, 1, renormalize, scale)
        assert torch.equal(ids, ids_ref) and torch.equal(w, w_ref)
    _check_router(hidden, weight, strided, 6, 1, 1)


@requires_cuda
@pytest.mark.parametrize("kernel", ROUTER_KERNELS)
def test_router_kernels_nan_and_ties(monkeypatch, kernel):
    monkeypatch.setenv("DOTS1_EXT_ROUTER_KERNEL", kernel)
    T, E, H = 16, 128, 256
    hidden, router_weight, bias = _router_case(T, E, H, torch.bfloat16, "cuda")
    hidden[3, 7] = float("nan")  # NaN logits for token 3: every expert NaN -> ids 0..5, NaN weights
    w, ids = router_topk_gating(hidden, router_weight, bias, 6, 1, 1, True, 1.0)
    assert ids[3].tolist() == list(range(6)) and torch.isnan(w[3]).all()
    rw, rids = R.router_topk_gating(hidden, router_weight, bias, 6, 1, 1, True, 1.0)
    assert torch.equal(ids[3], rids[3])
    # All-zero hidden: every logit 0 exactly, ties to the lowest ids.
    w, ids = router_topk_gating(torch.zeros(T, H, device="cuda", dtype=torch.bfloat16), router_weight,
                                torch.zeros(E, device="cuda"), 6, 4, 2, True, 1.0)
    assert ids.tolist() == [list(range(6))] * T
    torch.testing.assert_close(w, torch.full_like(w, 1.0 / 6))


@requires_cuda
@pytest.mark.parametrize("kernel", ["grid", "cluster"])
@pytest.mark.parametrize("T", [1, 4, 16])
def test_router_kernels_graph_replay_and_bitwise(monkeypatch, kernel, T):
    # The grid kernel's arrival counter is reset by the kernel itself: many replays of a graph with
    # several router launches (and eager launches between replays) stay correct and bitwise stable.
    monkeypatch.setenv("DOTS1_EXT_ROUTER_KERNEL", kernel)
    E, H = 128, 4096
    hidden, weight, bias = _router_case(T, E, H, torch.bfloat16, "cuda")
    outs = []

    def step():
        outs.clear()
        for _ in range(3):
            outs.append(router_topk_gating(hidden, weight, bias, 6, 1, 1, True, 2.5))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for it in range(70):  # more replays than the kernel has arrival slots
        if it % 10 == 0:
            hidden.copy_(torch.randn_like(hidden))
        graph.replay()
        eager = router_topk_gating(hidden, weight, bias, 6, 1, 1, True, 2.5)
        torch.cuda.synchronize()
        for w, ids in outs:
            assert torch.equal(w, eager[0]) and torch.equal(ids, eager[1]), f"replay {it}"
    _check_router(hidden, weight, bias, 6, 1, 1)


def test_router_kernel_env_rejects_unknown(monkeypatch, device):
    if device != "cuda":
        pytest.skip("the variable is read by the CUDA implementation")
    monkeypatch.setenv("DOTS1_EXT_ROUTER_KERNEL", "fast")
    with pytest.raises(ValueError, match="DOTS1_EXT_ROUTER_KERNEL"):
        router_topk_gating(torch.randn(1, 64, device=device), torch.randn(16, 64, device=device),
                           torch.zeros(16, device=device), 2)


@requires_cuda
def test_router_rank_env_rejects_unknown(monkeypatch):
    monkeypatch.setenv("DOTS1_EXT_ROUTER_KERNEL", "grid")
    monkeypatch.setenv("DOTS1_EXT_ROUTER_RANK", "yes")
    with pytest.raises(ValueError, match="DOTS1_EXT_ROUTER_RANK"):
        router_topk_gating(torch.randn(1, 64, device="cuda"), torch.randn(16, 64, device="cuda"),
                           torch.zeros(16, device="cuda"), 2)


@requires_cuda
@pytest.mark.parametrize("T", [1, 3, 9, 16])
@pytest.mark.parametrize("E,k,n_group,topk_group", [(128, 6, 1, 1), (128, 16, 1, 1), (8, 8, 1, 1), (40, 3, 1, 1),
                                                    (64, 1, 1, 1), (256, 8, 1, 1), (512, 16, 1, 1), (64, 6, 4, 2)])
def test_grid_router_rank_routing_same_bits(monkeypatch, T, E, k, n_group, topk_group):
    # The grid router's last block routes by ranks (route_by_rank, the default) or with gate_token's
    # rounds (DOTS1_EXT_ROUTER_RANK=0): the same logits in both, so the same ids and weights, bit for
    # bit, also for NaN logits and tied scores (E = 512 and group limits take gate_token either way).
    monkeypatch.setenv("DOTS1_EXT_ROUTER_KERNEL", "grid")
    H = 512
    hidden, router_weight, bias = _router_case(T, E, H, torch.bfloat16, "cuda")
    bias[: E // 2] = bias[E // 2: 2 * (E // 2)].clone()  # equal biases in pairs of experts
    if T > 1:
        hidden[1] = 0.0  # token 1: every logit 0, its scores tied but for the bias
    if T > 2:
        hidden[2, 5] = float("nan")  # token 2: NaN logits
    for renormalize, scale in ((True, 2.5), (False, 1.0)):
        outs = []
        for rank in ("0", "1"):
            monkeypatch.setenv("DOTS1_EXT_ROUTER_RANK", rank)
            outs.append(router_topk_gating(hidden, router_weight, bias, k, n_group, topk_group, renormalize, scale))
        (w0, ids0), (w1, ids1) = outs
        assert torch.equal(ids0, ids1)
        assert torch.equal(torch.isnan(w0), torch.isnan(w1))
        assert torch.equal(w0.nan_to_num(nan=-7.0), w1.nan_to_num(nan=-7.0))
        assert ((ids1 >= 0) & (ids1 < E)).all()  # every output element written
    if T > 2:
        assert ids1[2].tolist() == list(range(k)) and torch.isnan(w1[2]).all()
