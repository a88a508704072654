"""MoE decode with int4 routed experts (W4A16): :func:`moe_decode_int4_gate_up` and
:func:`moe_decode_int4_down` are :mod:`dots1_ext.ops.moe_decode`'s two ops with the routed weights in
the int4 format of :mod:`dots1_ext.quant` (docs/design.md §7): ``qweight [E, N, K/2]`` uint8 (code 2j
in the low nibble of byte j), ``scales [E, N, K/128]`` bf16, ``zeros [E, N, K/128]`` uint8 or None
(symmetric, zero point 8); K (H for gate_up, I for down) a multiple of 128. The shared experts and the
activations stay in the model dtype.

Semantics: exactly the bf16 ops on the dequantized weights, each element ``(u - z) * s`` rounded once
to the activations' dtype (``quant.dequantize_int4``); every other rule (fp32 accumulation, rounding
once, the fixed combine order, NaN poison for ids outside [0, E), ``check_ids``, chunking above 64
tokens, bitwise reproducibility) is the bf16 ops'.

Kernels: csrc/moe_decode/ (the same persistent kernels and schedule; the routed rows are streamed as
packed bytes, one 128-k group per warp step, and dequantized in registers). bf16 activations run the
tensor-core kernels; fp16 / fp32 activations (correct, not fast) and ``DOTS1_EXT_MOE_DECODE_KERNEL=simple``
run the fallback kernels. CPU: each touched expert dequantized once, then the bf16 ops' CPU math.

Kernel switches (read per call; tests and benchmarks compare them; any other value raises ValueError):
``DOTS1_EXT_MOE_DECODE_INT4_STAGED=auto|1|0`` (gate_up's routed tiles through shared memory; auto,
the default: above 8 tokens; same bits) and ``DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS=4|2|1`` (up to 8
tokens, gate_up's routed tiles of 8 R features, each warp one row group over 8 / R of H; unset: 4, or
1 where the launch is staged; R > 1 with STAGED=1 at up to 8 tokens raises; the bits differ between
settings by fp32 summation order, each within the reference's tolerance) and
``DOTS1_EXT_MOE_DECODE_INT4_ACT_SMEM=1|0`` (default 1: with 4 row groups at one token with H <= 8192 or
3-8 tokens with T H <= 32768, gate_up's routed tiles read the tokens' activations from a shared-memory
copy laid out as the MMA operands; same bits).
"""

from __future__ import annotations

import torch

from dots1_ext import reference
from dots1_ext.ops import _checks as C
from dots1_ext.ops._lib import fill_with_reference, op
from dots1_ext.ops.moe_decode import _check_weight_layout, check_down_routing, check_gate_up_routing

GROUP_SIZE = 128  # the int4 format's group along K (dots1_ext.quant.GROUP_SIZE; csrc kGroupK)


def _check_int4_weight(what: str, qweight, scales, zeros, ref, ref_name: str) -> tuple[int, int, int]:
    """Mirrors csrc/moe_decode/moe_decode.cpp check_int4_weight. Returns (E, N, K)."""
    qn, sn, zn = f"{what}_qweight", f"{what}_scales", f"{what}_zeros"
    C.check_dtype(qweight, qn, (torch.uint8,))
    C.check_shape(qweight, qn, (None, None, None))
    C.check_same_device(qweight, qn, ref, ref_name)
    E, N, K = qweight.shape[0], qweight.shape[1], 2 * qweight.shape[2]
    if K <= 0 or K % GROUP_SIZE:
        raise ValueError(f"dots1_ext: {qn}: the reduction dimension K = 2 x {qweight.shape[2]} = {K} must be a "
                         f"positive multiple of the int4 group size {GROUP_SIZE}")
    _check_weight_layout(qweight, qn, "[E, N, K/2] uint8, two codes per byte")
    C.check_dtype(scales, sn, (torch.bfloat16,))
    C.check_shape(scales, sn, (E, N, K // GROUP_SIZE))
    C.check_same_device(scales, sn, ref, ref_name)
    if not scales.is_contiguous():
        raise ValueError(f"dots1_ext: {sn} must be contiguous, got strides {tuple(scales.stride())}")
    if zeros is not None:
        C.check_dtype(zeros, zn, (torch.uint8,))
        C.check_shape(zeros, zn, (E, N, K // GROUP_SIZE))
        C.check_same_device(zeros, zn, ref, ref_name)
        if not zeros.is_contiguous():
            raise ValueError(f"dots1_ext: {zn} must be contiguous, got strides {tuple(zeros.stride())}")
    return E, N, K


def _check_gate_up(hidden, qweight, scales, zeros, topk_ids, shared_gate_up, epilogue, hidden_settled=False):
    C.check_dtype(hidden, "hidden", C.FLOAT_DTYPES)
    C.check_shape(hidden, "hidden", (None, None))
    H = hidden.shape[1]
    E, N, K = _check_int4_weight("gate_up", qweight, scales, zeros, hidden, "hidden")
    if K != H:
        raise ValueError(f"dots1_ext: gate_up_qweight must have shape [E, 2I, H/2] = [E, 2I, {H // 2}] (H = {H} from "
                         f"hidden), got {list(qweight.shape)}")
    check_gate_up_routing(hidden, N, E, "gate_up_qweight", topk_ids, shared_gate_up, epilogue)


def _check_down(act, qweight, scales, zeros, topk_ids, topk_weights, shared_down, residual, shared_act=None):
    C.check_dtype(act, "act", C.FLOAT_DTYPES)
    C.check_shape(act, "act", (None, None))
    E, H, inter = _check_int4_weight("down", qweight, scales, zeros, act, "act")
    check_down_routing(act, E, H, inter, "down_qweight", topk_ids, topk_weights, shared_down, residual, shared_act)


fill_with_reference("moe_decode_int4_gate_up", reference.moe_decode_int4_gate_up, _check_gate_up)
fill_with_reference("moe_decode_int4_down", reference.moe_decode_int4_down, _check_down)


@torch.library.register_fake("dots1_ext::moe_decode_int4_gate_up")
def _moe_decode_int4_gate_up_fake(hidden, qweight, scales, zeros, topk_ids, shared_gate_up, epilogue,
                                  hidden_settled=False):
    _check_gate_up(hidden, qweight, scales, zeros, topk_ids, shared_gate_up, epilogue)
    shared = shared_gate_up.shape[0] // 2 if shared_gate_up is not None else 0
    return hidden.new_empty(hidden.shape[0], topk_ids.shape[1] * (qweight.shape[1] // 2) + shared)


@torch.library.register_fake("dots1_ext::moe_decode_int4_down")
def _moe_decode_int4_down_fake(act, qweight, scales, zeros, topk_ids, topk_weights, shared_down, residual,
                               shared_act=None):
    _check_down(act, qweight, scales, zeros, topk_ids, topk_weights, shared_down, residual, shared_act)
    return act.new_empty(act.shape[0], qweight.shape[1])


def moe_decode_int4_gate_up(
    hidden: torch.Tensor,
    gate_up_qweight: torch.Tensor,
    gate_up_scales: torch.Tensor,
    gate_up_zeros: torch.Tensor | None,
    topk_ids: torch.Tensor,
    shared_gate_up: torch.Tensor | None = None,
    epilogue: str = "swiglu_interleaved",
    check_ids: bool = False,
    hidden_settled: bool = False,
) -> torch.Tensor:
    """:func:`dots1_ext.ops.moe_decode_gate_up` with the routed ``gate_up`` [E, 2I, H] in the int4 format:
    ``gate_up_qweight`` [E, 2I, H/2] uint8 (contiguous, 16-byte aligned: never copied per call),
    ``gate_up_scales`` [E, 2I, H/128] bf16, ``gate_up_zeros`` [E, 2I, H/128] uint8 or None (symmetric);
    rows in the HF order (``"swiglu"``) or interleaved (``"swiglu_interleaved"``, the three tensors'
    rows permuted alike). H % 128 == 0. ``hidden_settled`` as there. Returns act [T, k*I + Is] in hidden's
    dtype."""
    if not isinstance(hidden_settled, bool):
        raise TypeError(f"dots1_ext: hidden_settled must be a bool, got {type(hidden_settled).__name__}")
    if check_ids:
        C.check_index_range(topk_ids, "topk_ids", gate_up_qweight.shape[0], "experts of gate_up_qweight")
    return op("moe_decode_int4_gate_up")(hidden, gate_up_qweight, gate_up_scales, gate_up_zeros, topk_ids,
                                         shared_gate_up, epilogue, hidden_settled)


def moe_decode_int4_down(
    act: torch.Tensor,
    down_qweight: torch.Tensor,
    down_scales: torch.Tensor,
    down_zeros: torch.Tensor | None,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    shared_down: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    check_ids: bool = False,
    shared_act: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`dots1_ext.ops.moe_decode_down` with the routed ``down`` [E, H, I] in the int4 format
    (``down_qweight`` [E, H, I/2], ``down_scales`` / ``down_zeros`` [E, H, I/128]; I % 128 == 0).
    ``shared_act`` as there. Returns out [T, H] in act's dtype."""
    if check_ids:
        C.check_index_range(topk_ids, "topk_ids", down_qweight.shape[0], "experts of down_qweight")
    return op("moe_decode_int4_down")(act, down_qweight, down_scales, down_zeros, topk_ids, topk_weights,
                                      shared_down, residual, shared_act)
