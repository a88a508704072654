"""grouped_gemm_int4 (W4A16 grouped GEMM) against grouped_gemm on the dequantized weight.

Reference: ``quant.dequantize_int4`` (each weight ``bf16((u - z) * s)``, rounded once), then the fp32
grouped GEMM (``reference.grouped_gemm``), rounded to bf16. The CPU kernel is exactly that (bitwise);
the CUDA kernel accumulates in fp32 in another order, so each output row may differ from the rounded
reference by one bf16 rounding step of its largest value: per row max |out - ref| <= 2^-7 * max |ref|
(INT4_ROW_RTOL; one bf16 ulp is at most 2^-8 of the row's largest value, times 2 for values that
round the other way). The kernel's dequantization itself is exact: ``test_cuda_dequantization_is_exact``
multiplies the weight by one-hot rows and compares bitwise.

CUDA backends are forced through DOTS1_EXT_GEMM_INT4_BACKEND (cutlass | dequantize | auto), the CUTLASS
tile through DOTS1_EXT_GEMM_INT4_TILE (auto | 128x32 | 128x64 | 128x128 | 128x192 | 128x256: "cutlass 128x64" in the
lists). The memory /
race checks: compute-sanitizer ... python tests/sanitize_grouped_gemm_int4.py [--small]
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import dots1_ext  # noqa: F401  (registers the ops)
from dots1_ext import quant, reference
from dots1_ext.ops import grouped_gemm, grouped_gemm_int4, interleave_gate_up

sys.path.insert(0, os.path.dirname(__file__))
from conftest import assert_rows_close, capture_cuda_graph, replay_poisoned, requires_cuda, set_env  # noqa: E402
from test_grouped_gemm import offsets_from_counts, routing_counts  # noqa: E402

INT4_ROW_RTOL = 2.0**-7
EPILOGUES = ("none", "swiglu_interleaved")

# ---------------------------------------------------------------- helpers


def make_int4_case(counts, E, N, K, device, symmetric=False, tail=0, first=0, interleave=False):
    """x [S, K] bf16, the int4 weight (qweight, scales, zeros) of a random [E, N, K] weight, offsets."""
    S = first + sum(counts) + tail
    x = torch.randn(S, K, device=device, dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device=device) / K**0.5
    if interleave:
        w = interleave_gate_up(w)
    q = quant.quantize_int4(w, symmetric=symmetric)
    return x, q, offsets_from_counts(counts, device, first)


def ref_fp32(x, q, off, epilogue):
    """The fp32 product of x and the bf16 dequantized weight (rounded to bf16 by assert_rows_close)."""
    w = quant.dequantize_int4(q, torch.bfloat16)
    return reference.grouped_gemm(x.float(), w.float(), off, epilogue)


def run(x, q, off, epilogue):
    return grouped_gemm_int4(x, q.qweight, q.scales, q.zeros, off, epilogue)


def out_features(q, epilogue):
    return q.qweight.shape[1] // 2 if epilogue == "swiglu_interleaved" else q.qweight.shape[1]


# The CUTLASS kernels' tiles (DOTS1_EXT_GEMM_INT4_TILE), each forced in every cutlass case.
INT4_TILES = ("128x32", "128x64", "128x128", "128x192", "128x256")


@pytest.fixture
def int4_backend(request, monkeypatch):
    """DOTS1_EXT_GEMM_INT4_BACKEND set to the parameter's first word ("auto" without one), and
    DOTS1_EXT_GEMM_INT4_TILE to its second (unset without one): "cutlass 128x64"."""
    name = getattr(request, "param", "auto")
    backend, _, tile = name.partition(" ")
    monkeypatch.setenv("DOTS1_EXT_GEMM_INT4_BACKEND", backend)
    set_env(monkeypatch, "DOTS1_EXT_GEMM_INT4_TILE", tile or None)
    return name


def cuda_int4_backends():
    if not torch.cuda.is_available():
        return []
    names = ["auto", "dequantize"]
    if torch.cuda.get_device_capability() == (9, 0):
        names += ["cutlass"] + [f"cutlass {tile}" for tile in INT4_TILES]
    return names


# ---------------------------------------------------------------- CPU and any device


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("routing", ["balanced", "zipf", "one_expert", "many_empty"])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_matches_reference(device, symmetric, epilogue, routing, T):
    E, k, N, K = 8, 3, 48, 256
    x, q, off = make_int4_case(routing_counts(routing, T, k, E), E, N, K, device, symmetric)
    out = run(x, q, off, epilogue)
    assert out.dtype == torch.bfloat16 and out.shape == (x.shape[0], out_features(q, epilogue))
    assert_rows_close(out, ref_fp32(x, q, off, epilogue), torch.bfloat16, INT4_ROW_RTOL)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_cpu_is_grouped_gemm_on_dequantized_weight_bitwise(symmetric, epilogue):
    E, N, K = 6, 32, 384
    x, q, off = make_int4_case([5, 0, 9, 1, 0, 12], E, N, K, "cpu", symmetric, tail=3, first=2)
    out = run(x, q, off, epilogue)
    expected = grouped_gemm(x, quant.dequantize_int4(q, torch.bfloat16), off, epilogue)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_uncovered_rows_are_zero(device, epilogue):
    E, N, K = 4, 32, 128
    x, q, off = make_int4_case([3, 0, 5, 2], E, N, K, device, tail=4, first=2)
    out = run(x, q, off, epilogue)
    assert torch.count_nonzero(out[:2]) == 0 and torch.count_nonzero(out[-4:]) == 0
    assert_rows_close(out, ref_fp32(x, q, off, epilogue), torch.bfloat16, INT4_ROW_RTOL)


def test_empty_inputs(device):
    E, N, K = 4, 32, 128
    x, q, off = make_int4_case([0, 0, 0, 0], E, N, K, device)
    assert run(x, q, off, "none").shape == (0, N)
    assert run(x, q, off, "swiglu_interleaved").shape == (0, N // 2)
    # No experts at all: every row is outside every range.
    x = torch.randn(5, K, device=device, dtype=torch.bfloat16)
    q0 = quant.quantize_int4(torch.randn(0, N, K, device=device))
    out = run(x, q0, torch.zeros(1, dtype=torch.int32, device=device), "none")
    assert out.shape == (5, N) and torch.count_nonzero(out) == 0


def test_swiglu_is_silu_gate_times_up(device):
    E, N, K = 3, 64, 256
    x, q, off = make_int4_case([4, 2, 6], E, N, K, device, interleave=True)
    plain = ref_fp32(x, q, off, "none").view(x.shape[0], N // 16, 2, 8)
    expected = (torch.nn.functional.silu(plain[:, :, 0]) * plain[:, :, 1]).reshape(x.shape[0], N // 2)
    assert_rows_close(run(x, q, off, "swiglu_interleaved"), expected, torch.bfloat16, INT4_ROW_RTOL)


def test_non_contiguous_activations(device):
    E, N, K = 3, 32, 256
    x, q, off = make_int4_case([4, 2, 6], E, N, K, device)
    wide = torch.randn(x.shape[0], 2 * K, device=device, dtype=torch.bfloat16)
    wide[:, ::2] = x
    assert_rows_close(run(wide[:, ::2], q, off, "none"), ref_fp32(x, q, off, "none"), torch.bfloat16, INT4_ROW_RTOL)


def test_bad_inputs_raise(device):
    E, N, K = 2, 32, 256
    x, q, off = make_int4_case([3, 4], E, N, K, device)
    qw, sc, z = q.qweight, q.scales, q.zeros
    with pytest.raises(TypeError, match="x must have dtype"):
        grouped_gemm_int4(x.float(), qw, sc, z, off)
    with pytest.raises(ValueError, match="positive multiple of the int4 group size 128"):
        grouped_gemm_int4(x[:, :192], qw[..., :96], sc[..., :1], z[..., :1], off)
    with pytest.raises(TypeError, match="qweight must have dtype"):
        grouped_gemm_int4(x, qw.to(torch.int8), sc, z, off)
    with pytest.raises(ValueError, match="qweight must have shape"):
        grouped_gemm_int4(x, qw[..., :64].contiguous(), sc, z, off)
    with pytest.raises(ValueError, match="qweight must be contiguous"):
        grouped_gemm_int4(x, qw.transpose(0, 1).contiguous().transpose(0, 1), sc, z, off)
    with pytest.raises(TypeError, match="scales must have dtype"):
        grouped_gemm_int4(x, qw, sc.float(), z, off)
    with pytest.raises(ValueError, match="scales must have shape"):
        grouped_gemm_int4(x, qw, sc[:, :16], z, off)
    with pytest.raises(TypeError, match="zeros must have dtype"):
        grouped_gemm_int4(x, qw, sc, z.to(torch.int32), off)
    with pytest.raises(ValueError, match="zeros must have shape"):
        grouped_gemm_int4(x, qw, sc, z[:1], off)
    with pytest.raises(TypeError, match="expert_offsets must have dtype"):
        grouped_gemm_int4(x, qw, sc, z, off.long())
    with pytest.raises(ValueError, match="expert_offsets must have shape"):
        grouped_gemm_int4(x, qw, sc, z, off[:-1])
    with pytest.raises(ValueError, match="epilogue must be one of"):
        grouped_gemm_int4(x, qw, sc, z, off, "swiglu")
    q24 = quant.quantize_int4(torch.randn(E, 24, K, device=device))
    with pytest.raises(ValueError, match="multiple of 16"):
        grouped_gemm_int4(x, q24.qweight, q24.scales, q24.zeros, off, "swiglu_interleaved")
    if device == "cuda":
        with pytest.raises(ValueError, match="same device"):
            grouped_gemm_int4(x, qw.cpu(), sc, z, off)


@pytest.mark.parametrize("garbage", [[0, 9, 2], [-1, 3, 7], [0, 3, 100]])
def test_cpu_kernel_validates_offsets(garbage):
    x, q, off = make_int4_case([3, 4], 2, 32, 128, "cpu")
    with pytest.raises(IndexError, match="expert_offsets"):
        run(x, q, torch.tensor(garbage, dtype=torch.int32), "none")


@pytest.mark.parametrize("garbage", [[0, 9, 2], [-1, 3, 7]])
def test_check_offsets_raises_on_any_device(device, garbage):
    x, q, off = make_int4_case([3, 4], 2, 32, 128, device)
    bad = torch.tensor(garbage, dtype=torch.int32, device=device)
    with pytest.raises(IndexError, match="expert_offsets"):
        grouped_gemm_int4(x, q.qweight, q.scales, q.zeros, bad, check_offsets=True)


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_opcheck(device, epilogue):
    x, q, off = make_int4_case([2, 0, 3], 3, 32, 128, device)
    torch.library.opcheck(torch.ops.dots1_ext.grouped_gemm_int4.default,
                          (x, q.qweight, q.scales, q.zeros, off, epilogue))


# ---------------------------------------------------------------- CUDA


@requires_cuda
@pytest.mark.parametrize("int4_backend", cuda_int4_backends(), indirect=True)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("E", [8, 128])
@pytest.mark.parametrize("routing", ["balanced", "zipf", "one_expert", "many_empty"])
@pytest.mark.parametrize("T", [1, 11, 683])  # S = T * 6 = 6, 66, 4098 rows
def test_cuda_grid(int4_backend, symmetric, epilogue, E, routing, T):
    k, N, K = 6, 256, 512
    x, q, off = make_int4_case(routing_counts(routing, T, k, E), E, N, K, "cuda", symmetric, tail=1, first=1)
    torch.empty(x.shape[0] * out_features(q, epilogue) * 2, device="cuda", dtype=torch.bfloat16).fill_(float("nan"))
    out = run(x, q, off, epilogue)  # the caching allocator hands back the NaN-filled block: unwritten stays NaN
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "elements left unwritten"
    assert_rows_close(out, ref_fp32(x, q, off, epilogue), torch.bfloat16, INT4_ROW_RTOL, what=f"{routing} E={E}")


@requires_cuda
@pytest.mark.parametrize("int4_backend", cuda_int4_backends(), indirect=True)
@pytest.mark.parametrize("symmetric", [False, True])
def test_cuda_dequantization_is_exact(int4_backend, symmetric):
    # One-hot rows: out[r, n] = w[n, k_r] * 1, a single exact product in the fp32 accumulator, so the
    # output is the kernel's dequantized weight itself: bitwise quant.dequantize_int4's bf16 value.
    E, N, K = 3, 128, 384
    w = torch.randn(E, N, K, device="cuda") * torch.logspace(-3, 1, K, device="cuda")  # wide scale mantissas
    q = quant.quantize_int4(w, symmetric=symmetric)
    x = torch.eye(K, device="cuda", dtype=torch.bfloat16).repeat(E, 1)  # expert e: rows e*K .. e*K + K-1
    off = torch.arange(0, (E + 1) * K, K, device="cuda", dtype=torch.int32)
    out = run(x, q, off, "none")  # [E*K, N]: rows of expert e = dq(w[e])^T
    expected = quant.dequantize_int4(q, torch.bfloat16).transpose(1, 2).reshape(E * K, N)
    assert torch.equal(out, expected)


@requires_cuda
@pytest.mark.parametrize("int4_backend", cuda_int4_backends(), indirect=True)
def test_cuda_dequantization_is_exact_for_every_code_and_zero_point(int4_backend):
    # The sm90 kernel dequantizes in bf16x2 ((128 + u) - (128 + z), times s): every code against every
    # zero point, scales over bf16's exponent range (subnormal products, large ones that stay finite,
    # zero scales), one-hot rows as above, compared by value with dequantize_int4 (subnormals included;
    # a -0 weight reads +0 through any GEMM, the fp32 accumulator's +0 + -0).
    E, N, K = 2, 256, 256
    G = K // quant.GROUP_SIZE
    gen = torch.Generator().manual_seed(5)
    qweight = torch.randint(0, 256, (E, N, K // 2), generator=gen, dtype=torch.uint8)
    zeros = ((torch.arange(N).view(1, N, 1) + 7 * torch.arange(G).view(1, 1, G)) % 16).expand(E, N, G)
    exponent = torch.randint(-133, 120, (E, N, G), generator=gen).float()
    scales = (torch.rand(E, N, G, generator=gen) + 1) * torch.exp2(exponent)
    scales[0, :4] = 0.0
    codes_and_zeros = zip((qweight[..., :64] & 15).flatten().tolist(),
                          zeros[..., :1].expand(E, N, 64).flatten().tolist())
    assert set(codes_and_zeros) == {(u, z) for u in range(16) for z in range(16)}
    q = quant.Int4Weight(qweight.cuda(), scales.to(torch.bfloat16).cuda(), zeros.to(torch.uint8).contiguous().cuda())
    x = torch.eye(K, device="cuda", dtype=torch.bfloat16).repeat(E, 1)
    off = torch.arange(0, (E + 1) * K, K, device="cuda", dtype=torch.int32)
    out = run(x, q, off, "none")
    expected = quant.dequantize_int4(q, torch.bfloat16).transpose(1, 2).reshape(E * K, N)
    magnitude = expected.float().abs()
    assert ((magnitude > 0) & (magnitude < 2**-126)).sum() > 1000  # subnormal products do occur
    assert torch.equal(out, expected)


@requires_cuda
@pytest.mark.parametrize("int4_backend", cuda_int4_backends(), indirect=True)
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_cuda_matches_bf16_grouped_gemm_on_dequantized_weight(int4_backend, epilogue):
    E, k, T, N, K = 16, 6, 300, 512, 1024
    x, q, off = make_int4_case(routing_counts("zipf", T, k, E), E, N, K, "cuda", interleave=True)
    bf16 = grouped_gemm(x, quant.dequantize_int4(q, torch.bfloat16), off, epilogue)
    assert_rows_close(run(x, q, off, epilogue), bf16.float(), torch.bfloat16, INT4_ROW_RTOL)


@requires_cuda
@pytest.mark.parametrize("int4_backend", cuda_int4_backends(), indirect=True)
@pytest.mark.parametrize("shape", ["gate_up", "down"])
def test_cuda_dots1_shapes(int4_backend, shape):
    # The real shapes: H 4096, I 1408 (= 11 groups of 128), 128 experts, top-6, T = 4096 tokens.
    E, k, T, H, I = 128, 6, 4096, 4096, 1408
    N, K, epilogue = (2 * I, H, "swiglu_interleaved") if shape == "gate_up" else (H, I, "none")
    x, q, off = make_int4_case(routing_counts("balanced", T, k, E), E, N, K, "cuda", interleave=shape == "gate_up")
    out = run(x, q, off, epilogue)
    assert_rows_close(out, grouped_gemm(x, quant.dequantize_int4(q, torch.bfloat16), off, epilogue).float(),
                      torch.bfloat16, INT4_ROW_RTOL)


@requires_cuda
@pytest.mark.parametrize("int4_backend", cuda_int4_backends(), indirect=True)
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_cuda_deterministic(int4_backend, epilogue):
    E, k, T, N, K = 32, 6, 500, 256, 1024
    x, q, off = make_int4_case(routing_counts("zipf", T, k, E), E, N, K, "cuda", interleave=True)
    first = run(x, q, off, epilogue)
    for _ in range(3):
        assert torch.equal(run(x, q, off, epilogue), first)


@requires_cuda
@pytest.mark.parametrize("int4_backend", [b for b in cuda_int4_backends() if b != "dequantize"], indirect=True)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("T", [1, 64, 1024])
def test_cuda_graph_replay_with_new_routing(int4_backend, epilogue, T):
    E, k, N, K = 16, 6, 256, 512
    x, q, off = make_int4_case(routing_counts("balanced", T, k, E), E, N, K, "cuda", interleave=True)
    graph, out = capture_cuda_graph(lambda: run(x, q, off, epilogue))
    for routing in ("zipf", "one_expert", "many_empty"):
        off.copy_(offsets_from_counts(routing_counts(routing, T, k, E), "cuda"))
        x.copy_(torch.randn_like(x))
        replay_poisoned(graph, out)
        assert_rows_close(out, ref_fp32(x, q, off, epilogue), torch.bfloat16, INT4_ROW_RTOL,
                          what=f"graph replay {routing}")


@requires_cuda
@pytest.mark.parametrize("garbage", [[5, -7, 100, 3, 2**30], [0, 9, 2, 7, 17]])
def test_cuda_garbage_offsets_stay_in_bounds(garbage):
    x, q, off = make_int4_case([4, 4, 4, 4], 4, 64, 128, "cuda")
    off.copy_(torch.tensor(garbage, dtype=torch.int32))
    for epilogue in EPILOGUES:
        run(x, q, off, epilogue)  # values unspecified; no fault (compute-sanitizer: sanitize_grouped_gemm_int4.py)
    torch.cuda.synchronize()


@requires_cuda
@pytest.mark.parametrize("tile", ["256x128", "128", "Auto", "128x16"])
def test_cuda_bad_tile_setting_raises(monkeypatch, tile):
    monkeypatch.setenv("DOTS1_EXT_GEMM_INT4_TILE", tile)
    x, q, off = make_int4_case([2, 2], 2, 32, 128, "cuda")
    with pytest.raises(ValueError, match="DOTS1_EXT_GEMM_INT4_TILE"):
        run(x, q, off, "none")


@requires_cuda
def test_cuda_forced_cutlass_errors_off_sm90(monkeypatch):
    if torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("sm90: the cutlass backend runs")
    monkeypatch.setenv("DOTS1_EXT_GEMM_INT4_BACKEND", "cutlass")
    x, q, off = make_int4_case([2, 2], 2, 32, 128, "cuda")
    with pytest.raises(RuntimeError, match="DOTS1_EXT_GEMM_INT4_BACKEND=cutlass"):
        run(x, q, off, "none")


# ---------------------------------------------------------------- the module


def test_int4_moe_prefill_kernel_matches_dequantizing_path(device, monkeypatch):
    """Dots1MoE prefill with int4 experts: the W4A16 op path (on sm90 CUDA) against the dequantizing
    path, same model, same routing (on the CPU both run the dequantizing path: equal bitwise)."""
    from dots1_ext import modules
    from dots1_ext.config import Dots1Config
    from dots1_ext.model import build_random_model

    cfg = Dots1Config(vocab_size=64, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                      norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1,
                      max_position_embeddings=64, rms_norm_eps=1e-5, sliding_window=None)
    model = build_random_model(cfg, device=device, dtype=torch.bfloat16, seed=0, experts="int4")
    moe = model.model.layers[1].mlp
    x = torch.randn(100, cfg.hidden_size, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        fast = moe(x)
        monkeypatch.setattr(modules, "INT4_PREFILL_KERNEL", False)
        slow = moe(x)
    assert_rows_close(fast, slow.float(), torch.bfloat16, 2.0**-6)
