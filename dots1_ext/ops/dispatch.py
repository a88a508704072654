"""Token dispatch: permute rows into expert order, and combine expert outputs back per token.

Kernels: csrc/dispatch/. Reference: dots1_ext.reference.permute / unpermute.
Output shapes never depend on the routing (no host synchronisation, CUDA-graph safe).

Poison policy for bad indices (every backend: CPU and CUDA kernels, reference; csrc/dispatch/
dispatch.h): an expert id outside [0, E) takes no permuted row (its row_map entry is -1), and a
row_map entry outside [0, S) (such as that -1) makes the token's unpermute output row NaN, so a bad id
poisons exactly the tokens it belongs to and is never read or written out of bounds.
"""

from __future__ import annotations

import torch

from dots1_ext import reference
from dots1_ext.ops import _checks as C
from dots1_ext.ops._lib import fill_with_reference, op

permuted_rows = reference.permuted_rows

MAX_EXPERTS = 1024  # csrc/dispatch/dispatch.h kPermuteMaxExperts (32 x (E+1) counters in shared memory)
_INT32_MAX = 2**31 - 1


def _check_permute(hidden, topk_ids, num_experts, pad_to):
    C.check_dtype(hidden, "hidden", C.FLOAT_DTYPES)
    C.check_shape(hidden, "hidden", (None, None))
    C.check_dtype(topk_ids, "topk_ids", (torch.int32,))
    C.check_shape(topk_ids, "topk_ids", (hidden.shape[0], None))
    C.check_same_device(topk_ids, "topk_ids", hidden, "hidden")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"dots1_ext: num_experts must be in [1, {MAX_EXPERTS}], got {num_experts}")
    C.check_positive(pad_to, "pad_to")
    T, k = topk_ids.shape
    if pad_to > _INT32_MAX or permuted_rows(T, k, num_experts, pad_to) > _INT32_MAX:
        raise ValueError(
            "dots1_ext: permuted rows (T*k + num_experts*(pad_to-1)) must fit in int32 (row_map), got "
            f"T={T}, k={k}, num_experts={num_experts}, pad_to={pad_to}"
        )


def _check_unpermute(expert_out, row_map, topk_weights, shared_out, residual):
    C.check_dtype(expert_out, "expert_out", C.FLOAT_DTYPES)
    C.check_shape(expert_out, "expert_out", (None, None))
    C.check_dtype(topk_weights, "topk_weights", (torch.float32,))
    C.check_shape(topk_weights, "topk_weights", (None, None))
    T, k = topk_weights.shape
    H = expert_out.shape[1]
    C.check_dtype(row_map, "row_map", (torch.int32,))
    C.check_shape(row_map, "row_map", (T * k,))
    for t, name in ((row_map, "row_map"), (topk_weights, "topk_weights")):
        C.check_same_device(t, name, expert_out, "expert_out")
    for t, name in ((shared_out, "shared_out"), (residual, "residual")):
        if t is not None:
            C.check_dtype(t, name, (expert_out.dtype,))
            C.check_shape(t, name, (T, H))
            C.check_same_device(t, name, expert_out, "expert_out")


fill_with_reference("permute", reference.permute, _check_permute)
fill_with_reference("unpermute", reference.unpermute, _check_unpermute)


@torch.library.register_fake("dots1_ext::permute")
def _permute_fake(hidden, topk_ids, num_experts, pad_to):
    _check_permute(hidden, topk_ids, num_experts, pad_to)
    T, k = topk_ids.shape
    rows = permuted_rows(T, k, num_experts, pad_to)
    return (
        hidden.new_empty(rows, hidden.shape[1]),
        hidden.new_empty(num_experts + 1, dtype=torch.int32),
        hidden.new_empty(T * k, dtype=torch.int32),
    )


@torch.library.register_fake("dots1_ext::unpermute")
def _unpermute_fake(expert_out, row_map, topk_weights, shared_out, residual):
    _check_unpermute(expert_out, row_map, topk_weights, shared_out, residual)
    return expert_out.new_empty(topk_weights.shape[0], expert_out.shape[1])


def permute(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    pad_to: int = 1,
    check_ids: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gathers token rows into expert order.

    hidden [T, H]; topk_ids [T, k] int32. Returns permuted [S, H] (S = T*k, plus E*(pad_to-1) when
    ``pad_to`` > 1), int32 expert_offsets [E+1] and int32 row_map [T*k], with
    ``permuted[row_map[t*k + j]] == hidden[t]``, rows ordered by (expert, token, slot).
    With ``pad_to`` > 1 each expert's segment starts at a multiple of ``pad_to``; gap rows are zero.
    ``check_ids=True`` validates the ids on the host first (IndexError; a synchronisation on CUDA).
    Without it, an out-of-range id routes its (token, slot) to no expert and takes no row: its
    row_map entry is -1, which unpermute turns into a NaN output row for that token (poison policy).
    On CUDA, no host sync: the index (count + scan + stable rank) in one block below 768 ids (T*k), in
    three launches over many blocks from there on (``DOTS1_EXT_PERMUTE_INDEX``), then the row copy.
    """
    if check_ids:
        C.check_index_range(topk_ids, "topk_ids", num_experts, "expert ids")
    return op("permute")(hidden, topk_ids, num_experts, pad_to)


def unpermute(
    expert_out: torch.Tensor,
    row_map: torch.Tensor,
    topk_weights: torch.Tensor,
    shared_out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted combine of expert outputs back to token order.

    expert_out [S, H]; row_map [T*k] int32 (from permute); topk_weights [T, k] fp32;
    shared_out, residual [T, H] optional, added unweighted. Returns [T, H] in expert_out's dtype:
    ``sum_j w[t, j] * expert_out[row_map[t*k + j]] + shared_out[t] + residual[t]``, accumulated in fp32
    in slot order with each product and sum rounded separately (as the eager reference does) —
    bitwise reproducible, no atomics, independent of the other tokens in the batch. shared_out is
    added as is (routed_scaling_factor belongs in topk_weights only). A row_map entry outside
    [0, S) is never read: the token's whole output row is NaN instead (poison policy).
    """
    return op("unpermute")(expert_out, row_map, topk_weights, shared_out, residual)
