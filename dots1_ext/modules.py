"""Dots1 building blocks: modules that own their weights and call the dots1_ext ops.

Parameter names and shapes are exactly those of transformers 5's Dots1 ``state_dict``, so an HF state
dict loads with ``load_state_dict``. Activations are flat token-major tensors; the KV cache is static.

Shape letters: B batch, L new tokens per sequence, T = B*L tokens, S cached slots per sequence,
H hidden, Hq/Hk query/key heads, D head_dim, E experts, k experts per token, I expert intermediate.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from dots1_ext import ops as compiled_ops
from dots1_ext import quant, reference
from dots1_ext.config import Dots1Config

# Every op call goes through this name, so `use_reference_ops()` can swap the whole model onto the
# eager reference (the CLI's parity check) without a second model implementation.
ops = compiled_ops

# Up to this many tokens the router projection runs inside the fused router_topk_gating op (one launch
# for decode); above it a GEMM (F.linear in fp32) followed by topk_gating is faster.
from dots1_ext.ops.gating import ROUTER_FUSED_MAX_TOKENS  # noqa: E402  (one definition: ops/gating.py)

# Up to this many rows a linear streams its weight once through skinny_gemm (decode: the weight read is
# the whole cost); above it a tensor-core GEMM wins. Between SKINNY_ALWAYS_ROWS and SKINNY_MAX_ROWS,
# cuBLAS streams large plain weights slightly faster (H200, bench/results 2026-11-29: qkv and lm_head
# at M=8, 0.94x), so skinny_gemm keeps the fused-SwiGLU and the small (< SKINNY_LARGE_WEIGHT elements)
# weights there. The MoE layer likewise runs its decode ops (the routed and shared experts in two
# launches, each touched expert read once) up to MOE_DECODE_MAX_TOKENS, with int4 experts up to
# INT4_MOE_DECODE_MAX_TOKENS. The ops take up to 64 tokens per launch; against permute + grouped GEMM
# + unpermute at real shape (H200, bench/results/2026-11-30-h200-06dd60c-moe-decode-defaults) they are
# 3.6% faster at 32 tokens and 0.7% slower at 64. The int4 pair reads a quarter of the bytes and wins
# up to its 64-token limit: the 8-layer int4 decode step at context 2048 took 6.91 vs 8.50 ms at B=32,
# 10.12 vs 11.47 at B=64 against the W4A16 grouped GEMM path (H200,
# bench/results/2026-11-30-h200-02c8b5b-int4-tiles-decode).
SKINNY_MAX_ROWS = 16
SKINNY_ALWAYS_ROWS = 4
SKINNY_LARGE_WEIGHT = 32 * 2**20
MOE_DECODE_MAX_TOKENS = 32
INT4_MOE_DECODE_MAX_TOKENS = 64


def _reference_namespace() -> types.SimpleNamespace:
    """dots1_ext.reference behind the signatures (and defaults) of the dots1_ext.ops wrappers."""

    def add_rms_norm_(x, residual, weight, eps):
        reference.add_rms_norm_(x, residual, weight, eps)
        return x

    return types.SimpleNamespace(
        rms_norm=reference.rms_norm,
        add_rms_norm_=add_rms_norm_,
        qk_norm_rope_kv_cache_=reference.qk_norm_rope_kv_cache_,
        router_topk_gating=lambda h, w, b, k, n_group=1, topk_group=1, renormalize=True, scale=1.0:
            reference.router_topk_gating(h, w, b, k, n_group, topk_group, renormalize, scale),
        topk_gating=lambda logits, b, k, n_group=1, topk_group=1, renormalize=True, scale=1.0:
            reference.topk_gating(logits, b, k, n_group, topk_group, renormalize, scale),
        permute=lambda h, ids, E, pad_to=1: reference.permute(h, ids, E, pad_to),
        grouped_gemm=lambda x, w, offsets, epilogue="none": reference.grouped_gemm(x, w, offsets, epilogue),
        unpermute=lambda out, row_map, w, shared_out=None, residual=None:
            reference.unpermute(out, row_map, w, shared_out, residual),
        skinny_gemm=lambda x, w, epilogue="none": reference.skinny_gemm(x, w, epilogue),
        decode_attention=lambda q, kc, vc, start, end, window, scale, kv_settled=False:
            reference.decode_attention(q, kc, vc, start, end, window, scale),
        qk_norm_rope_decode_attention=reference.qk_norm_rope_decode_attention,
        decode_step_inputs=reference.decode_step_inputs,
        moe_decode_gate_up=lambda h, w, ids, shared=None, epilogue="swiglu", check_ids=False, hidden_settled=False:
            reference.moe_decode_gate_up(h, w, ids, shared, epilogue),
        moe_decode_down=lambda act, w, ids, weights, shared=None, residual=None, check_ids=False, shared_act=None:
            reference.moe_decode_down(act, w, ids, weights, shared, residual, shared_act),
        moe_decode_int4_gate_up=lambda h, q, s, z, ids, shared=None, epilogue="swiglu", check_ids=False,
            hidden_settled=False: reference.moe_decode_int4_gate_up(h, q, s, z, ids, shared, epilogue),
        moe_decode_int4_down=lambda act, q, s, z, ids, weights, shared=None, residual=None, check_ids=False,
            shared_act=None: reference.moe_decode_int4_down(act, q, s, z, ids, weights, shared, residual, shared_act),
    )


REFERENCE_OPS = _reference_namespace()


@contextlib.contextmanager
def use_ops(namespace):
    """Within the block, every module calls the ops of ``namespace`` (an object with the attributes of
    ``dots1_ext.ops`` the modules use), e.g. the reference ops or a wrapper of the current ones."""
    global ops
    saved, ops = ops, namespace
    try:
        yield
    finally:
        ops = saved


def use_reference_ops():
    """Within the block, every module runs dots1_ext.reference instead of the compiled ops."""
    return use_ops(REFERENCE_OPS)


class _KeepsFp32Buffers:
    """Keeps the named buffers fp32 through ``.to(dtype)`` / ``.half()`` (HF: _keep_in_fp32_modules)."""

    _fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        saved = {name: getattr(self, name) for name in self._fp32_buffers}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = getattr(self, name)
            if old is None or new.dtype == torch.float32:
                continue
            # Re-derive from the fp32 original so a round trip through bf16 loses nothing.
            fixed = torch.empty_like(old, device=new.device) if old.is_meta else old.to(new.device)
            setattr(self, name, fixed)
        return self


@dataclass
class StepInputs:
    """What every layer needs for one forward step, built once per step by Dots1Model."""

    batch_size: int  # B
    seq_len: int  # L
    kv_len: int  # S' <= S: cache slots attended to
    positions: torch.Tensor  # [T] int64 RoPE position of each token
    cache_rows: torch.Tensor  # [T] int64 row of each token in k_cache.view(-1, Hk, D)
    masks: dict  # {window or None: [B, L, S'] bool, True = attend}; None missing when seq_starts is set
    cos_sin_cache: torch.Tensor  # [P, D] fp32
    seq_starts: list[int] | None = None  # prefill: each sequence's first real slot (host); queries are
    # slots [S' - L, S'), and full-attention layers run causal SDPA per sequence instead of a mask
    kv_start: torch.Tensor | None = None  # decode (L == 1): [B] int64 first real slot of each sequence
    kv_end: torch.Tensor | None = None  # decode: [B] int64 one past the query's slot (device tensors:
    # decode_attention reads exactly [kv_start, kv_end), so one CUDA graph serves every length)

    @property
    def is_decode(self) -> bool:
        return self.kv_end is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           epilogue: str = "none") -> torch.Tensor:
    """x [T, K] @ weight [N, K].T (+ bias), then the epilogue ("swiglu": weight rows are gate then up
    halves, output [T, N/2]). A few rows stream the weight once (skinny_gemm, the decode case); more
    rows run a GEMM."""
    if x.dim() != 2:  # drop-in use: any leading dims, like nn.Linear
        return linear(x.reshape(-1, x.shape[-1]), weight, bias, epilogue).view(*x.shape[:-1], -1)
    rows = x.shape[0]
    if bias is None and (rows <= SKINNY_ALWAYS_ROWS or (rows <= SKINNY_MAX_ROWS and (
            epilogue != "none" or weight.numel() < SKINNY_LARGE_WEIGHT))):
        return ops.skinny_gemm(x, weight, epilogue)
    y = F.linear(x, weight, bias)
    if epilogue == "none":
        return y
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


class _PacksLinears:
    """Mixin for modules whose nn.Linear children are multiplied by the same input: their weights (and
    biases) are kept as row slices of one packed tensor, so one launch reads them all.

    ``_packs`` maps a buffer name to the children packed into it, in row order. ``pack_linears_()``
    makes the packed buffers (non-persistent: ``state_dict`` keeps the children's HF names and shapes)
    and points each child's parameter at its slice (same Parameter objects: shared references stay
    valid; ``load_state_dict`` writes through into the packed tensor). ``.to()`` and friends convert
    the children one by one, so the packing is redone after every conversion."""

    _packs: dict[str, tuple[str, ...]] = {}

    def _init_packs(self) -> None:
        for name in self._packs:
            self.register_buffer(name, None, persistent=False)
            self.register_buffer(name + "_bias", None, persistent=False)

    @property
    def is_packed(self) -> bool:
        return all(getattr(self, name) is not None for name in self._packs)

    @torch.no_grad()
    def pack_linears_(self) -> None:
        for name, children in self._packs.items():
            linears = [getattr(self, c) for c in children]
            for attr in ("weight", "bias"):
                params = [getattr(m, attr) for m in linears]
                if any(p is None for p in params):
                    setattr(self, name if attr == "weight" else name + "_bias", None)
                    continue
                packed = torch.cat([p.detach() for p in params])
                row = 0
                for p in params:
                    p.data = packed[row: row + p.shape[0]]
                    row += p.shape[0]
                setattr(self, name if attr == "weight" else name + "_bias", packed)

    def _apply(self, fn, recurse=True):
        packed = self.is_packed
        for name in self._packs:  # not converted on their own: rebuilt from the children below
            setattr(self, name, None)
            setattr(self, name + "_bias", None)
        super()._apply(fn, recurse)
        if packed:
            self.pack_linears_()
        return self


def pack_linears_(root: nn.Module) -> nn.Module:
    """Packs the projections of every module under ``root`` that has some (q/k/v, gate/up; see
    :class:`_PacksLinears`). The loader and ``build_random_model`` call this once. Returns ``root``."""
    for m in root.modules():
        if isinstance(m, _PacksLinears):
            m.pack_linears_()
    return root


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """RMSNorm(x); with ``residual``, in place: residual += x, then x = RMSNorm(residual)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm_(x, residual, self.weight, self.eps)


class Dots1MLP(_PacksLinears, nn.Module):
    """SwiGLU MLP: the dense layers' MLP and the shared experts. Packed (``pack_linears_``), gate and
    up are one [2I, H] weight, ``gate_up`` (gate rows first), multiplied with the SwiGLU fused."""

    _packs = {"gate_up": ("gate_proj", "up_proj")}

    def __init__(self, hidden_size: int, intermediate_size: int, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)
        self._init_packs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        if self.gate_up is not None:
            act = linear(x, self.gate_up, epilogue="swiglu")
        else:
            act = F.silu(linear(x, self.gate_proj.weight)) * linear(x, self.up_proj.weight)
        return linear(act, self.down_proj.weight)


# Decode steps pass kv_settled=True to the attention ops: the bounds (decode_step_inputs, at the step's
# start) and every cache row but the new one (earlier steps) predate the launch right before the
# attention kernel, so it starts copying K/V while that launch drains (PDL, ops.decode_attention).
# False: the plain launch (same bits; for comparisons: bench/probes/pdl_overlap.py).
ATTENTION_KV_SETTLED = True


class Dots1Attention(_PacksLinears, nn.Module):
    """QK-norm attention with RoPE over a static KV cache [B, S, Hk, D] (allocated by Dots1Model.setup_cache).

    Packed (``pack_linears_``), q, k and v are one [(Hq + 2Hk) D, H] weight ``qkv``. Decode steps (one
    token per sequence) run ``decode_attention`` over exactly each sequence's cached slots; prefill runs
    causal SDPA per sequence (no mask tensor) or, for sliding-window layers, SDPA with a mask."""

    _packs = {"qkv": ("q_proj", "k_proj", "v_proj")}

    def __init__(self, config: Dots1Config, layer_idx: int, device=None, dtype=None):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.sliding_window = c.window(layer_idx)
        self.eps = c.rms_norm_eps
        self.scaling = self.head_dim**-0.5
        kw = dict(bias=c.attention_bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(c.hidden_size, self.num_heads * self.head_dim, **kw)
        self.k_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, **kw)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, c.hidden_size, **kw)
        self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps, device=device, dtype=dtype)
        self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps, device=device, dtype=dtype)
        self.register_buffer("k_cache", None, persistent=False)  # [B, S, Hk, D]
        self.register_buffer("v_cache", None, persistent=False)
        self._init_packs()

    def allocate_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch_size, max_seq_len, self.num_kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, step: StepInputs) -> torch.Tensor:  # [T, H] -> [T, H]
        T, B, L, S = x.shape[0], step.batch_size, step.seq_len, step.kv_len
        Hq, Hk, D = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv is not None:
            qkv = linear(x, self.qkv, self.qkv_bias).view(T, Hq + 2 * Hk, D)
            q, k, v = qkv.split([Hq, Hk, Hk], dim=1)  # views: the ops below take head strides
        else:
            q = linear(x, self.q_proj.weight, self.q_proj.bias).view(T, Hq, D)
            k = linear(x, self.k_proj.weight, self.k_proj.bias).view(T, Hk, D)
            v = linear(x, self.v_proj.weight, self.v_proj.bias).view(T, Hk, D)
        if step.is_decode and compiled_ops.fused_qk_enabled():  # a setting, whichever op namespace runs
            # One launch: q, k normed and rotated inside the attention kernel, which also writes k, v at
            # this step's slots (cache_rows = slot kv_end - 1 of each sequence, as StepInputs has it).
            out = ops.qk_norm_rope_decode_attention(
                q, k, v, self.q_norm.weight, self.k_norm.weight, step.positions, step.cos_sin_cache, self.eps,
                self.k_cache, self.v_cache, step.cache_rows, step.kv_start, step.kv_end, self.sliding_window or 0,
                self.scaling, kv_settled=ATTENTION_KV_SETTLED)
            return linear(out.view(T, Hq * D), self.o_proj.weight, self.o_proj.bias)
        # In place: q, k normed and rotated; k, v written to the cache at this step's slots.
        ops.qk_norm_rope_kv_cache_(q, k, v, self.q_norm.weight, self.k_norm.weight, step.positions,
                                   step.cos_sin_cache, self.eps, self.k_cache, self.v_cache, step.cache_rows)
        if step.is_decode:  # L == 1: q [B, Hq, D] over exactly [kv_start, kv_end) of each sequence
            # kv_settled: the bounds came from the step's start, the rows but the new one from earlier
            # steps, and the launch right before (qk_norm_rope_kv_cache_) wrote only q and the new row.
            out = ops.decode_attention(q, self.k_cache, self.v_cache, step.kv_start, step.kv_end,
                                       self.sliding_window or 0, self.scaling, kv_settled=ATTENTION_KV_SETTLED)
            return linear(out.view(T, Hq * D), self.o_proj.weight, self.o_proj.bias)
        q = q.view(B, L, Hq, D).transpose(1, 2)  # [B, Hq, L, D]
        keys = self.k_cache[:, :S].transpose(1, 2)  # [B, Hk, S', D]
        values = self.v_cache[:, :S].transpose(1, 2)
        if step.seq_starts is not None:  # no mask tensor over the prompt: flash / cuDNN kernels eligible
            out = prefill_attention(q, keys, values, step.seq_starts, self.scaling, self.sliding_window)
        else:  # a continuation whose sequence starts the host does not know: masks built on the device
            mask = step.masks[self.sliding_window]
            if Hk != Hq:  # GQA: query head h reads kv head h // (Hq / Hk)
                keys = keys.repeat_interleave(Hq // Hk, dim=1)
                values = values.repeat_interleave(Hq // Hk, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None], scale=self.scaling)
        return linear(out.transpose(1, 2).reshape(T, Hq * D), self.o_proj.weight, self.o_proj.bias)


# Prefill SDPA backends, fastest first where they apply: on Hopper cuDNN's fused attention runs causal
# prefill at ~590 TFLOP/s against flash's ~350 (bench/results, long_prompt); SDPA skips a backend that
# cannot take the inputs, so the others stay as fallbacks.
_PREFILL_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.MATH]


def _prefill_sdpa(*args, **kwargs) -> torch.Tensor:
    if args[0].is_cuda and not torch.compiler.is_compiling():
        with sdpa_kernel(_PREFILL_BACKENDS, set_priority=True):
            return F.scaled_dot_product_attention(*args, **kwargs)
    return F.scaled_dot_product_attention(*args, **kwargs)


# Sliding-window prefill attends query blocks of this many tokens (at least the window) to their band
# of keys, so the mask is [block, block + window] per block rather than [L, S] for the prompt.
WINDOW_QUERY_BLOCK = 1024


def _banded_attention(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, window: int, scale: float,
                      gqa: dict) -> torch.Tensor:
    """Queries qs [b, Hq, Lq, D], the last Lq of the keys ks/vs [b, Hk, Sk, D]: query i (key index
    Sk - Lq + i) sees keys in (i' - window, i'] with i' its key index, block by block."""
    Lq, Sk = qs.shape[2], ks.shape[2]
    block = max(WINDOW_QUERY_BLOCK, window)
    out = torch.empty_like(qs)
    for a in range(0, Lq, block):
        b = min(Lq, a + block)
        q_first, q_last = Sk - Lq + a, Sk - Lq + b - 1  # key indices of the block's queries
        k0 = max(0, q_first - window + 1)
        q_idx = torch.arange(q_first, q_last + 1, device=qs.device)[:, None]
        k_idx = torch.arange(k0, q_last + 1, device=qs.device)[None, :]
        band = (k_idx <= q_idx) & (k_idx > q_idx - window)  # [b - a, q_last + 1 - k0]
        kb, vb = ks[:, :, k0:q_last + 1], vs[:, :, k0:q_last + 1]
        if gqa:  # SDPA's masked kernels take no GQA: repeat the block's keys only
            group = qs.shape[1] // ks.shape[1]
            kb, vb = kb.repeat_interleave(group, dim=1), vb.repeat_interleave(group, dim=1)
        out[:, :, a:b] = _prefill_sdpa(qs[:, :, a:b], kb, vb, attn_mask=band, scale=scale)
    return out


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, seq_starts: list[int],
                      scale: float, window: int | None = None) -> torch.Tensor:
    """Causal attention of queries at slots [S - L, S) over keys at slots [0, S), for left-padded
    sequences whose real tokens start at ``seq_starts[b]`` (host ints), without a mask tensor over the
    prompt. ``window``: a sliding-window layer (a query at slot p sees keys in (p - window, p]), run in
    query blocks against their band of keys (a block-sized mask, not a [L, S] one).

    q [B, Hq, L, D], keys/values [B, Hk, S, D] (GQA: query head h reads kv head h // (Hq / Hk), without a
    repeated copy) -> [B, Hq, L, D]. A real query sees the real keys up to its own slot; a padding
    query sees only itself (the masks' rule, so no softmax row is empty). Sequences sharing a start run
    as one SDPA call: ``is_causal`` when queries and keys are the same slots, a lower-right causal bias
    when the queries are the last L of more keys (a later chunk)."""
    B, Hq, L, _ = q.shape
    Hk, S = keys.shape[1], keys.shape[2]
    first = S - L
    gqa = dict(enable_gqa=True) if Hk != Hq else {}

    def causal(qs, ks, vs):
        if window is not None:
            return _banded_attention(qs, ks, vs, window, scale, gqa)
        if qs.shape[2] == ks.shape[2]:
            return _prefill_sdpa(qs, ks, vs, is_causal=True, scale=scale, **gqa)
        if gqa:  # the lower-right bias has no GQA path
            ks, vs = ks.repeat_interleave(Hq // Hk, dim=1), vs.repeat_interleave(Hq // Hk, dim=1)
        bias = causal_lower_right(qs.shape[2], ks.shape[2])
        return _prefill_sdpa(qs, ks, vs, attn_mask=bias, scale=scale)

    if len(set(seq_starts)) == 1 and seq_starts[0] <= first:  # one call for the whole batch
        s0 = seq_starts[0]
        return causal(q, keys[:, :, s0:], values[:, :, s0:])
    out = torch.empty_like(q)
    for b, s0 in enumerate(seq_starts):
        q0 = min(max(first, s0), S)  # this sequence's first real query slot in the chunk
        pad = q0 - first
        if pad:  # padding queries: their own value
            out[b, :, :pad] = values[b, :, first:q0].repeat_interleave(Hq // Hk, dim=0)
        if q0 < S:
            out[b:b + 1, :, pad:] = causal(q[b:b + 1, :, pad:], keys[b:b + 1, :, s0:], values[b:b + 1, :, s0:])
    return out


class Dots1Router(_KeepsFp32Buffers, nn.Module):
    """Sigmoid router with bias-corrected, group-limited top-k (``mlp.gate`` in the checkpoint)."""

    _fp32_buffers = ("e_score_correction_bias",)

    def __init__(self, config: Dots1Config, device=None, dtype=None):
        super().__init__()
        c = config
        self.top_k, self.n_group, self.topk_group = c.num_experts_per_tok, c.n_group, c.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size, device=device, dtype=dtype))
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(c.n_routed_experts, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [T, H] -> fp32 [T, k], int32 [T, k]
        args = (self.top_k, self.n_group, self.topk_group, self.norm_topk_prob, self.routed_scaling_factor)
        if x.shape[0] <= ROUTER_FUSED_MAX_TOKENS:
            return ops.router_topk_gating(x, self.weight, self.e_score_correction_bias, *args)
        logits = F.linear(x.float(), self.weight.float())  # [T, E] fp32, as HF computes it
        return ops.topk_gating(logits, self.e_score_correction_bias, *args)


class GateUpLayout:
    """Mixin for expert modules with a fused ``gate_up_proj`` [E, 2I, H] parameter: its storage layout.

    In the HF layout (gate rows, then up rows) the gate_up GEMM runs with the ``"swiglu"`` epilogue,
    which writes the [S, 2I] product and then SiLU * mul. ``interleave_gate_up_()`` repacks the
    parameter in place, once, into 16-row [8 gate | 8 up] blocks, for which the ``"swiglu_interleaved"``
    epilogue fuses SwiGLU into the GEMM (the product never reaches memory). The module's interface
    stays the HF one: ``state_dict`` returns gate_up_proj in the HF layout (a de-interleaved copy; for
    a large model use :func:`experts_in_hf_layout`, which converts in place instead), and
    ``load_state_dict`` takes the HF layout and interleaves what it loads.
    """

    gate_up_interleaved: bool = False

    def _init_gate_up_layout(self) -> None:
        self.register_state_dict_post_hook(_gate_up_state_dict_hook)
        self.register_load_state_dict_pre_hook(_gate_up_load_hook)

    @property
    def gate_up_epilogue(self) -> str:
        """The grouped_gemm epilogue for ``gate_up_proj`` as it is stored now."""
        return "swiglu_interleaved" if self.gate_up_interleaved else "swiglu"

    def can_interleave_gate_up(self) -> bool:
        return self.gate_up_proj.shape[1] % 16 == 0

    @torch.no_grad()
    def interleave_gate_up_(self) -> bool:
        """HF layout -> interleaved, in place, one expert at a time (no full-size temporary). Returns
        whether the weight is now interleaved (2I must be a multiple of 16; otherwise it stays HF)."""
        if not self.gate_up_interleaved and self.can_interleave_gate_up():
            _convert_per_expert_(self.gate_up_proj, reference.interleave_gate_up)
            self.gate_up_interleaved = True
        return self.gate_up_interleaved

    @torch.no_grad()
    def deinterleave_gate_up_(self) -> None:
        """Interleaved -> HF layout, in place; a no-op in the HF layout."""
        if self.gate_up_interleaved:
            _convert_per_expert_(self.gate_up_proj, reference.deinterleave_gate_up)
            self.gate_up_interleaved = False


def _convert_per_expert_(weight: torch.Tensor, convert) -> None:
    for e in range(weight.shape[0]):
        weight.data[e] = convert(weight.data[e : e + 1])[0]


def _gate_up_state_dict_hook(module, state_dict, prefix, local_metadata) -> None:
    key = prefix + "gate_up_proj"
    if module.gate_up_interleaved and key in state_dict:
        state_dict[key] = reference.deinterleave_gate_up(state_dict[key].detach())


def _gate_up_load_hook(module, state_dict, prefix, *args) -> None:
    key = prefix + "gate_up_proj"
    value = state_dict.get(key)
    # A wrong shape is left for load_state_dict to report.
    if module.gate_up_interleaved and isinstance(value, torch.Tensor) and value.shape == module.gate_up_proj.shape:
        state_dict[key] = reference.interleave_gate_up(value)


def gate_up_modules(root: nn.Module) -> list[GateUpLayout]:
    return [m for m in root.modules() if isinstance(m, GateUpLayout)]


def interleave_gate_up_(root: nn.Module) -> nn.Module:
    """Repacks every expert module's gate_up_proj under ``root`` for the fused SwiGLU epilogue (once,
    in place; see :class:`GateUpLayout`). The loader and the HF bridge call this. Returns ``root``."""
    for m in gate_up_modules(root):
        m.interleave_gate_up_()
    return root


@contextlib.contextmanager
def experts_in_hf_layout(root: nn.Module):
    """Within the block, every gate_up_proj under ``root`` holds the HF layout (converted in place, so
    no second copy of the experts exists); the interleaved ones are repacked on exit."""
    converted = [m for m in gate_up_modules(root) if m.gate_up_interleaved]
    for m in converted:
        m.deinterleave_gate_up_()
    try:
        yield root
    finally:
        for m in converted:
            m.interleave_gate_up_()


class Dots1Experts(GateUpLayout, nn.Module):
    """The routed experts' weights, fused as in transformers 5 (``mlp.experts``); see
    :class:`GateUpLayout` for the storage layout of ``gate_up_proj``."""

    def __init__(self, config: Dots1Config, device=None, dtype=None):
        super().__init__()
        E, H, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H, device=device, dtype=dtype))  # gate rows first
        self.down_proj = nn.Parameter(torch.empty(E, H, I, device=device, dtype=dtype))
        self._init_gate_up_layout()

    def extra_repr(self) -> str:
        return f"gate_up_proj {'interleaved' if self.gate_up_interleaved else 'HF'} layout"


class Int4Tensor(nn.Module):
    """One int4 weight [E, N, K] in the format of :mod:`dots1_ext.quant`, as persistent buffers
    ``qweight`` [E, N, K/2] uint8, ``scales`` [E, N, K/128] bf16 and (asymmetric) ``zeros`` [E, N, K/128]
    uint8, so ``state_dict`` names them ``<name>.qweight`` / ``.scales`` / ``.zeros``. ``scales`` stays
    bf16 through ``.to(dtype)`` (the format's dtype); a device move moves all three."""

    def __init__(self, E: int, N: int, K: int, symmetric: bool, device=None):
        super().__init__()
        if K % quant.GROUP_SIZE:
            raise ValueError(f"int4 weight [{E}, {N}, {K}]: K must be a multiple of {quant.GROUP_SIZE}")
        G = K // quant.GROUP_SIZE
        self.register_buffer("qweight", torch.zeros(E, N, K // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(E, N, G, dtype=torch.bfloat16, device=device))
        self.register_buffer("zeros", None if symmetric else torch.full((E, N, G), 8, dtype=torch.uint8, device=device))

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def shape(self) -> torch.Size:
        """The logical shape [E, N, K]."""
        return torch.Size((*self.qweight.shape[:2], self.qweight.shape[2] * 2))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The int4 kernels trust zero points to be 4-bit (the loader checks its checkpoints expert by
        # expert); a state dict is checked here, once per load, since a larger one dequantizes plausibly.
        zeros = state_dict.get(prefix + "zeros")
        if zeros is not None and zeros.numel() and not zeros.is_meta and int(zeros.max()) > 15:
            error_msgs = args[-1] if args else kwargs["error_msgs"]
            error_msgs.append(f"{prefix}zeros: int4 zero points lie in [0, 15], got up to {int(zeros.max())}")
            return
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def buffers_by_name(self) -> dict[str, torch.Tensor]:
        return {n: t for n, t in (("qweight", self.qweight), ("scales", self.scales), ("zeros", self.zeros))
                if t is not None}

    def weight(self, experts=None) -> quant.Int4Weight:
        """The Int4Weight of all experts, or of ``experts`` (an index tensor or slice along E)."""
        pick = (lambda t: t) if experts is None else (lambda t: None if t is None else t[experts])
        return quant.Int4Weight(pick(self.qweight), pick(self.scales), pick(self.zeros))

    @torch.no_grad()
    def set_rows_(self, e: int, rows: slice, w: torch.Tensor) -> None:
        """Quantizes ``w`` [r, K] (rows ``rows`` of expert ``e``) on this module's device into place."""
        q = quant.quantize_int4(w.to(self.qweight.device), symmetric=self.symmetric)
        self.qweight[e, rows] = q.qweight
        self.scales[e, rows] = q.scales
        if q.zeros is not None:
            self.zeros[e, rows] = q.zeros

    def _apply(self, fn, recurse=True):
        old = self.scales
        super()._apply(fn, recurse)
        if old is not None and self.scales is not None and self.scales.dtype != old.dtype:
            self.scales = (torch.empty_like(old, device=self.scales.device) if old.is_meta
                           else old.to(self.scales.device))
        return self


class Dots1Int4Experts(GateUpLayout, nn.Module):
    """The routed experts in int4 (W4A16; format: :mod:`dots1_ext.quant`), a drop-in for
    :class:`Dots1Experts` in ``Dots1MoE.experts``: ``gate_up_proj`` and ``down_proj`` are
    :class:`Int4Tensor` children (keys ``gate_up_proj.qweight``, ``.scales``, ``.zeros``).

    ``gate_up_proj``'s rows are interleaved like the bf16 weight's (:class:`GateUpLayout`; groups run
    along K, so a row permutation commutes with quantization); ``state_dict`` speaks the HF row order.
    Decode (``Dots1MoE``, up to INT4_MOE_DECODE_MAX_TOKENS tokens) runs the int4 decode ops on these tensors
    (the kernels stream the packed bytes); prefill runs the W4A16 grouped GEMM (``ops.grouped_gemm_int4``,
    sm90, bf16: :data:`INT4_PREFILL_KERNEL`) or else dequantizes the touched experts into the model's dtype
    and runs the bf16 path's grouped GEMMs on them. All equal the bf16 math on the dequantized weights."""

    def __init__(self, config: Dots1Config, device=None, symmetric: bool = False):
        super().__init__()
        E, H, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        for name, v in (("hidden_size", H), ("moe_intermediate_size", I)):
            if v % quant.GROUP_SIZE:
                raise ValueError(f"int4 experts need {name} to be a multiple of {quant.GROUP_SIZE} (the "
                                 f"quantization group along the reduction dimension), got {v}")
        self.num_experts, self.hidden_size, self.intermediate_size = E, H, I
        self.gate_up_proj = Int4Tensor(E, 2 * I, H, symmetric, device)  # HF rows: gate first
        self.down_proj = Int4Tensor(E, H, I, symmetric, device)
        self.register_state_dict_post_hook(_int4_gate_up_state_dict_hook)
        self.register_load_state_dict_pre_hook(_int4_gate_up_load_hook)

    @property
    def symmetric(self) -> bool:
        return self.gate_up_proj.symmetric

    def can_interleave_gate_up(self) -> bool:
        return self.gate_up_proj.shape[1] % 16 == 0

    @torch.no_grad()
    def interleave_gate_up_(self) -> bool:
        if not self.gate_up_interleaved and self.can_interleave_gate_up():
            for t in self.gate_up_proj.buffers_by_name().values():
                _convert_per_expert_(t, reference.interleave_gate_up)
            self.gate_up_interleaved = True
        return self.gate_up_interleaved

    @torch.no_grad()
    def deinterleave_gate_up_(self) -> None:
        if self.gate_up_interleaved:
            for t in self.gate_up_proj.buffers_by_name().values():
                _convert_per_expert_(t, reference.deinterleave_gate_up)
            self.gate_up_interleaved = False

    @torch.no_grad()
    def quantize_expert_(self, e: int, gate_up: torch.Tensor | None = None, down: torch.Tensor | None = None) -> None:
        """Quantizes expert ``e``'s high-precision weights into place: ``gate_up`` [2I, H] in the HF row
        order (gate rows first; interleaved here when the module is), ``down`` [H, I]."""
        if gate_up is not None:
            if self.gate_up_interleaved:
                gate_up = reference.interleave_gate_up(gate_up[None])[0]
            self.gate_up_proj.set_rows_(e, slice(None), gate_up)
        if down is not None:
            self.down_proj.set_rows_(e, slice(None), down)

    def dequantized(self, name: str, experts, dtype: torch.dtype) -> torch.Tensor:
        """``gate_up_proj`` or ``down_proj`` of ``experts`` (index tensor or slice) in ``dtype``, in
        the stored row order: [n, 2I, H] or [n, H, I]."""
        return quant.dequantize_int4(getattr(self, name).weight(experts), dtype)

    def extra_repr(self) -> str:
        return (f"int4 {'symmetric' if self.symmetric else 'asymmetric'} g{quant.GROUP_SIZE}, gate_up_proj "
                f"{'interleaved' if self.gate_up_interleaved else 'HF'} layout")


_INT4_SUFFIXES = ("qweight", "scales", "zeros")


def _int4_gate_up_state_dict_hook(module, state_dict, prefix, local_metadata) -> None:
    if not module.gate_up_interleaved:
        return
    for leaf in _INT4_SUFFIXES:
        key = f"{prefix}gate_up_proj.{leaf}"
        if key in state_dict:
            state_dict[key] = reference.deinterleave_gate_up(state_dict[key].detach())


def _int4_gate_up_load_hook(module, state_dict, prefix, *args) -> None:
    if not module.gate_up_interleaved:
        return
    mine = module.gate_up_proj.buffers_by_name()
    for leaf, t in mine.items():
        key = f"{prefix}gate_up_proj.{leaf}"
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and value.shape == t.shape:
            state_dict[key] = reference.interleave_gate_up(value)


# Dequantized experts per call of the int4 prefill path: bounds its temporaries (real shape: 16 x 35 MB).
INT4_PREFILL_EXPERT_CHUNK = 16


# The decode MoE's gate_up launch follows the router, which only reads its hidden: it passes
# hidden_settled=True, so the kernel's first shared-expert tiles run beside the router's tail (PDL,
# ops.moe_decode_gate_up). False: the plain launch (same bits; for comparisons: bench/probes/pdl_overlap.py).
MOE_DECODE_HIDDEN_SETTLED = True


# Decode with int4 experts runs the int4 decode ops (the packed bytes streamed and dequantized in the
# kernels); False: every (token, slot) pair's expert is dequantized into a stack and the bf16 decode ops
# run on it (the reference path, kept for comparisons: bench_moe_decode, tests).
INT4_DECODE_KERNELS = True


def _int4_moe_decode(moe, x, weights, ids, shared_gate_up, shared_down, residual):
    """Decode (few tokens) with int4 experts, no host synchronisation (CUDA graphs capture it): the int4
    decode ops on the stored tensors (rows interleaved like the bf16 weight's when the module is:
    ``gate_up_epilogue``), exactly the bf16 decode ops on the dequantized weights. A bad id poisons."""
    experts = moe.experts
    if not INT4_DECODE_KERNELS:
        return _int4_moe_decode_dequantized(moe, x, weights, ids, shared_gate_up, shared_down, residual)
    gu, dn = experts.gate_up_proj, experts.down_proj
    # hidden_settled: the router ran between x's producer and this launch (Dots1MoE.forward).
    act = ops.moe_decode_int4_gate_up(x, gu.qweight, gu.scales, gu.zeros, ids, shared_gate_up,
                                      experts.gate_up_epilogue, hidden_settled=MOE_DECODE_HIDDEN_SETTLED)
    return ops.moe_decode_int4_down(act, dn.qweight, dn.scales, dn.zeros, ids, weights, shared_down, residual)


def _int4_moe_decode_dequantized(moe, x, weights, ids, shared_gate_up, shared_down, residual):
    """The reference decode path: the expert of each (token, slot) pair is dequantized into a [T*k, ...]
    stack and the bf16 decode ops run with ids 0 .. T*k-1 (an id outside [0, E) keeps its poison: it maps
    to T*k, outside the stack)."""
    experts = moe.experts
    T, k = ids.shape
    E = experts.num_experts
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < E)
    picked = flat.clamp(0, E - 1)
    gate_up = experts.dequantized("gate_up_proj", picked, x.dtype)  # [T*k, 2I, H]
    down = experts.dequantized("down_proj", picked, x.dtype)  # [T*k, H, I]
    local = torch.where(valid, torch.arange(T * k, device=ids.device), T * k).view(T, k).to(torch.int32)
    act = ops.moe_decode_gate_up(x, gate_up, local, shared_gate_up, experts.gate_up_epilogue)
    return ops.moe_decode_down(act, down, local, weights, shared_down, residual)


# Prefill with int4 experts on CUDA (bf16 activations, an sm90 GPU) runs the W4A16 grouped GEMM
# (ops.grouped_gemm_int4: the packed codes read by the kernel, no dequantized copy, no host read of the
# offsets, CUDA-graph capturable); False, or where it does not apply: the dequantizing path below.
INT4_PREFILL_KERNEL = True


def _int4_prefill_kernel_applies(x: torch.Tensor) -> bool:
    # sm90 only: elsewhere the op's own fallback dequantizes the whole weight at once, while the path
    # below bounds its temporaries to INT4_PREFILL_EXPERT_CHUNK experts.
    return (INT4_PREFILL_KERNEL and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) == (9, 0)
            and "CUDA" not in ops.reference_backed_ops().get("grouped_gemm_int4", []))


def _int4_moe_prefill(moe, x, weights, ids, residual):
    """Prefill with int4 experts: permute as the bf16 path does, then either the W4A16 grouped GEMMs
    (:data:`INT4_PREFILL_KERNEL`) or the touched experts (a host read of the offsets) dequantized
    INT4_PREFILL_EXPERT_CHUNK at a time, each chunk's rows through the same grouped_gemm calls; the
    combine unchanged."""
    experts = moe.experts
    permuted, offsets, row_map = ops.permute(x, ids, moe.num_experts)  # [T*k, H], [E+1], [T*k]
    shared = moe.shared_experts(x) if moe.shared_experts is not None else None
    if _int4_prefill_kernel_applies(x) and experts.gate_up_epilogue == "swiglu_interleaved":
        gu, dn = experts.gate_up_proj, experts.down_proj
        act = ops.grouped_gemm_int4(permuted, gu.qweight, gu.scales, gu.zeros, offsets,
                                    experts.gate_up_epilogue)  # [T*k, I]
        expert_out = ops.grouped_gemm_int4(act, dn.qweight, dn.scales, dn.zeros, offsets, "none")  # [T*k, H]
        return ops.unpermute(expert_out, row_map, weights, shared_out=shared, residual=residual)
    bounds = offsets.tolist()
    touched = [e for e in range(moe.num_experts) if bounds[e + 1] > bounds[e]]
    S = permuted.shape[0]
    expert_out = x.new_zeros(S, experts.hidden_size)
    for a in range(0, len(touched), INT4_PREFILL_EXPERT_CHUNK):
        chunk = touched[a:a + INT4_PREFILL_EXPERT_CHUNK]
        lo, hi = bounds[chunk[0]], bounds[chunk[-1] + 1]  # untouched experts in between have no rows
        local = torch.tensor([bounds[e] - lo for e in chunk] + [hi - lo], dtype=torch.int32, device=x.device)
        sel = torch.tensor(chunk, dtype=torch.long, device=x.device)
        act = ops.grouped_gemm(permuted[lo:hi], experts.dequantized("gate_up_proj", sel, x.dtype), local,
                               experts.gate_up_epilogue)
        expert_out[lo:hi] = ops.grouped_gemm(act, experts.dequantized("down_proj", sel, x.dtype), local, "none")
    return ops.unpermute(expert_out, row_map, weights, shared_out=shared, residual=residual)


class Dots1MoE(nn.Module):
    def __init__(self, config: Dots1Config, device=None, dtype=None):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.gate = Dots1Router(config, device=device, dtype=dtype)
        self.experts = Dots1Experts(config, device=device, dtype=dtype)
        self.shared_experts = None
        if config.n_shared_experts:
            shared_size = config.moe_intermediate_size * config.n_shared_experts
            self.shared_experts = Dots1MLP(config.hidden_size, shared_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """[T, H] -> routed + shared experts (+ residual, fused into the combine) [T, H].

        Up to MOE_DECODE_MAX_TOKENS tokens (INT4_MOE_DECODE_MAX_TOKENS with int4 experts; decode):
        three launches, router + gating, then the touched routed experts and the shared experts (packed
        gate_up: two always-on experts of weight 1) in one gate_up + SwiGLU launch and one down +
        combine + residual launch, each expert read once."""
        held = getattr(self.experts, "expert_range", None)
        if held is not None and held != (0, self.num_experts):
            # load_model(experts=(start, end)) without expert parallelism: the other experts' tokens would
            # read no weights (NaN logits), so say so instead.
            raise RuntimeError(f"this MoE layer holds routed experts [{held[0]}, {held[1]}) of {self.num_experts} "
                               f"only: run it under expert parallelism (dots1_ext.distributed), or load all experts")
        weights, ids = self.gate(x)  # fp32 [T, k], int32 [T, k]
        int4 = isinstance(self.experts, Dots1Int4Experts)
        if x.shape[0] <= (INT4_MOE_DECODE_MAX_TOKENS if int4 else MOE_DECODE_MAX_TOKENS):
            shared = self.shared_experts
            shared_gate_up = shared_down = None
            if shared is not None and shared.gate_up is not None:
                shared_gate_up, shared_down = shared.gate_up, shared.down_proj.weight
            elif shared is not None:  # unpacked (e.g. weights shared with an HF module): its own launches
                residual = shared(x) if residual is None else shared(x) + residual
            if int4:
                return _int4_moe_decode(self, x, weights, ids, shared_gate_up, shared_down, residual)
            # hidden_settled: self.gate (the router) launched after x was written and before this op,
            # so the gate_up kernel may read x while the router finishes (ops.moe_decode_gate_up).
            act = ops.moe_decode_gate_up(x, self.experts.gate_up_proj, ids, shared_gate_up, self.experts.gate_up_epilogue,
                                         hidden_settled=MOE_DECODE_HIDDEN_SETTLED)  # [T, k*I + Is]
            return ops.moe_decode_down(act, self.experts.down_proj, ids, weights, shared_down, residual)
        if int4:
            return _int4_moe_prefill(self, x, weights, ids, residual)
        permuted, offsets, row_map = ops.permute(x, ids, self.num_experts)  # [T*k, H], [E+1], [T*k]
        act = ops.grouped_gemm(permuted, self.experts.gate_up_proj, offsets, self.experts.gate_up_epilogue)  # [T*k, I]
        expert_out = ops.grouped_gemm(act, self.experts.down_proj, offsets, "none")  # [T*k, H]
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        return ops.unpermute(expert_out, row_map, weights, shared_out=shared, residual=residual)


# -- int4 experts of a whole model ------------------------------------------------------------------
def int4_expert_modules(root: nn.Module) -> list[Dots1Int4Experts]:
    return [m for m in root.modules() if isinstance(m, Dots1Int4Experts)]


def is_int4(root: nn.Module) -> bool:
    return bool(int4_expert_modules(root))


@torch.no_grad()
def quantize_experts_(model: nn.Module, symmetric: bool = False) -> nn.Module:
    """Replaces the routed experts (``Dots1Experts``) of every MoE layer under ``model`` by
    ``Dots1Int4Experts`` on the same device, in place. On the meta device the new modules are empty
    (the loader fills them); otherwise each expert is quantized from the bf16 weights one at a time
    (their gate/up layout kept), and each layer's bf16 experts are freed once converted. Returns ``model``."""
    for moe in [m for m in model.modules() if isinstance(m, Dots1MoE)]:
        old = moe.experts
        if not isinstance(old, Dots1Experts):
            continue
        if getattr(old, "expert_range", None) is not None:
            raise ValueError("quantize_experts_: a model holding a range of experts (expert parallel) is not supported")
        config = _moe_config(model, old)
        device = old.gate_up_proj.device
        new = Dots1Int4Experts(config, device=device, symmetric=symmetric)
        if device.type != "meta":
            for e in range(new.num_experts):
                gate_up = old.gate_up_proj[e]
                if old.gate_up_interleaved:
                    gate_up = reference.deinterleave_gate_up(gate_up[None])[0]
                new.quantize_expert_(e, gate_up, old.down_proj[e])
            if old.gate_up_interleaved:
                new.interleave_gate_up_()
        moe.experts = new
    return model


def _moe_config(model, experts):
    config = getattr(model, "config", None)
    if config is not None:
        return config
    from types import SimpleNamespace

    E, N, H = experts.gate_up_proj.shape
    return SimpleNamespace(n_routed_experts=E, hidden_size=H, moe_intermediate_size=N // 2)


class Dots1DecoderLayer(nn.Module):
    def __init__(self, config: Dots1Config, layer_idx: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.self_attn = Dots1Attention(config, layer_idx, **kw)
        self.mlp = Dots1MoE(config, **kw) if self.is_moe else Dots1MLP(config.hidden_size, config.intermediate_size, **kw)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, step: StepInputs):
        """The residual stream is ``x + residual`` (just ``x`` when residual is None), as in vLLM: each
        norm adds the pending block output into the residual in the same pass. Returns the new pair."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            self.input_layernorm(x, residual)
        x = self.self_attn(x, step)
        self.post_attention_layernorm(x, residual)
        if self.is_moe:
            return self.mlp(x, residual=residual), None  # the residual add happens in the combine
        return self.mlp(x), residual
