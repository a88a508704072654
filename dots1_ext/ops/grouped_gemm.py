"""Grouped expert GEMM: one matrix product per expert over its contiguous rows of the permuted input.

Kernels: csrc/grouped_gemm/. Reference: dots1_ext.reference.grouped_gemm.
"""

from __future__ import annotations

import torch

from dots1_ext import reference
from dots1_ext.ops import _checks as C
from dots1_ext.ops._lib import fill_with_reference, op

EPILOGUES = ("none", "swiglu")


def _check_grouped_gemm(x, weight, expert_offsets, epilogue):
    C.check_dtype(x, "x", C.FLOAT_DTYPES)
    C.check_shape(x, "x", (None, None))
    C.check_dtype(weight, "weight", (x.dtype,))
    C.check_shape(weight, "weight", (None, None, x.shape[1]))
    C.check_dtype(expert_offsets, "expert_offsets", (torch.int32,))
    C.check_shape(expert_offsets, "expert_offsets", (weight.shape[0] + 1,))
    C.check_same_device(weight, "weight", x, "x")
    C.check_same_device(expert_offsets, "expert_offsets", x, "x")
    if epilogue not in EPILOGUES:
        raise ValueError(f"dots1_ext: epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if epilogue == "swiglu" and weight.shape[1] % 2:
        raise ValueError(f"dots1_ext: epilogue 'swiglu' needs an even weight.shape[1] (gate + up rows), got {weight.shape[1]}")


fill_with_reference("grouped_gemm", reference.grouped_gemm, _check_grouped_gemm)


@torch.library.register_fake("dots1_ext::grouped_gemm")
def _grouped_gemm_fake(x, weight, expert_offsets, epilogue):
    _check_grouped_gemm(x, weight, expert_offsets, epilogue)
    N = weight.shape[1] // 2 if epilogue == "swiglu" else weight.shape[1]
    return x.new_empty(x.shape[0], N)


def grouped_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_offsets: torch.Tensor,
    epilogue: str = "none",
) -> torch.Tensor:
    """Per-expert ``x[rows_e] @ weight[e].T``.

    x [S, K]; weight [E, N, K] (HF layout, K contiguous); expert_offsets [E+1] int32, expert e owns
    rows [expert_offsets[e], expert_offsets[e+1]). Returns [S, N], or [S, N/2] with
    ``epilogue="swiglu"`` (silu(gate) * up, gate = the first N/2 weight rows). Rows outside every
    expert's range are zero. fp32 accumulation.
    """
    return op("grouped_gemm")(x, weight, expert_offsets, epilogue)
