"""grouped_gemm against the fp32 reference: every backend, routing shapes, epilogues, CUDA graphs.

CUDA backends are forced through DOTS1_EXT_GEMM_BACKEND (decode | cutlass | torch | auto). Run the
small memory check with: compute-sanitizer --tool memcheck python tests/sanitize_grouped_gemm.py
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

import dots1_ext  # noqa: F401  (registers the ops)
from dots1_ext import reference
from dots1_ext.ops.grouped_gemm import EPILOGUES, SWIGLU_EPILOGUES, deinterleave_gate_up, grouped_gemm, interleave_gate_up

sys.path.insert(0, os.path.dirname(__file__))
from conftest import (ROW_RTOL, assert_rows_close, capture_cuda_graph, rel_err, replay_poisoned,  # noqa: E402
                      requires_cuda)

# ---------------------------------------------------------------- helpers


def offsets_from_counts(counts, device, first: int = 0) -> torch.Tensor:
    counts = torch.as_tensor(counts, dtype=torch.int64)
    off = torch.zeros(len(counts) + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(counts, 0)
    return (off + first).to(torch.int32).to(device)


def routing_counts(kind: str, T: int, k: int, E: int) -> list[int]:
    """Rows per expert for T tokens, k experts each (S = T*k), under a routing pattern."""
    S = T * k
    if kind == "balanced":
        ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
        return torch.bincount(ids.reshape(-1), minlength=E).tolist()
    if kind == "zipf":
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
        p = p[torch.randperm(E)]
        ids = torch.multinomial(p.expand(T, E), k) if T else torch.zeros(0, k, dtype=torch.long)
        return torch.bincount(ids.reshape(-1), minlength=E).tolist()
    if kind == "one_expert":
        counts = [0] * E
        counts[E // 2] = S
        return counts
    if kind == "many_empty":
        live = torch.randperm(E)[: max(1, E // 8)]
        ids = live[torch.randint(0, len(live), (S,))]
        return torch.bincount(ids, minlength=E).tolist()
    raise ValueError(kind)


def make_case(S_counts, E, N, K, dtype, device, tail: int = 0, first: int = 0):
    S = first + sum(S_counts) + tail
    x = torch.randn(S, K, device=device, dtype=dtype)
    w = torch.randn(E, N, K, device=device, dtype=dtype) / K**0.5
    off = offsets_from_counts(S_counts, device, first)
    return x, w, off


def ref_fp32(x, w, off, epilogue):
    return reference.grouped_gemm(x.float(), w.float(), off, epilogue)


def tol(dtype, epilogue="none", device="cpu"):
    """Per-row tolerance (conftest.assert_rows_close): max error per row relative to the row's largest
    magnitude, against the fp32 reference rounded to dtype. The HF-layout "swiglu" epilogue on CUDA
    rounds the [S, N] product to dtype before silu * up (gate and up rounded, then the result: ~3.3
    units of rounding for silu's gain of up to 1.28), so it gets twice the default."""
    factor = 2.0 if (epilogue == "swiglu" and device != "cpu" and dtype != torch.float32) else 1.0
    return ROW_RTOL[dtype] * factor


def env_fixture(variable: str):
    """A fixture that sets ``variable`` to its parameter (indirect parametrization; "auto" when the test
    has none) and returns it. Also test_grouped_gemm_int4's."""

    @pytest.fixture
    def fixture(request, monkeypatch):
        name = getattr(request, "param", "auto")
        monkeypatch.setenv(variable, name)
        return name

    return fixture


backend = env_fixture("DOTS1_EXT_GEMM_BACKEND")


def cuda_backends():
    """The CUDA backends worth testing on this machine."""
    if not torch.cuda.is_available():
        return []
    names = ["auto", "decode"]
    if torch.cuda.get_device_capability() == (9, 0):
        names.append("cutlass")
    if hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability() >= (9, 0):
        names.append("torch")
    return names


# ---------------------------------------------------------------- CPU and any device


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("routing", ["balanced", "zipf", "one_expert", "many_empty"])
@pytest.mark.parametrize("T", [1, 2, 7, 33])
def test_matches_reference(device, dtype, epilogue, routing, T):
    if device == "cpu" and dtype == torch.bfloat16 and T == 33 and routing != "balanced":
        pytest.skip("keeps the CPU suite short")
    E, k, N, K = 8, 3, 48, 64
    counts = routing_counts(routing, T, k, E)
    x, w, off = make_case(counts, E, N, K, dtype, device)
    out = grouped_gemm(x, w, off, epilogue)
    assert out.dtype == dtype and out.shape == (x.shape[0], N // 2 if epilogue in SWIGLU_EPILOGUES else N)
    assert_rows_close(out, ref_fp32(x, w, off, epilogue), dtype, tol(dtype, epilogue, device))


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_uncovered_rows_are_zero(device, epilogue):
    # Rows before expert_offsets[0] and after expert_offsets[E] belong to no expert.
    E, N, K = 4, 16, 32
    x, w, off = make_case([3, 0, 5, 2], E, N, K, torch.float32, device, tail=4, first=2)
    out = grouped_gemm(x, w, off, epilogue)
    assert torch.count_nonzero(out[:2]) == 0 and torch.count_nonzero(out[-4:]) == 0
    assert_rows_close(out, ref_fp32(x, w, off, epilogue), torch.float32)


def test_empty_inputs(device):
    E, N, K = 4, 16, 32
    x, w, off = make_case([0, 0, 0, 0], E, N, K, torch.float32, device)
    assert grouped_gemm(x, w, off, "none").shape == (0, N)
    assert grouped_gemm(x, w, off, "swiglu").shape == (0, N // 2)
    assert grouped_gemm(x, w, off, "swiglu_interleaved").shape == (0, N // 2)
    # No experts at all: every row is outside every range.
    x = torch.randn(5, K, device=device)
    out = grouped_gemm(x, torch.randn(0, N, K, device=device), torch.zeros(1, dtype=torch.int32, device=device))
    assert out.shape == (5, N) and torch.count_nonzero(out) == 0


def test_swiglu_is_silu_gate_times_up(device):
    E, N, K = 5, 64, 96
    x, w, off = make_case([4, 1, 0, 9, 2], E, N, K, torch.float32, device)
    plain = grouped_gemm(x, w, off, "none")
    fused = grouped_gemm(x, w, off, "swiglu")
    assert_rows_close(fused, F.silu(plain[:, : N // 2]) * plain[:, N // 2 :], torch.float32)
    # The same weight repacked: the same SwiGLU output.
    assert_rows_close(grouped_gemm(x, interleave_gate_up(w), off, "swiglu_interleaved"), fused, torch.float32)


def test_interleave_gate_up_layout():
    E, I, K = 3, 24, 5
    w = torch.randn(E, 2 * I, K)
    packed = interleave_gate_up(w)
    assert packed.is_contiguous() and torch.equal(deinterleave_gate_up(packed), w)
    for f in range(I):  # feature f: gate row 16*(f//8) + f%8, up row 8 further
        assert torch.equal(packed[:, 16 * (f // 8) + f % 8], w[:, f])
        assert torch.equal(packed[:, 16 * (f // 8) + f % 8 + 8], w[:, I + f])


def test_non_contiguous_inputs(device):
    # x may have any strides (activations are copied when needed); the weight is never copied per call.
    E, N, K = 4, 32, 48
    counts = [3, 2, 0, 4]
    S = sum(counts)
    x = torch.randn(K, S, device=device).t()  # column-major view
    w = torch.randn(E, N, K, device=device)
    off = offsets_from_counts(counts, device)
    assert not x.is_contiguous()
    assert_rows_close(grouped_gemm(x, w, off, "swiglu"), ref_fp32(x, w, off, "swiglu"), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_must_be_contiguous_and_aligned(device, dtype):
    # A non-contiguous or misaligned weight used to be cloned on every call (a copy of every expert's
    # weight, captured into CUDA graphs too): now a clear error naming it, before any work.
    E, N, K = 4, 32, 48
    x, w, off = make_case([3, 2, 0, 4], E, N, K, dtype, device)
    w_t = torch.randn(E, K, N, device=device, dtype=dtype).transpose(1, 2)  # N, K swapped in memory
    with pytest.raises(ValueError, match="weight must be contiguous"):
        grouped_gemm(x, w_t, off)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        torch.ops.dots1_ext.grouped_gemm(x, w_t, off, "none")  # the op itself, not only the wrapper
    misaligned = torch.empty(E * N * K + 1, device=device, dtype=dtype)[1:].view(E, N, K)
    misaligned.copy_(w)
    assert misaligned.is_contiguous() and misaligned.data_ptr() % 16 != 0
    with pytest.raises(ValueError, match="weight must start at a 16-byte aligned address"):
        grouped_gemm(x, misaligned, off)
    for epilogue in EPILOGUES:  # the contiguous, aligned copies work
        assert_rows_close(grouped_gemm(x, w_t.contiguous(), off, epilogue), ref_fp32(x, w_t, off, epilogue), dtype,
                          tol(dtype, epilogue, device))
    # A contiguous expert slice of a weight (expert parallelism) is neither copied nor rejected.
    assert_rows_close(grouped_gemm(x, w[1:3], offsets_from_counts([3, 2], device), "none")[:5],
                      ref_fp32(x[:5], w[1:3], offsets_from_counts([3, 2], device), "none"), dtype, tol(dtype))


def test_bad_inputs_raise(device):
    E, N, K = 4, 16, 32
    x, w, off = make_case([1, 2, 3, 4], E, N, K, torch.float32, device)
    with pytest.raises(TypeError, match="weight"):
        grouped_gemm(x, w.half(), off)
    with pytest.raises(TypeError, match="expert_offsets"):
        grouped_gemm(x, w, off.long())
    with pytest.raises(ValueError, match="expert_offsets"):
        grouped_gemm(x, w, off[:-1])
    with pytest.raises(ValueError, match="weight"):
        grouped_gemm(x, w[:, :, :-1], off)
    with pytest.raises(ValueError, match="epilogue"):
        grouped_gemm(x, w, off, "gelu")
    with pytest.raises(ValueError, match="swiglu"):
        grouped_gemm(x, w[:, :-1], off, "swiglu")
    with pytest.raises(ValueError, match="multiple of 16"):
        grouped_gemm(x, w[:, :8], off, "swiglu_interleaved")
    with pytest.raises(TypeError, match="x"):
        grouped_gemm(x.long(), w, off)
    bad = off.clone()
    bad[2] = 100
    with pytest.raises(IndexError, match="expert_offsets"):
        grouped_gemm(x, w, bad, check_offsets=True)
    bad = off.clone()
    bad[2] = bad[3] + 1
    with pytest.raises(IndexError, match="non-decreasing"):
        grouped_gemm(x, w, bad, check_offsets=True)


def test_cpu_kernel_validates_offsets():
    x, w, off = make_case([1, 2, 3, 4], 4, 16, 32, torch.float32, "cpu")
    off[4] = 11  # past S = 10
    with pytest.raises(IndexError, match="expert_offsets"):
        torch.ops.dots1_ext.grouped_gemm(x, w, off, "none")


@requires_cuda
def test_cuda_shape_multiple_of_8():
    x, w, off = make_case([1, 2], 2, 12, 32, torch.bfloat16, "cuda")
    with pytest.raises(ValueError, match="multiple of 8"):
        grouped_gemm(x, w, off)
    x, w, off = make_case([1, 2], 2, 16, 36, torch.bfloat16, "cuda")
    with pytest.raises(ValueError, match="multiple of 8"):
        grouped_gemm(x, w, off)


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_opcheck(device, epilogue):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, w, off = make_case([2, 0, 3, 1], 4, 32, 64, dtype, device)
    torch.library.opcheck(torch.ops.dots1_ext.grouped_gemm.default, (x, w, off, epilogue))


# ---------------------------------------------------------------- CUDA backends


@requires_cuda
@pytest.mark.parametrize("backend", cuda_backends(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("routing", ["balanced", "zipf", "one_expert", "many_empty"])
@pytest.mark.parametrize("T", [1, 2, 7, 64, 4096])
def test_cuda_backends(backend, dtype, epilogue, routing, T):
    if backend == "torch" and dtype == torch.float16:
        pytest.skip("torch._grouped_mm: bf16 only on some versions")
    E, k, N, K = 32, 6, 256, 512
    counts = routing_counts(routing, T, k, E)
    x, w, off = make_case(counts, E, N, K, dtype, "cuda", tail=3)
    out = grouped_gemm(x, w, off, epilogue)
    ref = ref_fp32(x, w, off, epilogue)
    assert_rows_close(out, ref, dtype, tol(dtype, epilogue, "cuda"), what=f"{backend} {routing} T={T}")
    assert torch.count_nonzero(out[-3:]) == 0


sm90_config = env_fixture("DOTS1_EXT_GEMM_SM90_CONFIG")
SM90_CONFIGS = ["coop", "pingpong"]
requires_sm90 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm90 GPU")


@requires_sm90
@pytest.mark.parametrize("sm90_config", SM90_CONFIGS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("routing", ["balanced", "zipf", "many_empty"])
@pytest.mark.parametrize("T", [1, 7, 300, 4096])
def test_cuda_sm90_configs(monkeypatch, sm90_config, dtype, epilogue, routing, T):
    # Each tile configuration, forced: auto picks one by the mean rows per expert, and skewed routing
    # hands either one experts of every size.
    monkeypatch.setenv("DOTS1_EXT_GEMM_BACKEND", "cutlass")
    E, k, N, K = 32, 6, 512, 384
    x, w, off = make_case(routing_counts(routing, T, k, E), E, N, K, dtype, "cuda", tail=3)
    out = grouped_gemm(x, w, off, epilogue)
    assert_rows_close(out, ref_fp32(x, w, off, epilogue), dtype, tol(dtype, epilogue, "cuda"),
                      what=f"{sm90_config} {routing} T={T}")
    assert torch.count_nonzero(out[-3:]) == 0


@requires_sm90
@pytest.mark.parametrize("sm90_config", SM90_CONFIGS, indirect=True)
def test_cuda_sm90_configs_odd_shapes_and_graphs(monkeypatch, sm90_config):
    monkeypatch.setenv("DOTS1_EXT_GEMM_BACKEND", "cutlass")
    for E, N, K in [(3, 16, 8), (7, 48, 40), (130, 272, 1032)]:
        counts = [int(c) for c in torch.randint(0, 200, (E,))]
        counts[0] = 1
        x, w, off = make_case(counts, E, N, K, torch.bfloat16, "cuda", tail=1, first=1)
        for epilogue in EPILOGUES:
            out = grouped_gemm(x, w, off, epilogue)
            assert_rows_close(out, ref_fp32(x, w, off, epilogue), torch.bfloat16, tol(torch.bfloat16, epilogue, "cuda"),
                              what=f"{sm90_config} E={E} N={N} K={K}")
    # One graph, replayed over new routings of the same rows.
    E, N, K, T = 16, 256, 256, 512
    x, w, off = make_case(routing_counts("balanced", T, 6, E), E, N, K, torch.bfloat16, "cuda")
    out = grouped_gemm(x, w, off, "swiglu_interleaved")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = grouped_gemm(x, w, off, "swiglu_interleaved")
    for routing in ("zipf", "one_expert", "balanced"):
        _, _, new_off = make_case(routing_counts(routing, T, 6, E), E, N, K, torch.bfloat16, "cuda")
        off.copy_(new_off)
        graph.replay()
        assert_rows_close(out, ref_fp32(x, w, off, "swiglu_interleaved"), torch.bfloat16,
                          tol(torch.bfloat16, "swiglu_interleaved", "cuda"), what=f"{sm90_config} graph {routing}")


@requires_sm90
def test_cuda_sm90_config_values(monkeypatch):
    monkeypatch.setenv("DOTS1_EXT_GEMM_BACKEND", "cutlass")
    x, w, off = make_case([4, 4], 2, 64, 64, torch.bfloat16, "cuda")
    ref = ref_fp32(x, w, off, "none")
    monkeypatch.setenv("DOTS1_EXT_GEMM_SM90_CONFIG", "")  # empty = auto
    assert_rows_close(grouped_gemm(x, w, off, "none"), ref, torch.bfloat16, tol(torch.bfloat16), what="empty config")
    monkeypatch.setenv("DOTS1_EXT_GEMM_SM90_CONFIG", "coop_c4")
    with pytest.raises(ValueError, match="DOTS1_EXT_GEMM_SM90_CONFIG"):
        grouped_gemm(x, w, off, "none")


@requires_cuda
@pytest.mark.parametrize("variable", ["DOTS1_EXT_GEMM_DECODE_MAX_ROWS", "DOTS1_EXT_GEMM_COOP_MIN_ROWS"])
@pytest.mark.parametrize("value", ["128abc", "-1", "+5", " 7", "1e3", "99999999999999999999"])
def test_cuda_bad_row_bounds_raise(monkeypatch, variable, value):
    # DOTS1_EXT_GEMM_COOP_MIN_ROWS is read on the CUTLASS route only: force it (sm90) and the large-S route.
    if variable.endswith("COOP_MIN_ROWS"):
        if torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("read by the sm90 CUTLASS route only")
        monkeypatch.setenv("DOTS1_EXT_GEMM_BACKEND", "cutlass")
    else:
        monkeypatch.setenv("DOTS1_EXT_GEMM_BACKEND", "auto")  # the decode bound is read by auto only
    monkeypatch.setenv(variable, value)
    x, w, off = make_case([200, 200], 2, 64, 64, torch.bfloat16, "cuda")
    with pytest.raises(ValueError, match=f"{variable} must be a non-negative integer"):
        grouped_gemm(x, w, off, "none")
    monkeypatch.setenv(variable, "")  # empty = the default
    assert_rows_close(grouped_gemm(x, w, off, "none"), ref_fp32(x, w, off, "none"), torch.bfloat16, tol(torch.bfloat16),
                      what=f"{variable} empty")


@requires_cuda
@pytest.mark.parametrize("backend", cuda_backends(), indirect=True)
@pytest.mark.parametrize("shape", [(2816, 4096), (4096, 1408)], ids=["gate_up", "down"])
@pytest.mark.parametrize("T", [1, 64, 4096])
def test_cuda_dots1_shapes(backend, shape, T):
    N, K = shape
    E, k = 128, 6
    counts = routing_counts("balanced" if T > 1 else "many_empty", T, k, E)
    x, w, off = make_case(counts, E, N, K, torch.bfloat16, "cuda")
    for epilogue in ("swiglu", "swiglu_interleaved") if N == 2816 else ("none",):
        out = grouped_gemm(x, w, off, epilogue)
        assert_rows_close(out, ref_fp32(x, w, off, epilogue), torch.bfloat16, tol(torch.bfloat16, epilogue, "cuda"),
                          what=f"{backend} {shape} T={T} {epilogue}")


@requires_cuda
@pytest.mark.parametrize("backend", [b for b in cuda_backends() if b != "torch"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_cuda_odd_shapes(backend, dtype):
    # N, K multiples of 8 but not of any tile; an expert with one row, many empty experts.
    for E, N, K in [(3, 8, 8), (7, 24, 40), (130, 136, 1032), (3, 16, 8), (7, 48, 40), (130, 272, 1032)]:
        counts = [int(c) for c in torch.randint(0, 3, (E,))]
        counts[0] = 1
        x, w, off = make_case(counts, E, N, K, dtype, "cuda", tail=1, first=1)
        for epilogue in EPILOGUES if N % 16 == 0 else ("none", "swiglu"):
            out = grouped_gemm(x, w, off, epilogue)
            assert_rows_close(out, ref_fp32(x, w, off, epilogue), dtype, tol(dtype, epilogue, "cuda"),
                              what=f"{backend} E={E} N={N} K={K}")


@requires_cuda
def test_cuda_fp32_uses_portable_kernel(monkeypatch):
    monkeypatch.setenv("DOTS1_EXT_GEMM_BACKEND", "auto")
    monkeypatch.setenv("DOTS1_EXT_GEMM_DECODE_MAX_ROWS", "0")  # force the large-S route
    x, w, off = make_case([40, 0, 25, 3], 4, 64, 128, torch.float32, "cuda")
    out = grouped_gemm(x, w, off, "swiglu")  # with a one-time notice (TORCH_WARN_ONCE)
    assert rel_err(out, ref_fp32(x, w, off, "swiglu")) < 1e-5


@requires_cuda
@pytest.mark.parametrize("backend", cuda_backends(), indirect=True)
def test_cuda_swiglu_matches_plain(backend):
    x, w, off = make_case(routing_counts("zipf", 300, 6, 16), 16, 512, 256, torch.bfloat16, "cuda")
    plain = grouped_gemm(x, w, off, "none").float()
    fused = grouped_gemm(x, w, off, "swiglu")
    # Both computed from the bf16-rounded product: the same double rounding as the unfused epilogue.
    assert_rows_close(fused, F.silu(plain[:, :256]) * plain[:, 256:], torch.bfloat16,
                      tol(torch.bfloat16, "swiglu", "cuda"))
    packed = grouped_gemm(x, interleave_gate_up(w), off, "swiglu_interleaved")
    assert_rows_close(packed, F.silu(plain[:, :256]) * plain[:, 256:], torch.bfloat16,
                      tol(torch.bfloat16, "swiglu", "cuda"))


@requires_cuda
@pytest.mark.parametrize("backend", [b for b in cuda_backends() if b != "torch"], indirect=True)
@pytest.mark.parametrize("epilogue", SWIGLU_EPILOGUES)
@pytest.mark.parametrize("T", [1, 64, 1024])
def test_cuda_graph_replay_with_new_routing(backend, T, epilogue):
    E, k, N, K = 16, 6, 256, 512
    S = T * k
    x = torch.randn(S, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    off = offsets_from_counts(routing_counts("balanced", T, k, E), "cuda")
    graph, out = capture_cuda_graph(lambda: grouped_gemm(x, w, off, epilogue))
    for routing in ("zipf", "one_expert", "many_empty"):
        off.copy_(offsets_from_counts(routing_counts(routing, T, k, E), "cuda"))
        x.copy_(torch.randn_like(x))
        replay_poisoned(graph, out)
        assert_rows_close(out, ref_fp32(x, w, off, epilogue), torch.bfloat16, tol(torch.bfloat16, epilogue, "cuda"),
                          what=f"graph replay {routing}")


@requires_cuda
def test_cuda_compile_reduce_overhead():
    x, w, off = make_case(routing_counts("balanced", 64, 6, 16), 16, 256, 512, torch.bfloat16, "cuda")
    fn = torch.compile(lambda a, b, c: grouped_gemm(a, b, c, "swiglu_interleaved"), mode="reduce-overhead",
                       fullgraph=True)
    for _ in range(3):
        out = fn(x, w, off)
    assert_rows_close(out, ref_fp32(x, w, off, "swiglu_interleaved"), torch.bfloat16)


GARBAGE_OFFSETS = [
    [5, -7, 100, 3, 2**30],  # decreasing and out of range both ways
    [0, 9, 2, 7, 16],  # decreasing inside [0, S]
    [0, 4, 8, 12, 17],  # one past S = 16
    [-1, 4, 8, 12, 16],  # negative start
]


@pytest.mark.parametrize("garbage", GARBAGE_OFFSETS)
def test_garbage_offsets_clear_error(device, garbage):
    # The documented behaviour (ops/grouped_gemm.py): on CPU the kernel validates the offsets and
    # raises IndexError naming expert_offsets; on any device, check_offsets=True raises it before any
    # kernel runs (the host read CUDA needs for a clear error). The CUDA kernels without the check:
    # next test.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, w, off = make_case([4, 4, 4, 4], 4, 64, 64, dtype, device)
    off.copy_(torch.tensor(garbage, dtype=torch.int32))
    with pytest.raises(IndexError, match="expert_offsets"):
        grouped_gemm(x, w, off, check_offsets=True)
    if device == "cpu":
        for epilogue in EPILOGUES:
            with pytest.raises(IndexError, match="expert_offsets"):
                grouped_gemm(x, w, off, epilogue)
    off.copy_(offsets_from_counts([4, 4, 4, 4], device))
    grouped_gemm(x, w, off, check_offsets=True)  # valid offsets pass the check


@requires_cuda
@pytest.mark.parametrize("backend", cuda_backends(), indirect=True)
@pytest.mark.parametrize("garbage", GARBAGE_OFFSETS)
def test_cuda_garbage_offsets_stay_in_bounds(backend, garbage):
    # Without the host check the CUDA kernels clamp every offset into [0, S]: no fault and nothing
    # written outside `out` (compute-sanitizer memcheck: tests/sanitize_grouped_gemm.py), values
    # unspecified. A fault here would surface as a CUDA error at the synchronisation.
    x, w, off = make_case([4, 4, 4, 4], 4, 64, 64, torch.bfloat16, "cuda")
    off.copy_(torch.tensor(garbage, dtype=torch.int32))
    for epilogue in EPILOGUES:
        out = grouped_gemm(x, w, off, epilogue)
        assert out.shape == (16, 32 if epilogue in SWIGLU_EPILOGUES else 64)
    # The weights and activations are read-only: unchanged whatever the offsets.
    x0, w0 = x.clone(), w.clone()
    grouped_gemm(x, w, off, "none")
    torch.cuda.synchronize()
    assert torch.equal(x, x0) and torch.equal(w, w0)


@requires_cuda
def test_cuda_forced_cutlass_errors_off_sm90(monkeypatch):
    if torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("sm90: the CUTLASS path exists")
    monkeypatch.setenv("DOTS1_EXT_GEMM_BACKEND", "cutlass")
    x, w, off = make_case([2, 3], 2, 16, 32, torch.bfloat16, "cuda")
    with pytest.raises(RuntimeError, match="sm90"):
        grouped_gemm(x, w, off)


@requires_cuda
@pytest.mark.parametrize("epilogue", ["none", "swiglu_interleaved"])
def test_cuda_64bit_indexing(epilogue):
    # Output elements S * N_out > 2^31: offsets must not wrap. Checked on a sample of rows.
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs ~10 GB")
    E, N, K = 4, (4096 if epilogue == "none" else 8192), 64
    N_out = N if epilogue == "none" else N // 2
    S = (2**31) // N_out + 4096
    counts = [S // 4] * 3 + [S - 3 * (S // 4)]
    x, w, off = make_case(counts, E, N, K, torch.bfloat16, "cuda")
    out = grouped_gemm(x, w, off, epilogue)
    rows = torch.tensor([0, S // 4, S // 2, S - 2049, S - 1], device="cuda")
    expert = torch.bucketize(rows, off[1:].long(), right=True)
    ref = torch.stack([ref_fp32(x[r:r + 1], w[e:e + 1], offsets_from_counts([1], "cuda"), epilogue)[0]
                       for r, e in zip(rows.tolist(), expert.tolist())])
    assert_rows_close(out[rows], ref, torch.bfloat16)
