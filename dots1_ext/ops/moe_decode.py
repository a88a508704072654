"""MoE decode: the routed experts of each token plus the shared experts, straight from topk_ids.

Kernels: csrc/moe_decode/. Reference: dots1_ext.reference.moe_decode_gate_up / moe_decode_down.

A decode-sized MoE layer is three launches: router_topk_gating, :func:`moe_decode_gate_up` (gate_up +
SwiGLU of the k routed experts and the shared experts) and :func:`moe_decode_down` (down projections,
the weighted combine in a fixed order and the residual) — no permute, no unpermute, no separate
shared-experts MLP. On CUDA (fp16 / bf16) each touched expert's weights are read from HBM once per
launch of up to 64 tokens (512 (t, j) pairs: 64 tokens of top-8; an expert chosen by more than 16 of
them is read once per 16, the re-reads side by side so that L2 serves them); larger T is correct (the
launcher loops over 64-token chunks) but reads the weights once per chunk: prefill belongs to permute
+ grouped_gemm. fp32, and shapes the 16-byte vector path cannot take (H, I or Is not a multiple of
8), run a simple correct kernel. ``DOTS1_EXT_MOE_DECODE_KERNEL=simple`` forces that kernel (tests
compare the two); ``DOTS1_EXT_MOE_DECODE_NT=1|2|4`` forces the tensor-core kernels' n-tiles per MMA
(items of 8, 16 or 32 pairs; default 1 up to 8 tokens, else 2; for benchmarks: the bits may differ
between settings). ``DOTS1_EXT_MOE_DECODE_LOADS=wide_all|wide|frag`` picks how the kernels' lanes read the bf16
/ fp16 weight rows (wide_all, the default: 2 rows x 256 bytes per warp load up to 2 tokens, 4 rows x 128
bytes above, in items of up to 8 pairs; wide: the same up to 8 tokens, frag above; frag: 8 rows x 64
bytes; the NT override applies to the frag launches); all are correct, the bits differ (fp32 summation
order). ``DOTS1_EXT_MOE_DECODE_CARRY=1|0`` (default 1): in the wide launches of two n-tiles (5-64 tokens under
wide_all) whether gate_up loads each warp's first weight batch of its next routed tile before the current
tile's reduction and store (the same bits either way). Any other value raises ValueError. (The int4 ops'
own switches: :mod:`dots1_ext.ops.moe_decode_int4`.)

Output shapes depend only on the input shapes (no host synchronisation, CUDA-graph safe); results
are bitwise reproducible run to run and between eager and CUDA-graph replay (no float atomics).

Poison policy (every backend): an id outside [0, E) is never dereferenced; its pair's I columns of
act are NaN (gate_up) and its token's whole output row is NaN (down). ``check_ids=True`` raises an
IndexError on the host instead (a synchronisation on CUDA: not inside CUDA graphs).
"""

from __future__ import annotations

import torch

from dots1_ext import reference
from dots1_ext.ops import _checks as C
from dots1_ext.ops._lib import fill_with_reference, op

EPILOGUES = ("swiglu", "swiglu_interleaved")
_INT32_MAX = 2**31 - 1


def _check_weight_layout(w: torch.Tensor, name: str, layout: str) -> None:
    # Mirrors csrc/moe_decode/moe_decode.cpp: weights are never copied per call. (Alignment is judged
    # from the storage offset: fake tensors have no address; allocations are aligned.)
    if not w.is_contiguous():
        raise ValueError(
            f"dots1_ext: {name} must be contiguous ({layout}, rows packed), got strides {tuple(w.stride())} for "
            f"shape {list(w.shape)}; make it contiguous once, at load"
        )
    if (w.storage_offset() * w.element_size()) % 16:
        raise ValueError(
            f"dots1_ext: {name} must start at a 16-byte aligned address, got an offset of "
            f"{(w.storage_offset() * w.element_size()) % 16} bytes; copy it once, at load (.clone())"
        )


def _check_int32(T: int, k: int, E: int) -> None:
    if max(T, k, E) > _INT32_MAX:
        raise ValueError(f"dots1_ext: T, k and E must fit in int32, got {T}, {k}, {E}")


def check_gate_up_routing(hidden, N: int, E: int, weight_name: str, topk_ids, shared_gate_up, epilogue) -> None:
    """The checks of moe_decode_gate_up's arguments other than the routed weight itself (whose rows N
    and experts E the caller checked and passes; also the int4 op's)."""
    T, H = hidden.shape
    if epilogue not in EPILOGUES:
        raise ValueError(f"dots1_ext: epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if N % 2:
        raise ValueError(f"dots1_ext: {weight_name}.shape[1] (gate + up rows, 2I) must be even, got {N}")
    if epilogue == "swiglu_interleaved" and N % 16:
        raise ValueError(
            f"dots1_ext: epilogue 'swiglu_interleaved' needs {weight_name}.shape[1] (2I) to be a multiple of 16 "
            f"(whole [8 gate | 8 up] blocks), got {N}"
        )
    C.check_dtype(topk_ids, "topk_ids", (torch.int32,))
    C.check_shape(topk_ids, "topk_ids", (T, None))
    C.check_same_device(topk_ids, "topk_ids", hidden, "hidden")
    if shared_gate_up is not None:
        C.check_dtype(shared_gate_up, "shared_gate_up", (hidden.dtype,))
        C.check_shape(shared_gate_up, "shared_gate_up", (None, H))
        C.check_same_device(shared_gate_up, "shared_gate_up", hidden, "hidden")
        if shared_gate_up.shape[0] % 2:
            raise ValueError(
                "dots1_ext: shared_gate_up.shape[0] (gate rows then up rows, 2Is) must be even, got "
                f"{shared_gate_up.shape[0]}"
            )
        _check_weight_layout(shared_gate_up, "shared_gate_up", "[2Is, H] with H contiguous")
    _check_int32(T, topk_ids.shape[1], E)


def check_down_routing(act, E: int, H: int, inter: int, weight_name: str, topk_ids, topk_weights, shared_down,
                       residual, shared_act=None) -> None:
    """The checks of moe_decode_down's arguments other than the routed weight itself ([E, H, inter],
    checked by the caller; also the int4 op's)."""
    T = act.shape[0]
    C.check_dtype(topk_ids, "topk_ids", (torch.int32,))
    C.check_shape(topk_ids, "topk_ids", (T, None))
    C.check_same_device(topk_ids, "topk_ids", act, "act")
    k = topk_ids.shape[1]
    C.check_dtype(topk_weights, "topk_weights", (torch.float32,))
    C.check_shape(topk_weights, "topk_weights", (T, k))
    C.check_same_device(topk_weights, "topk_weights", act, "act")
    shared = 0
    if shared_down is not None:
        C.check_dtype(shared_down, "shared_down", (act.dtype,))
        C.check_shape(shared_down, "shared_down", (H, None))
        C.check_same_device(shared_down, "shared_down", act, "act")
        _check_weight_layout(shared_down, "shared_down", "[H, Is] with Is contiguous")
        shared = shared_down.shape[1]
    if shared_act is not None:
        if shared_down is None:
            raise ValueError("dots1_ext: shared_act needs shared_down (the shared experts' down weight [H, Is]), "
                             "got None")
        C.check_dtype(shared_act, "shared_act", (act.dtype,))
        C.check_shape(shared_act, "shared_act", (T, shared))
        C.check_same_device(shared_act, "shared_act", act, "act")
        if act.shape[1] != k * inter:
            raise ValueError(f"dots1_ext: act must have shape [T, k*I] = [{T}, {k * inter}] when shared_act holds "
                             f"the shared experts' columns (k={k} from topk_ids, I={inter} from {weight_name}), got "
                             f"{list(act.shape)}")
    elif act.shape[1] != k * inter + shared:
        raise ValueError(
            f"dots1_ext: act must have shape [T, k*I + Is] = [{T}, {k * inter + shared}] (k={k} from topk_ids, "
            f"I={inter} from {weight_name}, Is={shared} from shared_down), got {list(act.shape)}"
        )
    if residual is not None:
        C.check_dtype(residual, "residual", (act.dtype,))
        C.check_shape(residual, "residual", (T, H))
        C.check_same_device(residual, "residual", act, "act")
    _check_int32(T, k, E)


def _check_gate_up(hidden, gate_up, topk_ids, shared_gate_up, epilogue, hidden_settled=False):
    C.check_dtype(hidden, "hidden", C.FLOAT_DTYPES)
    C.check_shape(hidden, "hidden", (None, None))
    H = hidden.shape[1]
    C.check_dtype(gate_up, "gate_up", (hidden.dtype,))
    C.check_shape(gate_up, "gate_up", (None, None, H))
    C.check_same_device(gate_up, "gate_up", hidden, "hidden")
    _check_weight_layout(gate_up, "gate_up", "[E, 2I, H] with H contiguous")
    check_gate_up_routing(hidden, gate_up.shape[1], gate_up.shape[0], "gate_up", topk_ids, shared_gate_up, epilogue)


def _check_down(act, down, topk_ids, topk_weights, shared_down, residual, shared_act=None):
    C.check_dtype(act, "act", C.FLOAT_DTYPES)
    C.check_shape(act, "act", (None, None))
    C.check_dtype(down, "down", (act.dtype,))
    C.check_shape(down, "down", (None, None, None))
    C.check_same_device(down, "down", act, "act")
    _check_weight_layout(down, "down", "[E, H, I] with I contiguous")
    E, H, inter = down.shape
    check_down_routing(act, E, H, inter, "down", topk_ids, topk_weights, shared_down, residual, shared_act)


fill_with_reference("moe_decode_gate_up", reference.moe_decode_gate_up, _check_gate_up)
fill_with_reference("moe_decode_down", reference.moe_decode_down, _check_down)


@torch.library.register_fake("dots1_ext::moe_decode_gate_up")
def _moe_decode_gate_up_fake(hidden, gate_up, topk_ids, shared_gate_up, epilogue, hidden_settled=False):
    _check_gate_up(hidden, gate_up, topk_ids, shared_gate_up, epilogue)
    shared = shared_gate_up.shape[0] // 2 if shared_gate_up is not None else 0
    return hidden.new_empty(hidden.shape[0], topk_ids.shape[1] * (gate_up.shape[1] // 2) + shared)


@torch.library.register_fake("dots1_ext::moe_decode_down")
def _moe_decode_down_fake(act, down, topk_ids, topk_weights, shared_down, residual, shared_act=None):
    _check_down(act, down, topk_ids, topk_weights, shared_down, residual, shared_act)
    return act.new_empty(act.shape[0], down.shape[1])


def moe_decode_gate_up(
    hidden: torch.Tensor,
    gate_up: torch.Tensor,
    topk_ids: torch.Tensor,
    shared_gate_up: torch.Tensor | None = None,
    epilogue: str = "swiglu_interleaved",
    check_ids: bool = False,
    hidden_settled: bool = False,
) -> torch.Tensor:
    """gate_up + SwiGLU of each token's k routed experts and of the shared experts.

    hidden [T, H] (any strides: copied if needed); gate_up [E, 2I, H], contiguous and 16-byte aligned
    (never copied per call: ValueError otherwise), rows in the HF order (``epilogue="swiglu"``: gate
    rows [0, I), up rows [I, 2I)) or made by :func:`dots1_ext.ops.interleave_gate_up`
    (``"swiglu_interleaved"``: 16-row [8 gate | 8 up] blocks, 2I % 16 == 0); topk_ids [T, k] int32;
    shared_gate_up [2Is, H] (the shared experts fused: gate rows [0, Is) then up rows [Is, 2Is), HF
    halves whatever the epilogue) or None (Is = 0).

    Returns act [T, k*I + Is] in hidden's dtype: columns [j*I, (j+1)*I) hold silu(gate) * up of
    expert topk_ids[t, j] for token t, columns [k*I, k*I + Is) the shared experts'. fp32 products,
    SwiGLU in fp32, rounded once (grouped_gemm's epilogue). An id outside [0, E) gives NaN in its
    pair's I columns; ``check_ids=True`` raises IndexError on the host instead (synchronises).

    ``hidden_settled=True`` promises that ``hidden`` was written before the CUDA launch right before this
    op (as in the model, where the router, which only reads hidden, runs in between). The CUDA kernel then
    streams its first shared-expert tiles while that launch still runs (PDL, csrc/pdl.cuh) and waits for
    it only before the routing ids: the same result, sooner. Never pass it when the launch right before
    writes ``hidden`` (e.g. the norm that produced it): the kernel would read it too early. (A hidden
    the op has to copy, strided or misaligned, is read only after the wait: the copy is that launch.)
    """
    if not isinstance(hidden_settled, bool):
        raise TypeError(f"dots1_ext: hidden_settled must be a bool, got {type(hidden_settled).__name__}")
    if check_ids:
        C.check_index_range(topk_ids, "topk_ids", gate_up.shape[0], "experts of gate_up")
    return op("moe_decode_gate_up")(hidden, gate_up, topk_ids, shared_gate_up, epilogue, hidden_settled)


def moe_decode_down(
    act: torch.Tensor,
    down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    shared_down: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    check_ids: bool = False,
    shared_act: torch.Tensor | None = None,
) -> torch.Tensor:
    """Down projections of the routed and shared experts, combined per token.

    act [T, k*I + Is] (moe_decode_gate_up's output; copied if its layout needs it); down [E, H, I],
    contiguous and 16-byte aligned; topk_ids [T, k] int32; topk_weights [T, k] fp32; shared_down
    [H, Is] or None (Is = 0, contiguous, aligned); residual [T, H] or None.

    Returns out [T, H] in act's dtype: ``sum_j w[t, j] * (down[ids[t, j]] @ act[t, j*I:(j+1)*I])
    + shared_down @ act[t, k*I:] + residual[t]``, each term an fp32 dot product, added in fp32 in
    exactly that order (j = 0 .. k-1, shared, residual) and rounded once; bitwise reproducible. A token
    with an id outside [0, E) gets a NaN row; ``check_ids=True`` raises IndexError on the host instead
    (synchronises).

    ``shared_act`` [T, Is]: the shared experts' columns given apart (act is then [T, k*I]), e.g. from
    ``skinny_gemm(hidden, shared_gate_up, "swiglu")`` on another stream; the same sums as with them in
    act, so the same bits for the same values.
    """
    if check_ids:
        C.check_index_range(topk_ids, "topk_ids", down.shape[0], "experts of down")
    return op("moe_decode_down")(act, down, topk_ids, topk_weights, shared_down, residual, shared_act)
