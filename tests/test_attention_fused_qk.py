"""qk_norm_rope_decode_attention (one launch) against its definition: qk_norm_rope_kv_cache_ then
decode_attention, the two ops the decode step runs otherwise.

Judged bitwise: the output (NaN patterns included) and both caches after the call, and q, k left as
they were. Covers fp32/bf16/fp16; B in {1, 3, 8}; MHA and GQA (Hq / Hk in {1, 4}; 16 = the two-op
fallback); head_dim 64/128 (fused) and 96 (fallback); lengths 1, mixed, a split boundary, the whole
cache, left padding, sliding windows; bad positions, bad and foreign cache rows, bad and empty ranges;
on the GPU forced split counts (1, 2, 4, 8, 16, auto) in both combine modes (workspace, cluster), CUDA
graph replay with changed lengths, determinism;
bad inputs raise naming the argument; opcheck; DOTS1_EXT_ATTENTION_FUSED_QK at the model level.
kv_settled (both ops: the CUDA kernel copies its first tiles before its PDL wait): the same bits as the
plain launch, with the new rows holding NaN until the step writes them (a copy issued too early would
read it), at lengths whose new row falls in the early tiles and past them, every split count mode and
both pipeline depths; a misaligned cache (copied by the op, the flag dropped); the model's switch.
"""

from __future__ import annotations

import math

import pytest
import torch

from dots1_ext import ops
from dots1_ext.ops import attention as A
from dots1_ext.rope import build_cos_sin_cache
from tests.conftest import capture_cuda_graph, requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-6


def make_inputs(B, Hq, Hk, D, S, dtype, device, pairs, window=0, seed=0):
    """The decode step's tensors: q, k, v views of one qkv activation, norm weights in the dtype, the
    model's cos/sin table, caches of random history, cache_rows at each sequence's slot kv_end - 1."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype=dtype, device=device)  # noqa: E731
    qkv = rand(B, (Hq + 2 * Hk) * D).view(B, Hq + 2 * Hk, D)
    q, k, v = qkv.split([Hq, Hk, Hk], dim=1)
    kv_start = torch.tensor([p[0] for p in pairs], dtype=torch.int64, device=device)
    kv_end = torch.tensor([p[1] for p in pairs], dtype=torch.int64, device=device)
    positions = (kv_end - 1 - kv_start).clamp_min(0)
    cache_rows = torch.arange(B, device=device) * S + kv_end - 1
    return dict(
        q=q, k=k, v=v, q_weight=1.0 + 0.1 * rand(D), k_weight=1.0 + 0.1 * rand(D), positions=positions,
        cos_sin_cache=build_cos_sin_cache(D, S, 10000.0, None, torch.device(device)), eps=EPS,
        k_cache=rand(B, S, Hk, D), v_cache=rand(B, S, Hk, D), cache_rows=cache_rows, kv_start=kv_start,
        kv_end=kv_end, window=window, scale=1.0 / math.sqrt(D),
    )


def two_ops(x, kv_settled=False):
    """The unfused pair on copies (q, k, caches): -> out, k_cache, v_cache. Cache rows other than the
    sequence's own slot kv_end - 1 are bad rows for the fused op: -1 here (documented contract)."""
    q, k = x["q"].clone(), x["k"].clone()
    k_cache, v_cache = x["k_cache"].clone(), x["v_cache"].clone()
    B, S = q.shape[0], k_cache.shape[1]
    kv_end = x["kv_end"]
    own = (kv_end >= 1) & (kv_end <= S) & (x["cache_rows"] == torch.arange(B, device=q.device) * S + kv_end - 1)
    rows = torch.where(own, x["cache_rows"], torch.full_like(x["cache_rows"], -1))
    ops.qk_norm_rope_kv_cache_(q, k, x["v"], x["q_weight"], x["k_weight"], x["positions"], x["cos_sin_cache"],
                               x["eps"], k_cache, v_cache, rows)
    out = ops.decode_attention(q, k_cache, v_cache, x["kv_start"], x["kv_end"], x["window"], x["scale"],
                               kv_settled=kv_settled)
    return out, k_cache, v_cache


def fused(x, k_cache=None, v_cache=None, kv_settled=False):
    k_cache = x["k_cache"].clone() if k_cache is None else k_cache
    v_cache = x["v_cache"].clone() if v_cache is None else v_cache
    out = ops.qk_norm_rope_decode_attention(
        x["q"], x["k"], x["v"], x["q_weight"], x["k_weight"], x["positions"], x["cos_sin_cache"], x["eps"], k_cache,
        v_cache, x["cache_rows"], x["kv_start"], x["kv_end"], x["window"], x["scale"], kv_settled=kv_settled)
    return out, k_cache, v_cache


def assert_bitwise(got, expected, what):
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def check_fused_equals_two_ops(x, what=""):
    q0, k0 = x["q"].clone(), x["k"].clone()
    out, kc, vc = fused(x)
    ref_out, ref_kc, ref_vc = two_ops(x)
    assert out.shape == x["q"].shape and out.dtype == x["q"].dtype and out.is_contiguous()
    assert_bitwise(out, ref_out, f"{what} output")
    assert_bitwise(kc, ref_kc, f"{what} k_cache")
    assert_bitwise(vc, ref_vc, f"{what} v_cache")
    assert torch.equal(x["q"], q0) and torch.equal(x["k"], k0), f"{what}: q and k must be left as they are"
    return out


def mixed_pairs(B, S):
    """Length 1, the whole cache, a split boundary (a multiple of 64 keys), left padding, random."""
    choices = [(0, 1), (0, S), (0, 128), (5, S - 3), (0, 129), (3, 4), (0, S // 2 + 1), (17, 200)]
    return [(min(s, S - 1), min(e, S)) for s, e in choices[:B]] if B <= len(choices) else \
        [choices[b % len(choices)] for b in range(B)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("Hq,Hk,D", [(4, 4, 128), (8, 2, 64), (16, 1, 64), (2, 2, 96)], ids=lambda v: str(v))
def test_equals_two_ops(device, dtype, B, Hq, Hk, D):
    S = 300
    x = make_inputs(B, Hq, Hk, D, S, dtype, device, mixed_pairs(B, S))
    check_fused_equals_two_ops(x)


@pytest.mark.parametrize("window", [1, 7, 200])
def test_sliding_window(device, window):
    B, S = 3, 300
    x = make_inputs(B, 8, 2, 128, S, torch.bfloat16, device, [(0, S), (2, 150), (0, 1)], window=window)
    check_fused_equals_two_ops(x, f"window {window}")


def test_bad_positions_and_cache_rows_poison_as_the_two_ops(device):
    B, Hq, Hk, D, S = 8, 8, 2, 128, 64
    pairs = [(0, 10), (0, 20), (0, 30), (0, 40), (0, 50), (2, 2), (5, 3), (0, 64)]
    x = make_inputs(B, Hq, Hk, D, S, torch.bfloat16, device, pairs)
    P = x["cos_sin_cache"].shape[0]
    x["positions"][1] = -1  # bad position: NaN q and k (its row receives the NaN k)
    x["positions"][2] = P
    x["cache_rows"][3] = -1  # bad row: nothing written, NaN output
    x["cache_rows"][4] = B * S  # past the cache
    x["cache_rows"][0] = 1 * S + 19  # sequence 1's slot: a foreign row counts as a bad one
    # 5: empty range, own row: written, output exactly 0; 6: kv_start > kv_end: written, NaN output
    out = check_fused_equals_two_ops(x)
    assert torch.isnan(out[[0, 1, 2, 3, 4, 6]]).all()
    assert torch.equal(out[5], torch.zeros_like(out[5]))
    assert not torch.isnan(out[7]).any()


def test_empty_cos_sin_table_poisons_every_sequence(device):
    x = make_inputs(2, 4, 4, 64, 32, torch.bfloat16, device, [(0, 5), (0, 32)])
    x["cos_sin_cache"] = x["cos_sin_cache"][:0]
    out = check_fused_equals_two_ops(x)
    assert torch.isnan(out).all()


def test_bad_inputs_raise_clear_errors(device):
    x = make_inputs(2, 4, 2, 64, 16, torch.bfloat16, device, [(0, 5), (0, 16)])

    def expect(error, match, **changes):
        with pytest.raises(error, match=match):
            fused({**x, **changes})

    expect(TypeError, "k must have dtype", k=x["k"].float())
    expect(ValueError, "v must have shape", v=x["v"][:, :1])
    expect(ValueError, "q_weight must have shape", q_weight=x["q_weight"][:32])
    expect(TypeError, "positions must have dtype", positions=x["positions"].int())
    expect(ValueError, "cache_rows must have shape", cache_rows=x["cache_rows"][:1])
    expect(TypeError, "cos_sin_cache must have dtype", cos_sin_cache=x["cos_sin_cache"].double())
    expect(ValueError, "kv_end must have shape", kv_end=x["kv_end"][:1])
    expect(ValueError, "window must be", window=-1)
    expect(ValueError, "eps must be finite and >= 0", eps=-1e-6)
    expect(ValueError, "eps must be finite and >= 0", eps=float("nan"))
    expect(ValueError, "head_dim", q=x["q"][:, :, :63], k=x["k"][:, :, :63], v=x["v"][:, :, :63])


def test_the_caches_must_not_share_memory(device):
    x = make_inputs(2, 4, 2, 64, 16, torch.bfloat16, device, [(0, 5), (0, 16)])
    kc = x["k_cache"].clone()
    with pytest.raises(ValueError, match="k_cache.*v_cache|v_cache.*k_cache"):
        fused(x, kc, kc)


@pytest.mark.parametrize("kv_settled", [False, True])
def test_opcheck(device, kv_settled):
    x = make_inputs(3, 8, 2, 128, 40, torch.bfloat16, device, [(0, 40), (2, 17), (5, 6)])
    x["k_cache"], x["v_cache"] = x["k_cache"].clone(), x["v_cache"].clone()
    args = tuple(x[n] for n in ("q", "k", "v", "q_weight", "k_weight", "positions", "cos_sin_cache", "eps", "k_cache",
                                "v_cache", "cache_rows", "kv_start", "kv_end", "window", "scale"))
    torch.library.opcheck(torch.ops.dots1_ext.qk_norm_rope_decode_attention.default, args + (kv_settled,))
    plain = tuple(x[n] for n in ("q", "k_cache", "v_cache", "kv_start", "kv_end", "window", "scale"))
    torch.library.opcheck(torch.ops.dots1_ext.decode_attention.default, plain + (kv_settled,))


# ------------------------------------------------------------------------------------------------
# kv_settled: the caller's promise that the bounds and every row but the new one predate the launch
# right before, so the CUDA kernels copy their first tiles before the PDL wait


def settled_pairs(S):
    """Lengths whose new row sits in the first tile (1, 2), at a tile edge of the first two (64, 65,
    129: the early copies' range), far past them (S, 1500), with left padding, and an empty range."""
    return [(0, 1), (0, 2), (0, 64), (3, 65), (0, 129), (0, S), (7, 1500), (4, 4)]


@pytest.mark.parametrize("combine", ["last", "workspace", "cluster"])
@pytest.mark.parametrize("splits", ["1", "4", "auto"])
@pytest.mark.parametrize("stages", ["3", "6"])
@pytest.mark.parametrize("Hq,Hk", [(32, 32), (32, 8)])
def test_kv_settled_same_bits(device, monkeypatch, combine, splits, stages, Hq, Hk):
    # kv_settled only moves the CUDA kernel's PDL wait: the same bits as the plain launch, for the pair
    # (decode_attention right after qk_norm_rope_kv_cache_, which writes the new row) and the fused op
    # (right after the torch ops of the inputs). The new rows hold NaN before the step writes them, so
    # a copy of one issued before the wait would show as a NaN output.
    if device == "cpu" and (combine, splits, stages) != ("last", "auto", "3"):
        pytest.skip("the switches select CUDA kernels; the CPU kernels ignore kv_settled (one case runs)")
    monkeypatch.setenv("DOTS1_EXT_ATTENTION_COMBINE", combine)
    monkeypatch.setenv("DOTS1_EXT_ATTENTION_SPLITS", splits)
    monkeypatch.setenv("DOTS1_EXT_ATTENTION_STAGES", stages)
    S = 2048
    pairs = settled_pairs(S)
    B = len(pairs)
    for seed, window in ((0, 0), (1, 0), (2, 300)):
        x = make_inputs(B, Hq, Hk, 128, S, torch.bfloat16, device, pairs, window=window, seed=seed)
        b = torch.arange(B, device=device)
        new_slot = (x["kv_end"] - 1).clamp_min(0)
        x["k_cache"][b, new_slot] = float("nan")
        x["v_cache"][b, new_slot] = float("nan")
        what = f"{combine} splits {splits} stages {stages} seed {seed} window {window}"
        plain = two_ops(x)
        settled = two_ops(x, kv_settled=True)
        for name, got, want in zip(("output", "k_cache", "v_cache"), settled, plain):
            assert_bitwise(got, want, f"{what}: two ops, {name}")
        assert not settled[0][:-1].isnan().any(), f"{what}: a stale new row was read"
        assert (settled[0][-1] == 0).all(), f"{what}: the empty range gives 0"
        fused_settled = fused(x, kv_settled=True)
        for name, got, want in zip(("output", "k_cache", "v_cache"), fused_settled, fused(x)):
            assert_bitwise(got, want, f"{what}: fused, {name}")
        assert_bitwise(fused_settled[0], plain[0], f"{what}: fused against the two ops")


def test_kv_settled_with_a_misaligned_cache(device):
    # A 16-bit cache one element off 4-byte alignment is copied by the op first (that copy is then the
    # launch right before the kernel, which writes every row): the flag is dropped, the bits stay.
    B, Hq, Hk, D, S = 3, 8, 2, 128, 300
    x = make_inputs(B, Hq, Hk, D, S, torch.bfloat16, device, [(0, 1), (0, 300), (5, 129)])
    n = B * S * Hk * D
    k_cache = torch.empty(n + 1, dtype=torch.bfloat16, device=device)[1:].view(B, S, Hk, D)
    k_cache.copy_(x["k_cache"])
    args = (x["q"], k_cache, x["v_cache"], x["kv_start"], x["kv_end"], 0, x["scale"])
    assert_bitwise(ops.decode_attention(*args, kv_settled=True), ops.decode_attention(*args), "misaligned cache")


def test_kv_settled_must_be_a_bool(device):
    x = make_inputs(2, 4, 4, 64, 20, torch.float32, device, [(0, 20), (3, 9)])
    plain = (x["q"], x["k_cache"], x["v_cache"], x["kv_start"], x["kv_end"], 0, x["scale"])
    with pytest.raises(TypeError, match="kv_settled"):
        ops.decode_attention(*plain, kv_settled=1)
    with pytest.raises(TypeError, match="kv_settled"):
        fused(x, kv_settled="yes")
    with pytest.raises(RuntimeError, match="bool.*kv_settled"):  # the schema's own check
        torch.ops.dots1_ext.decode_attention.default(*plain, "yes")


def test_env_switch(monkeypatch):
    monkeypatch.delenv(A.FUSED_QK_ENV, raising=False)
    assert not A.fused_qk_enabled()
    monkeypatch.setenv(A.FUSED_QK_ENV, "")  # empty = unset, as for every other switch
    assert not A.fused_qk_enabled()
    monkeypatch.setenv(A.FUSED_QK_ENV, "1")
    assert A.fused_qk_enabled()
    monkeypatch.setenv(A.FUSED_QK_ENV, "yes")
    with pytest.raises(ValueError, match=A.FUSED_QK_ENV):
        A.fused_qk_enabled()


# ------------------------------------------------------------------------------------------------
# CUDA only: split counts, graph replay, determinism


@requires_cuda
@pytest.mark.parametrize("combine", ["last", "workspace", "cluster"])
@pytest.mark.parametrize("splits", ["1", "2", "4", "8", "16", "auto"])
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("Hq,Hk", [(32, 32), (32, 8)])
def test_dots1_shapes_every_split_count(monkeypatch, combine, splits, B, Hq, Hk):
    # Both ops run in the same combine mode; test_attention.py shows the plain op's two modes give the
    # same bits at a split count, so the fused op's do too.
    monkeypatch.setenv("DOTS1_EXT_ATTENTION_COMBINE", combine)
    monkeypatch.setenv("DOTS1_EXT_ATTENTION_SPLITS", splits)
    S = 2048
    pairs = [(0, S), (0, 1), (0, 1024), (0, 1025), (7, 1500), (0, 64), (0, 65), (100, 2000)][:B]
    for window in (0, 300):
        x = make_inputs(B, Hq, Hk, 128, S, torch.bfloat16, "cuda", pairs, window=window)
        check_fused_equals_two_ops(x, f"{combine} splits {splits} window {window}")


@requires_cuda
@pytest.mark.parametrize("splits", ["1", "2", "auto"])
@pytest.mark.parametrize("B", [1, 3])
def test_pipeline_depths_same_bits(monkeypatch, splits, B):
    # The fused op's new row, put into the stage slots by its own CTA, lands in a different stage
    # under each depth: same output and caches either way, and equal to the two ops.
    monkeypatch.setenv("DOTS1_EXT_ATTENTION_SPLITS", splits)
    S = 2048
    pairs = [(0, S), (7, 1500), (0, 65)][:B]
    x = make_inputs(B, 32, 32, 128, S, torch.bfloat16, "cuda", pairs, window=0)
    results = {}
    for stages in ("3", "6"):
        monkeypatch.setenv("DOTS1_EXT_ATTENTION_STAGES", stages)
        results[stages] = check_fused_equals_two_ops(x, f"stages {stages} splits {splits}")
    assert_bitwise(results["6"], results["3"], f"splits {splits}: the two depths")


@requires_cuda
@pytest.mark.parametrize("combine", ["last", "workspace", "cluster"])
@pytest.mark.parametrize("Hq,Hk", [(32, 32), (16, 2)])
def test_cuda_graph_replay_with_changed_lengths(monkeypatch, combine, Hq, Hk):
    monkeypatch.setenv("DOTS1_EXT_ATTENTION_COMBINE", combine)
    B, D, S = 3, 128, 1000
    x = make_inputs(B, Hq, Hk, D, S, torch.bfloat16, "cuda", [(0, S)] * B)
    k_cache, v_cache = x["k_cache"].clone(), x["v_cache"].clone()
    fn = lambda: fused(x, k_cache, v_cache)[0]  # noqa: E731
    graph, static_out = capture_cuda_graph(fn)
    for step, ends in enumerate([[S] * B, [1] * B, [37, 640, 999], [S - 1] * B, [65, 64, 129]]):
        kv_end = torch.tensor(ends, device="cuda")
        x["kv_end"].copy_(kv_end)
        x["kv_start"].copy_(torch.tensor([min(e - 1, 3 * b) for b, e in enumerate(ends)], device="cuda"))
        x["positions"].copy_(x["kv_end"] - 1 - x["kv_start"])
        x["cache_rows"].copy_(torch.arange(B, device="cuda") * S + kv_end - 1)
        x["q"].normal_()
        x["k"].normal_()
        x["v"].normal_()
        before_k, before_v = k_cache.clone(), v_cache.clone()
        graph.replay()
        torch.cuda.synchronize()
        replay_k, replay_v = k_cache.clone(), v_cache.clone()
        k_cache.copy_(before_k)
        v_cache.copy_(before_v)
        ref_out, ref_k, ref_v = two_ops({**x, "k_cache": before_k, "v_cache": before_v})
        assert_bitwise(static_out, ref_out, f"replay step {step} output")
        assert_bitwise(replay_k, ref_k, f"replay step {step} k_cache")
        assert_bitwise(replay_v, ref_v, f"replay step {step} v_cache")
        k_cache.copy_(replay_k)
        v_cache.copy_(replay_v)


@requires_cuda
@pytest.mark.parametrize("splits", ["1", "16", "auto"])
def test_deterministic(monkeypatch, splits):
    monkeypatch.setenv("DOTS1_EXT_ATTENTION_SPLITS", splits)
    x = make_inputs(4, 32, 8, 128, 3000, torch.bfloat16, "cuda", [(0, 3000), (0, 1), (9, 2000), (0, 1537)])
    first = fused(x)
    for _ in range(3):
        again = fused(x)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@requires_cuda
def test_pdl_off_same_bits(monkeypatch):
    x = make_inputs(3, 32, 32, 128, 2048, torch.bfloat16, "cuda", [(0, 2048), (0, 1), (5, 999)])
    on = fused(x)
    monkeypatch.setenv("DOTS1_EXT_PDL", "0")
    off = fused(x)
    for a, b in zip(on, off):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# The model: DOTS1_EXT_ATTENTION_FUSED_QK=1 against 0


def test_model_decode_fused_switch(device, monkeypatch):
    from tests.test_model import tiny_ours

    # head_dim 64 takes the fused kernel on the GPU; GQA and a sliding window in one of the layers.
    model = tiny_ours(device, num_hidden_layers=2, head_dim=64, num_key_value_heads=2, sliding_window=3,
                      layer_types=["sliding_attention", "full_attention"])
    tokens = torch.randint(0, 96, (3, 9), device=device)
    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(A.FUSED_QK_ENV, flag)
        model.setup_cache(3, 12)
        model.prefill(tokens[:, :4])
        steps = [model.decode(tokens[:, slot], slot).float() for slot in range(4, 9)]
        assert all(torch.isfinite(step).all() for step in steps), "the comparison below would pass on NaN"
        caches = [(layer.self_attn.k_cache.clone(), layer.self_attn.v_cache.clone()) for layer in model.model.layers]
        runs[flag] = steps, caches
    # The ops agree bitwise; at the model level the GPU gets the graph tests' margin in case another
    # kernel of the step is not run-to-run bitwise.
    tol = 0.0 if device == "cpu" else 1e-5
    close = lambda a, b, what: torch.testing.assert_close(  # noqa: E731
        a, b, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")
    for n, (a, b) in enumerate(zip(runs["0"][0], runs["1"][0])):
        close(b, a, f"decode step {n} logits")
    for layer, ((k0, v0), (k1, v1)) in enumerate(zip(runs["0"][1], runs["1"][1])):
        close(k1, k0, f"layer {layer} k_cache")
        close(v1, v0, f"layer {layer} v_cache")
    monkeypatch.setenv(A.FUSED_QK_ENV, "2")
    with pytest.raises(ValueError, match=A.FUSED_QK_ENV):
        model.decode(tokens[:, 8], 8)


@pytest.mark.parametrize("fused_qk", ["0", "1"])
def test_model_decode_kv_settled_switch(device, monkeypatch, fused_qk):
    from dots1_ext import modules
    from tests.test_model import tiny_ours

    monkeypatch.setenv(A.FUSED_QK_ENV, fused_qk)
    model = tiny_ours(device, num_hidden_layers=2, head_dim=64, num_key_value_heads=2, sliding_window=3,
                      layer_types=["sliding_attention", "full_attention"])
    tokens = torch.randint(0, 96, (3, 9), device=device)
    runs = {}
    for settled in (False, True):
        monkeypatch.setattr(modules, "ATTENTION_KV_SETTLED", settled)
        model.setup_cache(3, 12)
        model.prefill(tokens[:, :4])
        runs[settled] = [model.decode(tokens[:, slot], slot).float() for slot in range(4, 9)]
        assert all(torch.isfinite(step).all() for step in runs[settled]), "equal_nan below would pass on NaN"
    tol = 0.0 if device == "cpu" else 1e-5  # as test_model_decode_fused_switch
    for n, (a, b) in enumerate(zip(runs[False], runs[True])):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"step {n}: {m}")
