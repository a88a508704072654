"""Grouped expert GEMM with int4 weights and bf16 activations (W4A16), for the routed experts' prefill:
:func:`grouped_gemm_int4` is :func:`dots1_ext.ops.grouped_gemm` with the weight in the int4 format of
:mod:`dots1_ext.quant` (docs/design.md §7): ``qweight [E, N, K/2]`` uint8 (code 2j in the low nibble of
byte j), ``scales [E, N, K/128]`` bf16, ``zeros [E, N, K/128]`` uint8 or None (symmetric, zero point 8);
K a multiple of 128. The op takes the format as stored: no repacking at load.

Semantics: grouped_gemm on the dequantized weight, each element ``(u - z) * s`` rounded once to bf16
(``quant.dequantize_int4``), fp32 accumulation; equal to it to fp32 summation order per row. Rows
outside every expert's range are zero; the offsets rules are grouped_gemm's.

Kernels (csrc/grouped_gemm/grouped_gemm_int4_sm90*.cu): CUTLASS 3's Hopper mixed-input ptr-array grouped
GEMM on sm90a, the product computed transposed (the int4 weight is CUTLASS's register-converted A
operand), the SwiGLU epilogue fused for interleaved gate/up rows. Elsewhere (CPU; CUDA without the sm90a
kernels; ``DOTS1_EXT_GEMM_INT4_BACKEND=dequantize``) the weight is dequantized into a bf16 copy and
grouped_gemm runs on it. ``DOTS1_EXT_GEMM_INT4_BACKEND`` = auto | cutlass | dequantize (read per call).
"""

from __future__ import annotations

import torch

from dots1_ext import reference
from dots1_ext.ops import _checks as C
from dots1_ext.ops._lib import fill_with_reference, op
from dots1_ext.ops.grouped_gemm import check_expert_offsets

GROUP_SIZE = 128  # the int4 format's group along K (dots1_ext.quant.GROUP_SIZE; csrc kInt4GroupK)
EPILOGUES = ("none", "swiglu_interleaved")


def _check_grouped_gemm_int4(x, qweight, scales, zeros, expert_offsets, epilogue):
    """Mirrors csrc/grouped_gemm/grouped_gemm.cpp check_grouped_gemm_int4."""
    C.check_dtype(x, "x", (torch.bfloat16,))
    C.check_shape(x, "x", (None, None))
    K = x.shape[1]
    if K <= 0 or K % GROUP_SIZE:
        raise ValueError(f"dots1_ext: x.shape[1] (K) must be a positive multiple of the int4 group size {GROUP_SIZE}, "
                         f"got {K}")
    C.check_dtype(qweight, "qweight", (torch.uint8,))
    C.check_shape(qweight, "qweight", (None, None, K // 2))
    C.check_same_device(qweight, "qweight", x, "x")
    E, N, G = qweight.shape[0], qweight.shape[1], K // GROUP_SIZE
    if not qweight.is_contiguous():
        raise ValueError(
            f"dots1_ext: qweight must be contiguous ([E, N, K/2] uint8, two codes per byte, rows packed), got strides "
            f"{tuple(qweight.stride())} for shape {list(qweight.shape)}; make it contiguous once, at load"
        )
    if qweight.storage_offset() % 16:
        raise ValueError(
            "dots1_ext: qweight must start at a 16-byte aligned address, got an offset of "
            f"{qweight.storage_offset() % 16} bytes; copy it once, at load (.clone())"
        )
    C.check_dtype(scales, "scales", (torch.bfloat16,))
    C.check_shape(scales, "scales", (E, N, G))
    C.check_same_device(scales, "scales", x, "x")
    if not scales.is_contiguous():
        raise ValueError(f"dots1_ext: scales must be contiguous, got strides {tuple(scales.stride())}")
    if zeros is not None:
        C.check_dtype(zeros, "zeros", (torch.uint8,))
        C.check_shape(zeros, "zeros", (E, N, G))
        C.check_same_device(zeros, "zeros", x, "x")
        if not zeros.is_contiguous():
            raise ValueError(f"dots1_ext: zeros must be contiguous, got strides {tuple(zeros.stride())}")
    C.check_dtype(expert_offsets, "expert_offsets", (torch.int32,))
    C.check_shape(expert_offsets, "expert_offsets", (E + 1,))
    C.check_same_device(expert_offsets, "expert_offsets", x, "x")
    if epilogue not in EPILOGUES:
        raise ValueError(f"dots1_ext: epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if epilogue == "swiglu_interleaved" and N % 16:
        raise ValueError(
            "dots1_ext: epilogue 'swiglu_interleaved' needs qweight.shape[1] (gate + up rows) to be a multiple of 16 "
            f"(whole [8 gate | 8 up] blocks), got {N}"
        )
    if x.is_cuda and N % 8:
        raise ValueError(f"dots1_ext: qweight.shape[1] (N) must be a multiple of 8 on CUDA, got {N}")


def _reference(x, qweight, scales, zeros, expert_offsets, epilogue):
    if expert_offsets.device.type == "cpu":  # the CPU kernel's contract: bad offsets raise
        check_expert_offsets(expert_offsets, x.shape[0])
    return reference.grouped_gemm_int4(x, qweight, scales, zeros, expert_offsets, epilogue)


fill_with_reference("grouped_gemm_int4", _reference, _check_grouped_gemm_int4)


@torch.library.register_fake("dots1_ext::grouped_gemm_int4")
def _grouped_gemm_int4_fake(x, qweight, scales, zeros, expert_offsets, epilogue):
    _check_grouped_gemm_int4(x, qweight, scales, zeros, expert_offsets, epilogue)
    N = qweight.shape[1] // 2 if epilogue == "swiglu_interleaved" else qweight.shape[1]
    return x.new_empty(x.shape[0], N)


def grouped_gemm_int4(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    expert_offsets: torch.Tensor,
    epilogue: str = "none",
    check_offsets: bool = False,
) -> torch.Tensor:
    """Per-expert ``x[rows_e] @ dq(w[e]).T`` with ``w`` in the int4 format.

    x [S, K] bf16 (any strides: copied if needed); qweight [E, N, K/2] uint8, contiguous and 16-byte
    aligned (never copied per call); scales [E, N, K/128] bf16 and zeros [E, N, K/128] uint8 or None
    (symmetric), contiguous; expert_offsets [E+1] int32, expert e owns rows [off[e], off[e+1]). Returns
    [S, N] bf16 (``"none"``) or [S, N/2] (``"swiglu_interleaved"``: silu(gate) * up over weight rows in
    16-row [8 gate | 8 up] blocks, the three tensors' rows interleaved alike). Rows outside every
    expert's range are zero. ``check_offsets=True`` validates the offsets on the host first
    (synchronises; not for CUDA graphs); otherwise bad offsets raise IndexError on the CPU and give
    unspecified values (never out-of-bounds accesses) on CUDA, as for grouped_gemm.
    """
    if check_offsets:
        check_expert_offsets(expert_offsets, x.shape[0])
    return op("grouped_gemm_int4")(x, qweight, scales, zeros, expert_offsets, epilogue)
