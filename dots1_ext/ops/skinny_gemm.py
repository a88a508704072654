"""Skinny GEMM: the decode linears (qkv, o_proj, dense and shared-expert MLPs, lm_head) for a few rows.

Kernels: csrc/skinny_gemm/. Reference: dots1_ext.reference.skinny_gemm.

On CUDA, M <= 16 rows stream the weight once at (near) the memory's read bandwidth: a tensor-core
kernel for fp16/bf16 with K % 8 == 0 and a 16-byte aligned weight (any row stride that keeps rows
aligned), a portable kernel otherwise (fp32, odd K, a misaligned view: correct, slower). M > 16 runs
cuBLAS and the epilogue after it (correct, not tuned). ``DOTS1_EXT_SKINNY_TILES`` = auto | 1 | 2 forces
the tensor-core kernel's 16-row weight tiles per warp (tuning); ``DOTS1_EXT_SKINNY_KERNEL`` = frag | wide
picks its weight-load mapping (wide, the default: each warp load reads 256 contiguous bytes of a row,
for up to 4 rows of x; frag: 64 bytes of 8 rows; same results up to the fp32 summation order).
"""

from __future__ import annotations

import torch

from dots1_ext import reference
from dots1_ext.ops import _checks as C
from dots1_ext.ops._lib import fill_with_reference, op

EPILOGUES = ("none", "swiglu", "swiglu_interleaved")
SWIGLU_EPILOGUES = ("swiglu", "swiglu_interleaved")
# The most rows the weight-streaming kernels take (csrc/skinny_gemm/skinny_gemm.h kSkinnyMaxRows).
MAX_FAST_ROWS = 16


def _check_skinny_gemm(x, weight, epilogue):
    C.check_dtype(x, "x", C.FLOAT_DTYPES)
    C.check_shape(x, "x", (None, None))
    C.check_dtype(weight, "weight", (x.dtype,))
    C.check_shape(weight, "weight", (None, x.shape[1]))
    C.check_same_device(weight, "weight", x, "x")
    if epilogue not in EPILOGUES:
        raise ValueError(f"dots1_ext: epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    N = weight.shape[0]
    if epilogue == "swiglu" and N % 2:
        raise ValueError(
            f"dots1_ext: epilogue 'swiglu' needs an even weight.shape[0] (gate rows then up rows), got {N}"
        )
    if epilogue == "swiglu_interleaved" and N % 16:
        raise ValueError(
            "dots1_ext: epilogue 'swiglu_interleaved' needs weight.shape[0] (gate + up rows) to be a multiple of 16 "
            f"(whole [8 gate | 8 up] blocks), got {N}"
        )
    if weight.shape[1] > 1 and weight.stride(1) != 1:
        raise ValueError(
            f"dots1_ext: weight must have a contiguous last dimension (it is never copied per call), got strides "
            f"{tuple(weight.stride())} for shape {list(weight.shape)}; make it contiguous once, at load "
            "(weight.contiguous())"
        )


fill_with_reference("skinny_gemm", reference.skinny_gemm, _check_skinny_gemm)


@torch.library.register_fake("dots1_ext::skinny_gemm")
def _skinny_gemm_fake(x, weight, epilogue):
    _check_skinny_gemm(x, weight, epilogue)
    N = weight.shape[0] // 2 if epilogue in SWIGLU_EPILOGUES else weight.shape[0]
    return x.new_empty(x.shape[0], N)


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, epilogue: str = "none") -> torch.Tensor:
    """``x @ weight.T`` for few rows of x (decode), optionally with a SwiGLU epilogue.

    x [M, K] (any strides; fast for M <= 16); weight [N, K], same dtype, last dim contiguous, any row
    stride (e.g. a row slice of a packed weight; never copied per call: ValueError otherwise).
    Returns a new contiguous [M, N] (``"none"``), or [M, N/2] with ``"swiglu"`` (gate = weight rows
    [0, N/2), up = rows [N/2, N), the HF layout; N even) or ``"swiglu_interleaved"`` (16-row
    [8 gate | 8 up] blocks, :func:`dots1_ext.ops.interleave_gate_up`'s layout; N % 16 == 0):
    ``out[:, f] = silu(gate_f) * up_f``. The product and the epilogue are computed in fp32 and rounded
    once to x's dtype. Deterministic: the same inputs give bitwise the same output on every run."""
    return op("skinny_gemm")(x, weight, epilogue)
