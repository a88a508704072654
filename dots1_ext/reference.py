"""Eager PyTorch definitions of every dots1_ext op.

These are the semantics the kernels are tested against (docs/design.md §2/§4, following transformers'
``modeling_dots1.py``), and the implementation a CUDA op falls back to when the extension was built
without a CUDA kernel for it. Each function has exactly the signature of the op it defines.

Shape letters: T tokens, E experts, k experts per token, H hidden size, S permuted rows,
N output features, K input features, Hq/Hk query/key heads, D head_dim, P cached positions.

Bad indices (the poison policy, shared by every backend): an index outside its range is never
dereferenced; the output rows it would have produced are NaN instead, so that a bad index cannot
give a plausible wrong number. A position outside [0, P) poisons the token's q and k rows; a KV-cache
row outside the cache is not written and poisons the token's q rows (its attention output is NaN);
an expert id outside [0, E) takes no permuted row (row_map -1) and a row_map entry outside [0, S)
poisons the token's unpermute output row. NaN router logits rank highest (torch.topk's rule), ties
to the lower id.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dots1_ext import quant

# Added to the renormalisation denominator exactly as transformers does, so that a row of all-zero
# scores gives zeros rather than NaN.
RENORM_EPS = 1e-20


def _stable_topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    # torch.topk does not promise which of two equal scores it keeps (nor the order of several NaN);
    # a stable descending sort keeps the lower index first, which is the tie rule every dots1_ext
    # kernel follows. Like torch.topk, torch.sort ranks NaN (of either sign) above +inf.
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def topk_gating(
    logits: torch.Tensor,  # [T, E] fp32 router logits
    bias: torch.Tensor,  # [E] fp32 e_score_correction_bias
    k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fp32 weights [T, k], int32 ids [T, k]
    """DeepSeek-V3 style sigmoid routing with bias-corrected, group-limited top-k selection.

    NaN: a NaN biased score ranks above every number (torch.topk's policy), NaN ties to the lower
    expert id; a group holding a NaN score has a NaN group score, which ranks first in the same way.
    A token routed to a NaN expert gets NaN weights (renormalised: all of its k weights)."""
    T, E = logits.shape
    scores = logits.float().sigmoid()
    choice = scores + bias.float()
    if topk_group < n_group:
        group_size = E // n_group
        grouped = choice.view(T, n_group, group_size)
        group_scores = grouped.topk(min(2, group_size), dim=-1).values.sum(dim=-1)
        kept_groups = _stable_topk_indices(group_scores, topk_group)
        group_mask = torch.zeros(T, n_group, dtype=torch.bool, device=logits.device)
        group_mask.scatter_(1, kept_groups, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(group_size, dim=1), float("-inf"))
    ids = _stable_topk_indices(choice, k)
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
    weights = weights * scale
    return weights, ids.to(torch.int32)


def router_topk_gating(
    hidden: torch.Tensor,  # [T, H] any float dtype
    router_weight: torch.Tensor,  # [E, H] any float dtype
    bias: torch.Tensor,  # [E] fp32
    k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router projection in fp32 (``hidden.float() @ router_weight.float().T``) followed by topk_gating."""
    logits = hidden.float() @ router_weight.float().t()
    return topk_gating(logits, bias, k, n_group, topk_group, renormalize, scale)


def permuted_rows(num_tokens: int, k: int, num_experts: int, pad_to: int) -> int:
    """Rows of the permuted buffer: T*k, plus the worst-case padding when segments are padded."""
    return num_tokens * k + (num_experts * (pad_to - 1) if pad_to > 1 else 0)


def permute(
    hidden: torch.Tensor,  # [T, H]
    topk_ids: torch.Tensor,  # [T, k] int32
    num_experts: int,
    pad_to: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather token rows into expert order.

    Returns ``permuted`` [S, H] (S = ``permuted_rows``), int32 ``expert_offsets`` [E+1] and int32
    ``row_map`` [T*k] with ``permuted[row_map[t*k + j]] == hidden[t]``. Rows are ordered by
    (expert, token, slot). Expert e's rows start at ``expert_offsets[e]``; with ``pad_to > 1`` each
    start is a multiple of ``pad_to`` and the gap rows (and any rows past ``expert_offsets[E]``)
    are zero. An id outside [0, E) takes no row: its row_map entry is -1 (which unpermute turns into
    a NaN output row for that token).
    """
    T, k = topk_ids.shape
    H = hidden.shape[1]
    E = num_experts
    flat_ids = topk_ids.reshape(-1).long()
    valid = (flat_ids >= 0) & (flat_ids < E)
    bins = torch.where(valid, flat_ids, E)  # bad ids collect in a virtual bin E, sorted last
    order = torch.sort(bins, stable=True).indices
    counts_all = torch.bincount(bins, minlength=E + 1)  # [E+1]
    counts = counts_all[:E]
    seg_rows = (counts + pad_to - 1) // pad_to * pad_to if pad_to > 1 else counts
    offsets = torch.zeros(E + 1, dtype=torch.long, device=hidden.device)
    offsets[1:] = torch.cumsum(seg_rows, 0)
    first_sorted = torch.cumsum(counts_all, 0) - counts_all  # index in `order` where each bin starts
    sorted_bins = bins[order]
    rank = torch.arange(T * k, device=hidden.device) - first_sorted[sorted_bins]
    row_map = torch.empty(T * k, dtype=torch.long, device=hidden.device)
    row_map[order] = offsets[sorted_bins] + rank
    row_map = torch.where(valid, row_map, -1)  # poison policy: a bad id takes no row
    permuted = hidden.new_zeros(permuted_rows(T, k, E, pad_to), H)
    permuted[row_map[valid]] = hidden.repeat_interleave(k, dim=0)[valid]
    return permuted, offsets.to(torch.int32), row_map.to(torch.int32)


def unpermute(
    expert_out: torch.Tensor,  # [S, H]
    row_map: torch.Tensor,  # [T*k] int32
    topk_weights: torch.Tensor,  # [T, k] fp32
    shared_out: torch.Tensor | None,  # [T, H] or None
    residual: torch.Tensor | None,  # [T, H] or None
) -> torch.Tensor:  # [T, H], dtype of expert_out
    """out[t] = sum_j w[t, j] * expert_out[row_map[t*k + j]] (+ shared_out[t]) (+ residual[t]), in fp32, j in order.

    A row_map entry outside [0, S) makes the token's whole output row NaN (poison policy)."""
    T, k = topk_weights.shape
    S, H = expert_out.shape
    rows = row_map.long()
    valid = (rows >= 0) & (rows < S)
    if S > 0:
        gathered = expert_out[rows.clamp(0, S - 1)].view(T, k, H).float()
    else:
        gathered = expert_out.new_zeros(T, k, H, dtype=torch.float32)
    acc = torch.zeros(T, H, dtype=torch.float32, device=expert_out.device)
    for j in range(k):
        acc = acc + topk_weights[:, j : j + 1].float() * gathered[:, j]
    if shared_out is not None:
        acc = acc + shared_out.float()
    if residual is not None:
        acc = acc + residual.float()
    acc = acc.masked_fill(~valid.view(T, k).all(dim=1, keepdim=True), float("nan"))
    return acc.to(expert_out.dtype)


def interleave_gate_up(weight: torch.Tensor) -> torch.Tensor:
    """HF gate_up layout [E, 2I, K] (gate rows, then up rows) -> the interleaved layout: 16-row blocks
    [8 gate rows | 8 up rows] of the same 8 features (2I % 16 == 0). A new contiguous tensor."""
    E, N, K = weight.shape
    return weight.reshape(E, 2, N // 16, 8, K).transpose(1, 2).reshape(E, N, K)


def deinterleave_gate_up(weight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`interleave_gate_up`: back to the HF layout. A new contiguous tensor."""
    E, N, K = weight.shape
    return weight.reshape(E, N // 16, 2, 8, K).transpose(1, 2).reshape(E, N, K)


def grouped_gemm(
    x: torch.Tensor,  # [S, K]
    weight: torch.Tensor,  # [E, N, K] (K contiguous)
    expert_offsets: torch.Tensor,  # [E+1] int32
    epilogue: str,  # "none" | "swiglu" | "swiglu_interleaved"
) -> torch.Tensor:  # [S, N] or, for the SwiGLU epilogues, [S, N/2]
    """Per-expert ``x[rows_e] @ weight[e].T`` in fp32; "swiglu" returns silu(gate) * up, where the
    first N/2 rows of each expert's weight are the gate projection and the last N/2 the up projection
    (HF layout); "swiglu_interleaved" the same for weights in :func:`interleave_gate_up`'s layout.
    Rows outside every expert's range are zero."""
    S = x.shape[0]
    E, N, _ = weight.shape
    swiglu = epilogue in ("swiglu", "swiglu_interleaved")
    out = x.new_zeros(S, N // 2 if swiglu else N)
    bounds = expert_offsets.tolist()  # reference only: a host read is fine here
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if hi <= lo:
            continue
        w = weight[e]
        if epilogue == "swiglu_interleaved":  # one expert at a time: no full-size copy
            w = deinterleave_gate_up(w[None])[0]
        y = x[lo:hi].float() @ w.float().t()
        if swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        out[lo:hi] = y.to(x.dtype)
    return out


def grouped_gemm_int4(
    x: torch.Tensor,  # [S, K] bf16
    qweight: torch.Tensor,  # [E, N, K/2] uint8
    scales: torch.Tensor,  # [E, N, K/128] bf16
    zeros: torch.Tensor | None,  # [E, N, K/128] uint8, or None (symmetric)
    expert_offsets: torch.Tensor,  # [E+1] int32
    epilogue: str,  # "none" | "swiglu_interleaved"
) -> torch.Tensor:
    """grouped_gemm on the int4 weight dequantized to x's dtype (dots1_ext.quant.dequantize_int4: (u - z) * s
    exact, rounded once)."""
    weight = quant.dequantize_int4(quant.Int4Weight(qweight, scales, zeros), x.dtype)
    return grouped_gemm(x, weight, expert_offsets, epilogue)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Dots1RMSNorm over the last dim: normalise in fp32, cast to x's dtype, then times the weight."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.float() * weight.float()).to(x.dtype)


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual += x (rounded to residual's dtype); x = rms_norm(residual)."""
    residual.copy_((residual.float() + x.float()).to(residual.dtype))
    x.copy_(rms_norm(residual, weight, eps))


def _cos_sin_rows(positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos_sin_cache rows at positions [T, D] fp32, valid [T] bool); bad positions read row 0 (masked later)."""
    P, D = cos_sin_cache.shape
    pos = positions.long()
    valid = (pos >= 0) & (pos < P)
    if P == 0:
        return cos_sin_cache.new_zeros(pos.shape[0], D, dtype=torch.float32), valid
    return cos_sin_cache[pos.clamp(0, P - 1)].float(), valid


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Neox-style rotate_half RoPE of x [T, heads, D] in fp32; cos_sin_cache [P, D] holds cos in its
    first D/2 columns and sin in its last D/2. Tokens at positions outside [0, P) come out NaN."""
    half = x.shape[-1] // 2
    cs, valid = _cos_sin_rows(positions, cos_sin_cache)  # [T, D]
    cos = cs[:, None, :half]
    sin = cs[:, None, half:]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.masked_fill(~valid[:, None, None], float("nan"))


def qk_norm_rope_(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hk, D]
    q_weight: torch.Tensor,  # [D]
    k_weight: torch.Tensor,  # [D]
    positions: torch.Tensor,  # [T] int64
    cos_sin_cache: torch.Tensor,  # [P, D] fp32
    eps: float,
) -> None:
    """In place: per-head RMSNorm of q and k, then RoPE at each token's position. A token whose
    position is outside [0, P) gets NaN q and k rows (poison policy)."""
    q.copy_(apply_rope(rms_norm(q, q_weight, eps), positions, cos_sin_cache).to(q.dtype))
    k.copy_(apply_rope(rms_norm(k, k_weight, eps), positions, cos_sin_cache).to(k.dtype))


def qk_norm_rope_kv_cache_(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hk, D]
    v: torch.Tensor,  # [T, Hk, D]
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    positions: torch.Tensor,  # [T] int64
    cos_sin_cache: torch.Tensor,
    eps: float,
    k_cache: torch.Tensor,  # [..., Hk, D], rows addressed by cache_rows
    v_cache: torch.Tensor,  # same shape as k_cache
    cache_rows: torch.Tensor,  # [T] int64 row of each token in k_cache.view(-1, Hk, D)
) -> None:
    """qk_norm_rope_, then k and v written to the KV cache at ``cache_rows``.

    Poison policy: a token whose cache row is outside [0, rows of the cache) writes nothing to the
    cache and gets NaN q rows (so its attention output is NaN); a token with a bad position has NaN
    q and k (that NaN k is what its cache row receives)."""
    qk_norm_rope_(q, k, q_weight, k_weight, positions, cos_sin_cache, eps)
    Hk, D = k.shape[1], k.shape[2]
    k_rows, v_rows = k_cache.view(-1, Hk, D), v_cache.view(-1, Hk, D)
    rows = cache_rows.long()
    ok = (rows >= 0) & (rows < k_rows.shape[0])
    q.masked_fill_(~ok[:, None, None], float("nan"))
    k_rows[rows[ok]] = k[ok].to(k_cache.dtype)  # reference only: boolean indexing (a host sync) is fine
    v_rows[rows[ok]] = v[ok].to(v_cache.dtype)


# ---- skinny GEMM (decode linears) ----


def skinny_gemm(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    epilogue: str,  # "none" | "swiglu" | "swiglu_interleaved"
) -> torch.Tensor:  # [M, N] or, for the SwiGLU epilogues, [M, N/2]
    """``x @ weight.T`` in fp32, rounded once to x's dtype. "swiglu": silu(gate) * up in fp32 on the
    unrounded product, gate = weight rows [0, N/2), up = rows [N/2, N) (HF layout, N even);
    "swiglu_interleaved": the same with the rows in 16-row [8 gate | 8 up] blocks (the layout of
    :func:`interleave_gate_up`, N % 16 == 0). The same rounding as :func:`grouped_gemm`'s epilogues."""
    M, N = x.shape[0], weight.shape[0]
    y = x.float() @ weight.float().t()
    if epilogue == "swiglu":
        y = F.silu(y[:, : N // 2]) * y[:, N // 2 :]
    elif epilogue == "swiglu_interleaved":
        blocks = y.view(M, N // 16, 2, 8)  # [8 gate | 8 up] per 16 columns
        y = F.silu(blocks[:, :, 0].reshape(M, N // 2)) * blocks[:, :, 1].reshape(M, N // 2)
    return y.to(x.dtype)


# ---- MoE decode: routed + shared experts straight from topk_ids (no permute / unpermute) ----


def _swiglu_rows(y: torch.Tensor, inter: int, interleaved: bool) -> torch.Tensor:
    """silu(gate) * up of fp32 products y [n, 2*inter] whose columns are in the HF order (gate then up)
    or in interleave_gate_up's 16-column [8 gate | 8 up] blocks."""
    if interleaved:
        blocks = y.view(y.shape[0], inter // 8, 2, 8)
        gate, up = blocks[:, :, 0].reshape(y.shape[0], inter), blocks[:, :, 1].reshape(y.shape[0], inter)
    else:
        gate, up = y[:, :inter], y[:, inter:]
    return F.silu(gate) * up


def moe_decode_gate_up(
    hidden: torch.Tensor,  # [T, H]
    gate_up: torch.Tensor,  # [E, 2I, H]
    topk_ids: torch.Tensor,  # [T, k] int32
    shared_gate_up: torch.Tensor | None,  # [2Is, H]: gate rows then up rows, or None (Is = 0)
    epilogue: str,  # "swiglu" (HF rows) | "swiglu_interleaved" (interleave_gate_up's rows)
    hidden_settled: bool = False,  # the CUDA kernel's PDL wait placement (ops.moe_decode_gate_up): no effect here
) -> torch.Tensor:  # act [T, k*I + Is]
    """act[t, j*I:(j+1)*I] = silu(gate) * up of expert topk_ids[t, j] on hidden[t]; act[t, k*I:] the same
    for the shared experts' weight. Exactly grouped_gemm's SwiGLU epilogue: fp32 products, silu(gate) * up
    in fp32, rounded once to hidden's dtype.

    A pair whose id is outside [0, E) gets NaN in its I columns (poison policy)."""
    T, H = hidden.shape
    E, N, _ = gate_up.shape
    inter, k = N // 2, topk_ids.shape[1]
    interleaved = epilogue == "swiglu_interleaved"
    x = hidden.float()
    routed = torch.full((T, k, inter), float("nan"), dtype=torch.float32, device=hidden.device)
    for t in range(T):
        for j in range(k):
            e = int(topk_ids[t, j])  # reference only: a host read is fine here
            if 0 <= e < E:
                y = x[t : t + 1] @ gate_up[e].float().t()
                routed[t, j] = _swiglu_rows(y, inter, interleaved)[0]
    parts = [routed.view(T, k * inter)]
    if shared_gate_up is not None:
        parts.append(_swiglu_rows(x @ shared_gate_up.float().t(), shared_gate_up.shape[0] // 2, False))
    return torch.cat(parts, dim=1).to(hidden.dtype)


def moe_decode_down(
    act: torch.Tensor,  # [T, k*I + Is]
    down: torch.Tensor,  # [E, H, I]
    topk_ids: torch.Tensor,  # [T, k] int32
    topk_weights: torch.Tensor,  # [T, k] fp32
    shared_down: torch.Tensor | None,  # [H, Is] or None (Is = 0)
    residual: torch.Tensor | None,  # [T, H] or None
    shared_act: torch.Tensor | None = None,  # [T, Is]: the shared experts' columns apart (act [T, k*I])
) -> torch.Tensor:  # [T, H], act's dtype
    """out[t] = sum_j w[t, j] * (down[ids[t, j]] @ act[t, j*I:(j+1)*I]) + shared_down @ act[t, k*I:]
    + residual[t]: every term an fp32 dot product (not rounded), added in fp32 in exactly that order
    (j = 0 .. k-1, then the shared experts, then the residual), rounded once to act's dtype. With
    ``shared_act``, its row t stands for act[t, k*I:].

    A token with any id outside [0, E) gets a NaN output row (poison policy)."""
    T = act.shape[0]
    E, H, inter = down.shape
    k = topk_ids.shape[1]
    a = act.float()
    out = torch.empty(T, H, dtype=act.dtype, device=act.device)
    for t in range(T):
        acc = torch.zeros(H, dtype=torch.float32, device=act.device)
        bad = False
        for j in range(k):
            e = int(topk_ids[t, j])  # reference only: a host read is fine here
            if not 0 <= e < E:
                bad = True
                continue
            acc = acc + topk_weights[t, j].float() * (down[e].float() @ a[t, j * inter : (j + 1) * inter])
        if shared_down is not None:
            acc = acc + shared_down.float() @ (a[t, k * inter :] if shared_act is None else shared_act[t].float())
        if residual is not None:
            acc = acc + residual[t].float()
        out[t] = (torch.full_like(acc, float("nan")) if bad else acc).to(act.dtype)
    return out


def moe_decode_int4_gate_up(
    hidden: torch.Tensor,  # [T, H]
    gate_up_qweight: torch.Tensor,  # [E, 2I, H/2] uint8
    gate_up_scales: torch.Tensor,  # [E, 2I, H/128] bf16
    gate_up_zeros: torch.Tensor | None,  # [E, 2I, H/128] uint8, or None (symmetric)
    topk_ids: torch.Tensor,  # [T, k] int32
    shared_gate_up: torch.Tensor | None,
    epilogue: str,
    hidden_settled: bool = False,
) -> torch.Tensor:
    """moe_decode_gate_up on the int4 weight dequantized to hidden's dtype (dots1_ext.quant.dequantize_int4:
    (u - z) * s exact, rounded once)."""
    gate_up = quant.dequantize_int4(quant.Int4Weight(gate_up_qweight, gate_up_scales, gate_up_zeros), hidden.dtype)
    return moe_decode_gate_up(hidden, gate_up, topk_ids, shared_gate_up, epilogue)


def moe_decode_int4_down(
    act: torch.Tensor,  # [T, k*I + Is]
    down_qweight: torch.Tensor,  # [E, H, I/2] uint8
    down_scales: torch.Tensor,  # [E, H, I/128] bf16
    down_zeros: torch.Tensor | None,  # [E, H, I/128] uint8, or None (symmetric)
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    shared_down: torch.Tensor | None,
    residual: torch.Tensor | None,
    shared_act: torch.Tensor | None = None,
) -> torch.Tensor:
    """moe_decode_down on the int4 weight dequantized to act's dtype."""
    down = quant.dequantize_int4(quant.Int4Weight(down_qweight, down_scales, down_zeros), act.dtype)
    return moe_decode_down(act, down, topk_ids, topk_weights, shared_down, residual, shared_act)


# ---------------------------------------------------------------------------------------------------
# Decode attention (csrc/attention)


def decode_step_inputs(
    tokens: torch.Tensor,  # [B] int64
    slot: torch.Tensor,  # [1] int64
    cache_start: torch.Tensor,  # [B] int64
    embed_weight: torch.Tensor,  # [V, H]
    cache_len: int,
    cache_filled: torch.Tensor,  # [1] int64, updated in place
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step's embedding and integer inputs -> (x [B, H], positions, cache_rows, kv_end [B]
    int64). x[b] = embed_weight[tokens[b]], NaN for an id outside [0, V); positions[b] =
    max(slot - cache_start[b], 0); cache_rows[b] = b * cache_len + slot and kv_end[b] = slot + 1, both
    -1 where the slot is unusable for sequence b: outside [0, cache_len), past cache_filled (the slots
    written so far) or before cache_start[b] (its padding). A slot in the cache and not past
    cache_filled sets it to slot + 1 (B > 0). Tensor ops only (no host synchronisation)."""
    B, V = tokens.shape[0], embed_weight.shape[0]
    valid = (tokens >= 0) & (tokens < V)
    x = F.embedding(tokens.clamp(0, V - 1), embed_weight).masked_fill(~valid[:, None], float("nan"))
    positions = (slot - cache_start).clamp_min(0)
    writable = (slot >= 0) & (slot < cache_len) & (slot <= cache_filled)  # [1]
    usable = writable & (slot >= cache_start)  # [B]
    cache_rows = torch.where(usable, torch.arange(B, device=tokens.device) * cache_len + slot, -1)
    kv_end = torch.where(usable, slot + 1, -1)
    if B:
        cache_filled.copy_(torch.where(writable, slot + 1, cache_filled))
    return x.contiguous(), positions, cache_rows, kv_end


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [B, S, Hk, D]
    v_cache: torch.Tensor,  # [B, S, Hk, D]
    kv_start: torch.Tensor,  # [B] int64
    kv_end: torch.Tensor,  # [B] int64
    window: int,
    scale: float,
    kv_settled: bool = False,  # the CUDA kernel's PDL wait placement (ops.decode_attention): no effect here
) -> torch.Tensor:
    """One query per sequence over a static KV cache, in fp32, rounded once to q's dtype -> [B, Hq, D].

    Sequence b attends to slots [lo, kv_end[b]) with lo = kv_start[b], or max(kv_start[b],
    kv_end[b] - window) when window > 0 (HF sliding window: the query at slot p = kv_end[b] - 1 sees
    keys in (p - window, p]). Query head h reads kv head h // (Hq // Hk). Scores q.k * scale.
    An empty range gives exactly 0; bad bounds (kv_start < 0, kv_end > S, kv_start > kv_end) give NaN
    in every element of that sequence's output (poison policy)."""
    B, Hq, D = q.shape
    S, Hk = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(B, Hq, D, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out.to(q.dtype)
    G = Hq // Hk
    for b, (start, end) in enumerate(zip(kv_start.tolist(), kv_end.tolist())):  # reference: host reads are fine
        if start < 0 or end > S or start > end:
            out[b] = float("nan")
            continue
        lo = max(start, end - window) if window > 0 else start
        if lo == end:
            continue
        k = k_cache[b, lo:end].float().permute(1, 2, 0)  # [Hk, D, L]
        v = v_cache[b, lo:end].float().permute(1, 0, 2)  # [Hk, L, D]
        qb = q[b].float().reshape(Hk, G, D)
        probs = torch.softmax((qb @ k) * scale, dim=-1)  # [Hk, G, L]
        out[b] = (probs @ v).reshape(Hq, D)
    return out.to(q.dtype)


def qk_norm_rope_decode_attention(
    q: torch.Tensor,  # [B, Hq, D] raw (not written)
    k: torch.Tensor,  # [B, Hk, D] raw (not written)
    v: torch.Tensor,  # [B, Hk, D]
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    positions: torch.Tensor,  # [B] int64
    cos_sin_cache: torch.Tensor,
    eps: float,
    k_cache: torch.Tensor,  # [B, S, Hk, D]
    v_cache: torch.Tensor,
    cache_rows: torch.Tensor,  # [B] int64
    kv_start: torch.Tensor,  # [B] int64
    kv_end: torch.Tensor,  # [B] int64
    window: int,
    scale: float,
    kv_settled: bool = False,
) -> torch.Tensor:
    """qk_norm_rope_kv_cache_ on copies of q and k, then decode_attention -> [B, Hq, D].

    Contract of the fused kernel: sequence b's new key goes to its own slot kv_end[b] - 1, i.e.
    cache_rows[b] == b * S + kv_end[b] - 1; any other row (inside the cache or not) is a bad cache row
    (poison policy of qk_norm_rope_kv_cache_: nothing written, NaN q)."""
    B, S = q.shape[0], k_cache.shape[1]
    own_slot = torch.arange(B, device=kv_end.device) * S + kv_end - 1
    rows_ok = (kv_end >= 1) & (kv_end <= S) & (cache_rows == own_slot)
    rows = torch.where(rows_ok, cache_rows, torch.full_like(cache_rows, -1))
    q, k = q.clone(), k.clone()
    qk_norm_rope_kv_cache_(q, k, v, q_weight, k_weight, positions, cos_sin_cache, eps, k_cache, v_cache, rows)
    return decode_attention(q, k_cache, v_cache, kv_start, kv_end, window, scale)

