"""skinny_gemm against the fp32 reference: dtypes, the M / K / N grid, every epilogue, strided and
misaligned views, empty shapes, bad inputs, CUDA graphs, torch.compile, opcheck, determinism.

CUDA kernel paths (csrc/skinny_gemm/skinny_gemm.h): the tensor-core kernel (fp16/bf16, K % 8 == 0,
aligned), with 1 or 2 weight tiles per warp (DOTS1_EXT_SKINNY_TILES) and 1 or 2 token tiles (M <= 8,
M > 8), in both weight-load mappings (DOTS1_EXT_SKINNY_KERNEL = frag | wide; wide has its own
kernels for M <= 2 (4 k-parts per row) and M <= 4 (2 parts) and runs frag above: the
``skinny_kernel`` fixture runs the reference grid, the layouts, determinism and the graph tests under
each); the portable kernel (fp32, K % 8 != 0, misaligned weight); cuBLAS for M > 16. The memory
check: compute-sanitizer --tool memcheck python tests/sanitize_skinny_gemm.py
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

import dots1_ext  # noqa: F401  (registers the ops)
from dots1_ext import reference
from dots1_ext.ops.grouped_gemm import interleave_gate_up
from dots1_ext.ops.skinny_gemm import EPILOGUES, skinny_gemm

sys.path.insert(0, os.path.dirname(__file__))
from conftest import ROW_RTOL, assert_rows_close, requires_cuda  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
M_GRID = [0, 1, 2, 3, 4, 5, 8, 16, 17, 40]
# DOTS1_EXT_SKINNY_KERNEL values: the tensor-core kernel's weight-load mappings.
SKINNY_KERNELS = ["frag", "wide"]
K_GRID = [8, 64, 1000, 4096]  # 1000: a whole number of 16-byte vectors but not of 32-wide steps
# Per epilogue: small, not a whole number of tiles, larger (SwiGLU: N/2 features, 8 per tile).
N_GRID = {"none": [1, 24, 200, 1000], "swiglu": [2, 40, 208, 1040], "swiglu_interleaved": [16, 48, 208, 1024]}
# The real Dots1 decode linears: (name, N, K, epilogue).
DOTS1_SHAPES = [
    ("qkv", 12288, 4096, "none"),
    ("o_proj", 4096, 4096, "none"),
    ("dense gate_up", 21888, 4096, "swiglu"),
    ("dense down", 4096, 10944, "none"),
    ("shared gate_up", 5632, 4096, "swiglu"),
    ("shared down", 4096, 2816, "none"),
    ("lm_head", 152064, 4096, "none"),
]


def n_out(N: int, epilogue: str) -> int:
    return N if epilogue == "none" else N // 2


def make(M: int, N: int, K: int, dtype, device):
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = (torch.randn(N, K, device=device) / max(K, 1) ** 0.5).to(dtype)
    return x, w


def check(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, epilogue: str, what: str) -> None:
    assert out.dtype == x.dtype, f"{what}: dtype {out.dtype}"
    assert out.is_contiguous(), f"{what}: output not contiguous"
    atol = 0.0
    if x.dtype == torch.float32 and x.numel() and w.numel():
        # fp32 accumulation order differs from the reference's: allow its rounding on the terms' scale
        # (|x| @ |w|), not just on the result, which cancellation can make arbitrarily small.
        scale = float((x.abs().double() @ w.abs().double().t()).max())
        atol = 2e-6 * (scale * scale if epilogue != "none" else scale)
    assert_rows_close(out, reference.skinny_gemm(x.double(), w.double(), epilogue), x.dtype, atol=atol, what=what)


@pytest.fixture(params=SKINNY_KERNELS)
def skinny_kernel(request, monkeypatch, device) -> str:
    """Runs the test under each DOTS1_EXT_SKINNY_KERNEL (read by the op at every launch). The variants
    are CUDA kernels: on CPU only the default runs."""
    if device != "cuda" and request.param != "frag":
        pytest.skip("DOTS1_EXT_SKINNY_KERNEL selects between CUDA kernels")
    monkeypatch.setenv("DOTS1_EXT_SKINNY_KERNEL", request.param)
    return request.param


def poison_allocator(numel: int, dtype, device) -> None:
    """Leaves a freed NaN block of the output's size in the caching allocator, which the op's output
    then usually reuses: an element a kernel fails to write stays NaN and fails the comparison."""
    if device == "cuda":
        t = torch.full((max(numel, 1),), float("nan"), dtype=dtype, device=device)
        del t


# ------------------------------------------------------------------------------------------------
# Reference grid


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("M", M_GRID)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(device, skinny_kernel, dtype, M, epilogue):
    for K in K_GRID:
        for N in N_GRID[epilogue]:
            x, w = make(M, N, K, dtype, device)
            poison_allocator(M * n_out(N, epilogue), dtype, device)
            out = skinny_gemm(x, w, epilogue)
            assert out.shape == (M, n_out(N, epilogue))
            check(out, x, w, epilogue, f"{dtype} M={M} N={N} K={K} {epilogue}")


def test_reference_definition():
    # The reference itself: fp32 product, SwiGLU on the unrounded product, one rounding.
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    y = x.float() @ w.float().t()
    torch.testing.assert_close(reference.skinny_gemm(x, w, "none"), y.to(torch.bfloat16), rtol=0, atol=0)
    hf = (F.silu(y[:, :16]) * y[:, 16:]).to(torch.bfloat16)
    torch.testing.assert_close(reference.skinny_gemm(x, w, "swiglu"), hf, rtol=0, atol=0)
    w_inter = interleave_gate_up(w[None])[0]
    torch.testing.assert_close(reference.skinny_gemm(x, w_inter, "swiglu_interleaved"), hf, rtol=0, atol=0)


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_interleaved_matches_hf(device, skinny_kernel, epilogue):
    # The interleaved layout is the HF one with rows permuted: same result (bitwise on CUDA, where the
    # HF kernel builds the same [8 gate | 8 up] tiles on the fly).
    if epilogue == "none":
        pytest.skip("SwiGLU layouts only")
    for M in (1, 3, 5):  # wide: 4 and 2 k-parts per row, then frag
        x, w = make(M, 96, 256, torch.bfloat16, device)
        hf = skinny_gemm(x, w, "swiglu")
        inter = skinny_gemm(x, interleave_gate_up(w[None])[0], "swiglu_interleaved")
        if device == "cuda":
            assert torch.equal(hf, inter), f"M={M}"
        else:
            assert_rows_close(inter, hf.float())


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_empty_and_zero_k(device, skinny_kernel, epilogue):
    N = 32
    x, w = make(0, N, 64, torch.bfloat16, device)
    out = skinny_gemm(x, w, epilogue)
    assert out.shape == (0, n_out(N, epilogue))
    # K == 0: the product is zero, and so is silu(0) * 0.
    for M in (1, 2, 3, 4, 16, 20):
        x, w = make(M, N, 0, torch.bfloat16, device)
        poison_allocator(M * n_out(N, epilogue), torch.bfloat16, device)
        out = skinny_gemm(x, w, epilogue)
        assert out.shape == (M, n_out(N, epilogue))
        assert torch.equal(out, torch.zeros_like(out)), f"K=0 M={M}"
    # N == 0
    x, w = make(3, 0, 64, torch.bfloat16, device)
    assert skinny_gemm(x, w, epilogue).shape == (3, 0)


# ------------------------------------------------------------------------------------------------
# Layouts: strided x, weight views (row slices, row strides, misaligned offsets)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("M", [1, 2, 3, 16, 24])
def test_strided_x(device, skinny_kernel, dtype, epilogue, M):
    N, K = 48, 1024
    _, w = make(0, N, K, dtype, device)
    wide = torch.randn(M, K + 16, device=device, dtype=dtype)
    cases = {
        "column slice, aligned": wide[:, 8 : 8 + K],
        "column slice, misaligned": wide[:, 3 : 3 + K],
        "row stride": torch.randn(2 * M, K, device=device, dtype=dtype)[::2],
        "transposed": torch.randn(K, M, device=device, dtype=dtype).t(),
    }
    for name, x in cases.items():
        check(skinny_gemm(x, w, epilogue), x, w, epilogue, f"x {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("M", [1, 2, 4, 5, 16])
def test_weight_views(device, skinny_kernel, dtype, epilogue, M):
    N, K = 80, 512
    x = torch.randn(M, K, device=device, dtype=dtype)
    packed = torch.randn(3 * N, K, device=device, dtype=dtype) / K**0.5
    flat = torch.randn(N * K + 16, device=device, dtype=dtype) / K**0.5
    cases = {
        "row slice of a packed weight": packed[N : 2 * N],
        "row slice at an odd row": packed[5 : 5 + N],
        "misaligned storage offset": flat[1 : 1 + N * K].view(N, K),
        "row stride > K (aligned)": (torch.randn(N, K + 8, device=device, dtype=dtype) / K**0.5)[:, :K],
        "row stride > K (misaligned)": (torch.randn(N, K + 1, device=device, dtype=dtype) / K**0.5)[:, :K],
        "misaligned, odd K": (torch.randn(N, K + 4, device=device, dtype=dtype) / K**0.5)[:, 1 : K - 3],
    }
    for name, w in cases.items():
        xx = x[:, : w.shape[1]]
        check(skinny_gemm(xx, w, epilogue), xx, w, epilogue, f"weight {name}")


# ------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_raise(device):
    x = torch.randn(2, 64, device=device, dtype=torch.bfloat16)
    w = torch.randn(32, 64, device=device, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="(?i)weight must have dtype bfloat16"):
        skinny_gemm(x, w.float())
    with pytest.raises(TypeError, match="x must have dtype"):
        skinny_gemm(x.to(torch.int32), w.to(torch.int32))
    with pytest.raises(ValueError, match=r"x must have shape \[\*, \*\]"):
        skinny_gemm(x[0], w)
    with pytest.raises(ValueError, match=r"x must have shape \[\*, \*\]"):
        skinny_gemm(x[None], w)
    with pytest.raises(ValueError, match=r"weight must have shape \[\*, 64\]"):
        skinny_gemm(x, w[:, :32])
    with pytest.raises(ValueError, match=r"weight must have shape \[\*, 64\]"):
        skinny_gemm(x, w[None])
    with pytest.raises(ValueError, match="epilogue must be one of"):
        skinny_gemm(x, w, "gelu")
    with pytest.raises(ValueError, match="epilogue 'swiglu' needs an even weight.shape"):
        skinny_gemm(x, w[:31], "swiglu")
    with pytest.raises(ValueError, match="'swiglu_interleaved' needs weight.shape.0. .* multiple of 16"):
        skinny_gemm(x, w[:24], "swiglu_interleaved")
    with pytest.raises(ValueError, match="weight must have a contiguous last dimension"):
        skinny_gemm(x, torch.randn(64, 64, device=device, dtype=torch.bfloat16).t()[:32])


@requires_cuda
def test_cuda_device_mismatch_raises():
    x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    with pytest.raises((ValueError, RuntimeError), match="weight must be on the same device as x"):
        skinny_gemm(x, w)


# ------------------------------------------------------------------------------------------------
# Determinism, opcheck, torch.compile


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_deterministic(device, skinny_kernel, epilogue):
    for M in (1, 2, 3, 4, 8, 16, 20):
        x, w = make(M, 1024, 2048, torch.bfloat16, device)
        a = skinny_gemm(x, w, epilogue)
        b = skinny_gemm(x, w, epilogue)
        assert torch.equal(a, b), f"M={M}: two runs differ"


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_opcheck(device, epilogue):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for M in (1, 3) if device == "cpu" else (1, 12, 20):
        x, w = make(M, 48, 64, dtype, device)
        torch.library.opcheck(torch.ops.dots1_ext.skinny_gemm.default, (x, w, epilogue))


def _mlp(x, w_gate_up, w_down):
    h = skinny_gemm(x, w_gate_up, "swiglu")
    return skinny_gemm(h, w_down, "none") + x


def test_under_torch_compile(device):
    # CPU: aot_eager (the fake kernel and functionalisation); CUDA: Inductor + CUDA graphs.
    backend = "inductor" if device == "cuda" else "aot_eager"
    mode = "reduce-overhead" if device == "cuda" else None
    torch._dynamo.reset()
    fn = torch.compile(_mlp, backend=backend, mode=mode, fullgraph=True)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    w_gate_up = torch.randn(128, 64, device=device, dtype=dtype) / 8
    w_down = torch.randn(64, 64, device=device, dtype=dtype) / 8
    for _ in range(3):  # record, then replay the CUDA graph on fresh inputs
        x = torch.randn(2, 64, device=device, dtype=dtype)
        expect = _mlp(x, w_gate_up, w_down)
        got = fn(x, w_gate_up, w_down)
        assert_rows_close(got, expect.float(), dtype, rtol=2 * ROW_RTOL[dtype])


# ------------------------------------------------------------------------------------------------
# CUDA only


@requires_cuda
@pytest.mark.parametrize("kernel", SKINNY_KERNELS)
@pytest.mark.parametrize("tiles", ["1", "2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_cuda_forced_tiles(monkeypatch, kernel, tiles, dtype, epilogue):
    monkeypatch.setenv("DOTS1_EXT_SKINNY_KERNEL", kernel)
    monkeypatch.setenv("DOTS1_EXT_SKINNY_TILES", tiles)
    for M in (1, 2, 3, 4, 8, 9, 16):
        for N, K in ((48, 40), (208, 1000), (1040, 4096), (4112, 256)):
            x, w = make(M, N, K, dtype, "cuda")
            poison_allocator(M * n_out(N, epilogue), dtype, "cuda")
            check(skinny_gemm(x, w, epilogue), x, w, epilogue, f"{kernel} tiles={tiles} M={M} N={N} K={K}")


@requires_cuda
@pytest.mark.parametrize("kernel", SKINNY_KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_cuda_kernel_every_m(monkeypatch, kernel, dtype, epilogue):
    # Every M the tensor-core kernel takes, on ragged shapes: K not a whole number of the wide steps
    # (128 and 64 k per row) nor of the 32-wide ones, K shorter than one wide step, fewer steps than
    # warps; N (features) not a whole number of 16-row (8-feature) tiles. Each output element written
    # (the poisoned allocation), within the per-row tolerance, and bitwise the same on a second run.
    monkeypatch.setenv("DOTS1_EXT_SKINNY_KERNEL", kernel)
    shapes = {"none": ((24, 40), (200, 1000), (1000, 4104)), "swiglu": ((20, 40), (208, 1000), (1044, 4104)),
              "swiglu_interleaved": ((16, 40), (208, 1000), (1040, 4104))}[epilogue]
    for M in range(1, 17):
        for N, K in shapes:
            x, w = make(M, N, K, dtype, "cuda")
            poison_allocator(M * n_out(N, epilogue), dtype, "cuda")
            out = skinny_gemm(x, w, epilogue)
            what = f"{kernel} {dtype} M={M} N={N} K={K} {epilogue}"
            check(out, x, w, epilogue, what)
            assert torch.equal(out, skinny_gemm(x, w, epilogue)), f"{what}: two runs differ"


@requires_cuda
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_cuda_wide_matches_frag(monkeypatch, epilogue):
    # The two mappings compute the same sums in different fp32 orders: within the kernels' tolerance
    # of each other at the Dots1 hidden size, for the Ms where wide has its own kernels and above.
    for M in (1, 2, 3, 4, 5):
        x, w = make(M, 2048, 4096, torch.bfloat16, "cuda")
        monkeypatch.setenv("DOTS1_EXT_SKINNY_KERNEL", "frag")
        frag = skinny_gemm(x, w, epilogue)
        monkeypatch.setenv("DOTS1_EXT_SKINNY_KERNEL", "wide")
        wide = skinny_gemm(x, w, epilogue)
        assert_rows_close(wide, frag.float(), torch.bfloat16, rtol=2 * ROW_RTOL[torch.bfloat16], what=f"M={M}")


@requires_cuda
@pytest.mark.parametrize("M", [1, 3, 20])
def test_cuda_bad_kernel_env(monkeypatch, M):
    # Raised on every CUDA path (cuBLAS for M > 16 too), not only where the tensor-core kernel runs.
    monkeypatch.setenv("DOTS1_EXT_SKINNY_KERNEL", "fast")
    x, w = make(M, 16, 64, torch.bfloat16, "cuda")
    with pytest.raises(ValueError, match="DOTS1_EXT_SKINNY_KERNEL must be frag or wide, got 'fast'"):
        skinny_gemm(x, w)


@requires_cuda
def test_cuda_bad_tiles_env(monkeypatch):
    monkeypatch.setenv("DOTS1_EXT_SKINNY_TILES", "3")
    x, w = make(1, 16, 64, torch.bfloat16, "cuda")
    with pytest.raises(ValueError, match="DOTS1_EXT_SKINNY_TILES"):
        skinny_gemm(x, w)


@requires_cuda
@pytest.mark.parametrize("kernel", SKINNY_KERNELS)
@pytest.mark.parametrize("M", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("shape", DOTS1_SHAPES, ids=[s[0] for s in DOTS1_SHAPES])
def test_cuda_dots1_shapes_vs_reference_and_cublas(monkeypatch, shape, M, kernel):
    monkeypatch.setenv("DOTS1_EXT_SKINNY_KERNEL", kernel)
    _, N, K, epilogue = shape
    x, w = make(M, N, K, torch.bfloat16, "cuda")
    poison_allocator(M * n_out(N, epilogue), torch.bfloat16, "cuda")
    out = skinny_gemm(x, w, epilogue)
    check(out, x, w, epilogue, f"{shape[0]} M={M}")
    # cuBLAS in bf16 (F.linear, then silu * up on the rounded product): within two roundings of ours.
    y = F.linear(x, w)
    if epilogue == "swiglu":
        y = F.silu(y[:, : N // 2]) * y[:, N // 2 :]
    assert_rows_close(out, y.float(), torch.bfloat16, rtol=2 * ROW_RTOL[torch.bfloat16], what=f"{shape[0]} vs F.linear")
    del w


@requires_cuda
@pytest.mark.parametrize("kernel", SKINNY_KERNELS)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("M", [1, 2, 3, 7, 16, 33])
def test_cuda_graph_replay(monkeypatch, kernel, epilogue, M):
    monkeypatch.setenv("DOTS1_EXT_SKINNY_KERNEL", kernel)
    N, K = 1024, 2048
    x, w = make(M, N, K, torch.bfloat16, "cuda")
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        skinny_gemm(static_x, w, epilogue)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = skinny_gemm(static_x, w, epilogue)
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, skinny_gemm(static_x, w, epilogue)), "graph replay differs from eager"


@requires_cuda
def test_cuda_fp16_and_fp32_portable_paths_large():
    # fp32 always takes the portable kernel; fp16 with a misaligned weight too.
    for dtype in (torch.float32, torch.float16):
        x, w = make(9, 2056, 4096, dtype, "cuda")
        check(skinny_gemm(x, w, "swiglu"), x, w, "swiglu", f"{dtype} portable")
    flat = torch.randn(4096 * 520 + 8, device="cuda", dtype=torch.float16) / 64
    w = flat[3 : 3 + 520 * 4096].view(520, 4096)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.float16)
    check(skinny_gemm(x, w, "none"), x, w, "none", "fp16 misaligned weight")
