"""Grouped expert GEMM: one matrix product per expert over its contiguous rows of the permuted input.

Kernels: csrc/grouped_gemm/. Reference: dots1_ext.reference.grouped_gemm.

CUDA backend selection (read on every call): ``DOTS1_EXT_GEMM_BACKEND`` = auto | cutlass | decode |
torch; ``DOTS1_EXT_GEMM_DECODE_MAX_ROWS`` (auto: the decode kernel up to this many rows S, default
128); ``DOTS1_EXT_GEMM_SM90_CONFIG`` = auto | coop | pingpong; ``DOTS1_EXT_GEMM_COOP_MIN_ROWS`` (auto
config: cooperative tiles from this many rows per expert on average; default 400, 128 on an H100 / H800;
see bench/tune_grouped_gemm.py).
"""

from __future__ import annotations

import torch

from dots1_ext import reference
from dots1_ext.ops import _checks as C
from dots1_ext.ops._lib import fill_with_reference, op

EPILOGUES = ("none", "swiglu", "swiglu_interleaved")
SWIGLU_EPILOGUES = ("swiglu", "swiglu_interleaved")

# Layout conversions of the fused gate_up weight [E, 2I, K] (pure torch; run once at load).
interleave_gate_up = reference.interleave_gate_up
deinterleave_gate_up = reference.deinterleave_gate_up


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
    if epilogue == "swiglu_interleaved" and weight.shape[1] % 16:
        raise ValueError(
            "dots1_ext: epilogue 'swiglu_interleaved' needs weight.shape[1] (gate + up rows) to be a multiple of 16 "
            f"(whole [8 gate | 8 up] blocks), got {weight.shape[1]}"
        )
    if x.is_cuda:
        # 16-byte vector loads and TMA need whole 16-byte rows.
        if weight.shape[1] % 8:
            raise ValueError(f"dots1_ext: weight.shape[1] (N) must be a multiple of 8 on CUDA, got {weight.shape[1]}")
        if x.shape[1] % 8:
            raise ValueError(f"dots1_ext: x.shape[1] (K) must be a multiple of 8 on CUDA, got {x.shape[1]}")
    # Mirrors csrc/grouped_gemm/grouped_gemm.cpp: the weight is never copied per call. (Alignment is
    # judged from the storage offset here: fake tensors have no address; allocations are aligned.)
    if not weight.is_contiguous():
        raise ValueError(
            f"dots1_ext: weight must be contiguous ([E, N, K] with K contiguous, rows packed), got strides "
            f"{tuple(weight.stride())} for shape {list(weight.shape)}; make it contiguous once, at load "
            "(weight.contiguous())"
        )
    if (weight.storage_offset() * weight.element_size()) % 16:
        raise ValueError(
            "dots1_ext: weight must start at a 16-byte aligned address, got an offset of "
            f"{(weight.storage_offset() * weight.element_size()) % 16} bytes; copy it once, at load (weight.clone())"
        )


def check_expert_offsets(expert_offsets: torch.Tensor, num_rows: int) -> None:
    """Host-side validation of expert_offsets (reads data: synchronises). The CUDA kernels stay in
    bounds whatever the offsets hold, but their output is specified only for non-decreasing offsets
    within [0, num_rows]; the CPU kernel always validates."""
    if expert_offsets.numel() == 0:
        return
    off = expert_offsets.detach().cpu().long()
    C.check_index_range(off, "expert_offsets", num_rows + 1, "rows of x, inclusive")
    if off.numel() > 1 and bool((off[1:] < off[:-1]).any()):
        raise IndexError(f"dots1_ext: expert_offsets must be non-decreasing, got {off.tolist()}")


fill_with_reference("grouped_gemm", reference.grouped_gemm, _check_grouped_gemm)


@torch.library.register_fake("dots1_ext::grouped_gemm")
def _grouped_gemm_fake(x, weight, expert_offsets, epilogue):
    _check_grouped_gemm(x, weight, expert_offsets, epilogue)
    N = weight.shape[1] // 2 if epilogue in SWIGLU_EPILOGUES else weight.shape[1]
    return x.new_empty(x.shape[0], N)


def grouped_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_offsets: torch.Tensor,
    epilogue: str = "none",
    check_offsets: bool = False,
) -> torch.Tensor:
    """Per-expert ``x[rows_e] @ weight[e].T``.

    x [S, K] (any strides: copied if needed); weight [E, N, K], contiguous and 16-byte aligned (it is
    never copied per call: ValueError otherwise); expert_offsets [E+1] int32, expert e owns rows
    [expert_offsets[e], expert_offsets[e+1]). Returns [S, N], or [S, N/2] with a SwiGLU epilogue:
    ``"swiglu"`` takes the HF layout (gate = the first N/2 weight rows, up = the last N/2);
    ``"swiglu_interleaved"`` takes the weight made once by :func:`interleave_gate_up` (16-row
    [8 gate | 8 up] blocks, N % 16 == 0), which the sm90a kernel fuses into its epilogue (the [S, N]
    product never reaches memory) — use it for weights you own. Rows outside every expert's range are
    zero. fp32 accumulation. ``check_offsets=True`` validates the offsets on the host first
    (synchronises; not for CUDA graphs).

    Offsets that are decreasing or outside [0, S]: the CPU kernel raises IndexError naming
    expert_offsets; the CUDA kernels clamp them and never access memory outside the tensors, but the
    output values are unspecified; ``check_offsets=True`` raises the IndexError on any device.
    """
    if check_offsets:
        check_expert_offsets(expert_offsets, x.shape[0])
    return op("grouped_gemm")(x, weight, expert_offsets, epilogue)
