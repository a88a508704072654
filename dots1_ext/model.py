"""The Dots1 causal LM: prefill and decode over a static KV cache, and generation.

Cache layout: sequence b's token in cache slot s lives at row ``b * S + s`` of each layer's
``k_cache.view(-1, Hk, D)``. Batches are left-padded: slot s holds the s-th column of the prompt
(padding included), decode step n writes slot ``prompt_len + n``. ``cache_start[b]`` is sequence b's
first real slot; its RoPE positions are ``slot - cache_start[b]`` (HF generate's ``cumsum(mask) - 1``).

Shape letters: B batch, L new tokens per sequence, T = B*L, S cache slots, H hidden, V vocab.
"""

from __future__ import annotations

import copy
import numbers
import time
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from dots1_ext import modules
from dots1_ext.config import Dots1Config
from dots1_ext.modules import Dots1DecoderLayer, RMSNorm, StepInputs, _KeepsFp32Buffers
from dots1_ext.rope import build_cos_sin_cache, rope_type_of
from dots1_ext.sampling import check_sampling, sample  # noqa: F401  (sample: part of this module's API)

EOS_CHECK_EVERY = 8  # decode steps between host checks for "every sequence has finished"

reference_ops = modules.use_reference_ops  # `with reference_ops():` runs the eager reference ops


class Dots1Model(_KeepsFp32Buffers, nn.Module):
    _fp32_buffers = ("cos_sin_cache",)

    def __init__(self, config: Dots1Config, device=None, dtype=None):
        super().__init__()
        self.config = config
        kw = dict(device=device, dtype=dtype)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, **kw)
        self.layers = nn.ModuleList(Dots1DecoderLayer(config, i, **kw) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.windows = sorted({w for i in range(config.num_hidden_layers) if (w := config.window(i)) is not None})
        self.register_buffer("cos_sin_cache", None, persistent=False)  # [S, D] fp32
        self.register_buffer("cache_start", None, persistent=False)  # [B] int64, first real slot
        # [1] int64: slots [0, cache_filled) hold every sequence's keys and values. Prefill sets it, each
        # decode step at a usable slot s sets it to s + 1 on the device; a decode step past it is poisoned
        # (it would attend over rows no step wrote, stale or empty: plausible numbers).
        self.register_buffer("cache_filled", None, persistent=False)
        self.cache_filled_host: int | None = None  # its host copy while known (not after a tensor-slot decode)
        self.cache_start_host: list[int] | None = None  # its host copy, set by prefill

    # -- cache ---------------------------------------------------------------------------------
    @property
    def cache_shape(self) -> tuple[int, int] | None:
        """(batch_size, max_seq_len) of the allocated KV cache, or None."""
        k = self.layers[0].self_attn.k_cache if len(self.layers) else None
        return None if k is None else (k.shape[0], k.shape[1])

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocates every layer's KV cache [B, S, Hk, D] and the RoPE table once; later steps reuse them."""
        weight = self.embed_tokens.weight
        dtype = dtype or weight.dtype
        c = self.config
        rope_scaling = c.rope_scaling
        if rope_scaling and rope_type_of(rope_scaling) == "dynamic" and not rope_scaling.get(
                "original_max_position_embeddings"):
            # transformers' dynamic RoPE rescales past config.max_position_embeddings: the static table is
            # exact up to there, and a longer cache raises rather than silently use the default table.
            rope_scaling = {**rope_scaling, "original_max_position_embeddings": c.max_position_embeddings}
        # The table first: if it raises, the old cache and table stay as they were, consistent.
        cos_sin_cache = build_cos_sin_cache(c.head_dim, max_seq_len, c.rope_theta, rope_scaling, weight.device)
        for layer in self.layers:
            layer.self_attn.allocate_cache(batch_size, max_seq_len, dtype, weight.device)
        self.cos_sin_cache = cos_sin_cache
        self.cache_start = torch.zeros(batch_size, dtype=torch.long, device=weight.device)
        self.cache_start_host = None
        self.cache_filled = torch.zeros(1, dtype=torch.long, device=weight.device)
        self.cache_filled_host = 0

    def mark_cache_written(self, slots: int) -> None:
        """Declares cache slots [0, ``slots``) written, for code that fills the cache itself (the decode
        benchmarks, which time a step at a given context over random K/V)."""
        if self.cache_shape is None:
            raise ValueError("mark_cache_written needs a KV cache: call setup_cache first")
        if not is_integer(slots) or not 0 <= slots <= self.cache_shape[1]:
            raise ValueError(f"mark_cache_written needs an int in [0, {self.cache_shape[1]}], got {slots!r}")
        self.cache_filled.fill_(int(slots))
        self.cache_filled_host = int(slots)

    def check_decode_slot(self, slot: int) -> None:
        """IndexError for a decode slot past the slots written, while the host knows their count (the
        device poisons such a step in any case: decode_step_inputs)."""
        filled = self.cache_filled_host
        if filled is not None and slot > filled:
            raise IndexError(f"decode slot {slot} is past the {filled} cache slots written so far (prefill, then "
                             f"one per decode step): the next slot is {filled}")

    def step_inputs(self, slots: torch.Tensor, kv_len: int, seq_starts: list[int] | None = None) -> StepInputs:
        """Positions, cache rows and attention masks for new tokens at cache ``slots`` [L] (same for
        every sequence), attending to slots [0, kv_len). Tensor ops only: no host synchronisation.

        ``seq_starts``: the host's copy of ``cache_start`` (each sequence's first real slot), given when
        the caller guarantees slots == [kv_len - L, kv_len) (a prefill or a chunk of one). Full-attention
        layers then need no mask tensor: each sequence's real tokens run causal SDPA (flash / cuDNN
        kernels eligible) on their own keys, sliding-window layers block by block on their band."""
        B, S = self.cache_shape
        L = slots.shape[0]
        start = self.cache_start[:, None]  # [B, 1]
        positions = (slots[None, :] - start).clamp_min(0)  # [B, L]; padding gets 0
        batch_rows = torch.arange(B, device=slots.device)[:, None] * S
        # A slot outside [0, S) (a device-tensor slot cannot be checked without a sync) gets row -1, which
        # the cache-writing kernel rejects by poisoning that token with NaN: b*S + slot must never
        # alias sequence b+1's slots.
        in_cache = (slots >= 0) & (slots < S)
        if L == 1 and seq_starts is None:  # decode: decode_attention reads [cache_start, slot + 1) itself
            # As decode_step_inputs (without its cache_filled update: forward's other decode path owns
            # it): a slot past the written ones, or before a sequence's first real slot, is unusable too.
            # It gets cache row -1 and kv_end -1 < kv_start, so decode_attention poisons the sequence
            # (an empty range would give a plausible zero output).
            usable = in_cache & (slots <= self.cache_filled) & (slots >= self.cache_start)  # [B]
            cache_rows = torch.where(usable, batch_rows[:, 0] + slots, -1)
            kv_end = torch.where(usable, slots + 1, -1)
            return StepInputs(B, L, kv_len, positions.reshape(-1), cache_rows, {}, self.cos_sin_cache,
                              kv_start=self.cache_start, kv_end=kv_end)
        cache_rows = torch.where(in_cache[None, :], batch_rows + slots[None, :], -1).reshape(-1)  # [T]
        masks = {}
        if seq_starts is None:  # otherwise prefill_attention needs no mask tensor
            q_slot = slots[None, :, None]  # [1, L, 1]
            k_slot = torch.arange(kv_len, device=slots.device)[None, None, :]  # [1, 1, S']
            # Causal over real keys; a padding query sees only itself, so no softmax row is empty.
            visible = (k_slot <= q_slot) & ((k_slot >= start[:, :, None]) | (k_slot == q_slot))  # [B, L, S']
            masks[None] = visible
            for w in self.windows:  # HF: a query at p sees keys in (p - window, p]
                masks[w] = visible & (k_slot > q_slot - w)
        return StepInputs(B, L, kv_len, positions.reshape(-1), cache_rows, masks, self.cos_sin_cache, seq_starts)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> [T, H]. An id outside [0, V) gives a NaN row (checking it on the host
        would synchronise every decode step; an index error on CUDA would kill the context)."""
        V = self.embed_tokens.num_embeddings
        valid = (input_ids >= 0) & (input_ids < V)
        x = self.embed_tokens(input_ids.clamp(0, V - 1))
        return x.masked_fill(~valid[..., None], float("nan")).view(input_ids.numel(), -1)

    def forward(self, input_ids: torch.Tensor, slots: torch.Tensor, kv_len: int,
                upcast: torch.dtype | None = None, seq_starts: list[int] | None = None) -> torch.Tensor:
        """input_ids [B, L] at cache ``slots`` [L] int64 -> final hidden states [T, H].

        ``upcast``: run each module on a temporary copy in that dtype, one module at a time (the
        parity check's higher-precision yardstick; never more than one layer's copy alive). The
        copies write their own KV cache, so the model's cache is left as it was. ``seq_starts``: see
        ``step_inputs``. ``cache_filled`` (the slots written): a multi-token run sets it to ``kv_len``; a
        decode step (one token, no ``seq_starts``) at slot s needs s <= cache_filled (else its sequences
        come out NaN) and sets it to s + 1 (see ops.decode_step_inputs)."""
        run = (lambda m: m) if upcast is None else (lambda m: upcast_copy(m, upcast))
        if upcast is None and seq_starts is None and input_ids.shape[1] == 1:
            # A decode step: the embedding and the integer inputs in one launch (decode_step_inputs), the
            # same values as embed() and step_inputs(), which took a dozen small kernels per step.
            B, S = self.cache_shape
            x, positions, cache_rows, kv_end = modules.ops.decode_step_inputs(
                input_ids.reshape(-1).long(), slots.reshape(1), self.cache_start, self.embed_tokens.weight, S,
                self.cache_filled)
            step = StepInputs(B, 1, kv_len, positions, cache_rows, {}, self.cos_sin_cache,
                              kv_start=self.cache_start, kv_end=kv_end)
        else:
            step = self.step_inputs(slots, kv_len, seq_starts)
            x = self.embed(input_ids)
            x = x if upcast is None else x.to(upcast)  # a row lookup: exact in any dtype
            if upcast is None:  # an upcast run writes its copies' caches, not this one
                # The caller attends to slots [0, kv_len), so they hold keys; later ones, if any, belong to
                # an older continuation.
                self.cache_filled.fill_(kv_len)
                self.cache_filled_host = kv_len
        residual = None
        for layer in self.layers:
            x, residual = run(layer)(x, residual, step)
        return run(self.norm)(x, residual)


class Dots1ForCausalLM(nn.Module):
    def __init__(self, config: Dots1Config, device=None, dtype=None):
        if not isinstance(config, Dots1Config):
            raise TypeError(f"Dots1ForCausalLM needs a Dots1Config (Dots1Config.from_dict for a dict), got "
                            f"{type(config).__name__}")
        super().__init__()
        self.config = config
        self.model = Dots1Model(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.prompt_len = 0  # slots filled by the last prefill

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Makes sure a static KV cache of ``batch_size`` sequences with at least ``max_seq_len`` slots
        exists. The current cache is kept when it fits; a longer request grows it geometrically (at
        least doubling, up to ``max_position_embeddings`` unless the request is longer), and it never
        shrinks, so alternating request lengths neither reallocate it nor invalidate captured graphs."""
        if not (is_integer(batch_size) and is_integer(max_seq_len)) or batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"setup_cache needs integers batch_size >= 1 and max_seq_len >= 1, got {batch_size!r}, "
                             f"{max_seq_len!r}")
        shape = self.model.cache_shape
        if shape is not None and shape[0] == batch_size and shape[1] >= max_seq_len and dtype in (None, self.dtype):
            return
        if max_seq_len > self.config.max_position_embeddings:
            warnings.warn(f"setup_cache: {max_seq_len} slots pass max_position_embeddings "
                          f"({self.config.max_position_embeddings}); positions beyond it are outside what the model "
                          f"was trained on (RoPE extrapolates, as in transformers)", stacklevel=2)
        slots = max_seq_len
        if shape is not None:
            grown = max(max_seq_len, 2 * shape[1]) if shape[1] < max_seq_len else shape[1]
            slots = max(max_seq_len, min(grown, self.config.max_position_embeddings))
        self.model.setup_cache(batch_size, slots, dtype)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- forward passes ------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                last_only: bool = False, upcast: torch.dtype | None = None,
                chunk_size: int | None = None, start_slot: int = 0) -> torch.Tensor:
        """Runs the prompt [B, L] (left-padded; ``attention_mask`` [B, L] 1 = real token) from cache
        slot 0. Returns logits [B, L, V], or [B, V] for the last column with ``last_only``.

        ``chunk_size``: run the prompt in chunks of that many tokens, each attending to the cache the
        earlier chunks wrote (the same logits; activations bounded by the chunk, not the prompt).
        ``start_slot`` > 0 continues the sequences already in the cache: the tokens go to slots
        [start_slot, start_slot + L) and attend to everything before them (slots [0, start_slot) must
        hold those sequences, e.g. an earlier prefill and its decode steps; no mask: the padding, if
        any, is the earlier prefill's).

        Prefill checks its inputs on the host (one synchronisation per prompt, never per decode
        step): token ids in [0, vocab_size), a left-padded mask with at least one real token per row.
        ``upcast`` runs every module in that dtype on a temporary copy (see ``Dots1Model.forward``)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if B == 0 or L == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
        shape = self.model.cache_shape
        if isinstance(start_slot, bool) or not isinstance(start_slot, int) or start_slot < 0:
            raise ValueError(f"start_slot must be an int >= 0, got {start_slot!r}")
        if shape is None or shape[0] != B or shape[1] < start_slot + L:
            raise ValueError(f"prefill of [{B}, {L}] tokens from slot {start_slot} needs setup_cache({B}, >= "
                             f"{start_slot + L}) first; cache is {shape}")
        input_ids = input_ids.to(self.device)
        check_token_ids(input_ids, self.config.vocab_size)
        if start_slot:
            if attention_mask is not None:
                raise ValueError("attention_mask must be None when start_slot > 0 (a continuation keeps the "
                                 "padding of the prefill it continues)")
            filled = self.model.cache_filled_host
            if filled is None:  # after tensor-slot decodes; prefill may synchronise, decode never does
                filled = int(self.model.cache_filled)
            if start_slot > filled:
                raise ValueError(f"prefill from start_slot {start_slot}: only slots [0, {filled}) of the cache are "
                                 f"written (continue at a slot <= {filled}, or prefill from 0)")
            seq_starts = self.model.cache_start_host  # None if unknown: masks then
        elif attention_mask is None:
            self.model.cache_start.zero_()
            seq_starts = [0] * B
        else:
            if tuple(attention_mask.shape) != (B, L):
                raise ValueError(f"attention_mask must have the shape of input_ids {(B, L)}, got {tuple(attention_mask.shape)}")
            if attention_mask.is_floating_point() or attention_mask.is_complex():
                raise ValueError(f"attention_mask must hold 0 / 1 (integer or bool), got {attention_mask.dtype}")
            mask = attention_mask.to(self.device).bool()
            if not torch.equal(mask.to(attention_mask.dtype), attention_mask.to(self.device)):
                raise ValueError("attention_mask must hold only 0 and 1")
            if not torch.equal(mask, mask.long().cumsum(1) > 0):  # prefill may synchronise; decode never does
                raise ValueError("attention_mask must be left-padded (zeros, then ones, in every row)")
            if not bool(mask[:, -1].all()):
                empty = (~mask[:, -1]).nonzero().flatten().tolist()
                raise ValueError(f"attention_mask: sequences {empty} have no real token (empty prompt)")
            starts = L - mask.sum(1)
            self.model.cache_start.copy_(starts)
            seq_starts = starts.tolist()  # the mask check above synchronised already
        self.model.cache_start_host = seq_starts
        self.prompt_len = start_slot + L
        lm_head = self.lm_head if upcast is None else upcast_copy(self.lm_head, upcast)
        chunk = L if chunk_size is None else chunk_size
        logits = []
        for start in range(0, L, chunk):  # each chunk attends to the cache the earlier ones wrote
            end = min(L, start + chunk)
            slots = torch.arange(start_slot + start, start_slot + end, device=self.device)
            hidden = self.model(input_ids[:, start:end], slots, start_slot + end, upcast=upcast, seq_starts=seq_starts)
            hidden = hidden.view(B, end - start, -1)  # [B, C, H]
            if not last_only:
                logits.append(logits_of(lm_head, hidden))
            elif end == L:
                logits.append(logits_of(lm_head, hidden[:, -1]))
        return logits[0] if len(logits) == 1 else torch.cat(logits, dim=1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, slot: int | torch.Tensor) -> torch.Tensor:
        """One token per sequence, tokens [B] (or [B, 1]), written at cache ``slot``. Returns logits [B, V].

        ``slot`` may be a 0-d int64 device tensor (updated in place between steps) for a CUDA-graph
        capture: attention reads each sequence's slots [cache_start, slot + 1) from the device, so one
        graph serves every length. Nothing here synchronises with the host, so only metadata is checked
        (an integer tensor of B tokens; an int slot in the cache, or a one-element integer tensor): a
        token id outside the vocabulary or a tensor slot outside the cache gives NaN logits for the
        sequences concerned (an unmissable poison), never a plausible number or another sequence's cache.

        The slot must not pass the slots written so far (``Dots1Model.cache_filled``: the prefill's, then
        one per decode step): attending over unwritten slots would read stale or empty rows. An int slot
        past them raises IndexError while the host knows the count (until a tensor-slot decode); on the
        device, such a slot gives NaN logits for every sequence, and so does every later step until a
        prefill. Decoding at an earlier slot rolls the sequences back to it."""
        if self.model.cache_shape is None:
            raise ValueError("decode needs a KV cache: call setup_cache(batch_size, max_seq_len) and prefill first")
        B, S = self.model.cache_shape
        # Metadata only (dtype, size, Python type): no host synchronisation.
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in _INT_DTYPES:
            raise TypeError(f"tokens must be an integer tensor of token ids, got "
                            f"{tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        if tokens.numel() != B:
            raise ValueError(f"tokens must hold one token per sequence ({B}), got shape {tuple(tokens.shape)}")
        if is_integer(slot):
            slot = int(slot)
            if not 0 <= slot < S:
                raise IndexError(f"decode slot {slot} is outside the KV cache of {S} slots")
            self.model.check_decode_slot(slot)
            # The host's count after the step (None: only the device knows whether the slot is usable).
            filled_after = None if self.model.cache_filled_host is None else slot + 1
            slot = torch.arange(slot, slot + 1, device=self.device)  # made on the device: no blocking copy
        elif not isinstance(slot, torch.Tensor) or slot.dtype not in _INT_DTYPES or slot.numel() != 1:
            raise TypeError("slot must be an int or a one-element integer tensor, got "
                            + (f"{slot.dtype} of shape {tuple(slot.shape)}" if isinstance(slot, torch.Tensor)
                               else repr(slot)))
        else:
            filled_after = None  # the device's count stays right; the host no longer knows it
        slots = slot.reshape(1).to(torch.long)
        hidden = self.model(tokens.reshape(B, 1), slots, S)  # [B, H]
        self.model.cache_filled_host = filled_after
        return logits_of(self.lm_head, hidden)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full forward of [B, L] tokens (a fresh prefill; the cache grows if needed). Returns logits [B, L, V]."""
        self.setup_cache(*input_ids.shape)
        return self.prefill(input_ids, attention_mask)

    # -- generation ----------------------------------------------------------------------------
    def decode_graphs(self):
        """The model's ``DecodeGraphs`` (created on first use; graphs are captured per shape lazily)."""
        from dots1_ext.cuda_graph import DecodeGraphs

        if getattr(self, "_decode_graphs", None) is None:
            self._decode_graphs = DecodeGraphs(self)
        return self._decode_graphs

    def release_graphs(self) -> None:
        """Destroys the captured decode graphs (DecodeGraphs.release); the next decode captures anew. Under
        torch.distributed with NCCL this must come before destroy_process_group (distributed.shutdown
        does it when given the model)."""
        graphs = getattr(self, "_decode_graphs", None)
        if graphs is not None:
            graphs.release()

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | Sequence[Sequence[int]],
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        timings: dict | None = None,
        cuda_graphs: bool | None = None,
        prefill_chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Greedy (temperature 0) or temperature / top-p sampling. Returns the new tokens [B, N], N <=
        max_new_tokens (it stops once every sequence has emitted an eos; positions after a sequence's
        eos hold ``pad_token_id``). ``input_ids``: [B, L] left-padded with ``attention_mask``, or a list
        of non-empty token lists of any lengths. Every argument is checked up front (ValueError naming
        it). ``timings``, if given, receives prefill/decode seconds, the decode steps and
        ``graph_captures`` (CUDA graphs captured during this call: 0 once a shape has been seen).
        ``cuda_graphs`` (default: on for a CUDA model) replays each decode step from a captured CUDA
        graph per (batch size, context bucket) — greedy steps with the token choice inside the graph;
        see ``dots1_ext.cuda_graph``. ``prefill_chunk_size`` runs the prompt in chunks (``prefill``).
        A sequence whose logits come out poisoned (NaN: e.g. NaN weights) gets token id -1 from then on
        (``sample``), never a plausible id. The KV cache is kept
        between calls and grows geometrically (``setup_cache``), so repeated calls replay the same graphs."""
        V = self.config.vocab_size
        if not isinstance(input_ids, torch.Tensor):
            input_ids = [list(seq) for seq in input_ids]
            if not input_ids:
                raise ValueError("input_ids: empty batch (no prompts)")
            if empty := [b for b, seq in enumerate(input_ids) if not seq]:
                raise ValueError(f"input_ids: prompts {empty} are empty; every prompt needs at least one token")
            if bad := [t for seq in input_ids for t in seq if not is_integer(t)]:
                raise ValueError(f"input_ids: token ids must be integers, got {bad[0]!r}")
            input_ids, attention_mask = left_pad(input_ids, device=self.device)
        elif input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(f"input_ids must be a non-empty [batch, length] tensor, got shape {tuple(input_ids.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        check_sampling(temperature, top_p)
        if eos_token_id is None:
            eos = self.config.eos_token_ids
        elif is_integer(eos_token_id):
            eos = [int(eos_token_id)]
        elif (isinstance(eos_token_id, Sequence) and not isinstance(eos_token_id, str)
              and all(is_integer(e) for e in eos_token_id)):
            eos = [int(e) for e in eos_token_id]
        else:
            raise ValueError(f"eos_token_id must be an int, a list of ints or None, got {eos_token_id!r}")
        if bad := [e for e in eos if not 0 <= e < V]:
            raise ValueError(f"eos_token_id {bad} outside the vocabulary [0, {V})")
        if pad_token_id is None:
            pad_token_id = self.config.pad_token_id if self.config.pad_token_id is not None else (eos[0] if eos else 0)
        elif not is_integer(pad_token_id):
            raise ValueError(f"pad_token_id must be an int or None, got {pad_token_id!r}")
        pad_token_id = int(pad_token_id)
        if not 0 <= pad_token_id < V:
            raise ValueError(f"pad_token_id {pad_token_id} outside the vocabulary [0, {V})")
        eos_ids = torch.tensor(eos, dtype=torch.long, device=self.device)
        B, L = input_ids.shape
        self.setup_cache(B, L + max_new_tokens)
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        decode = self.decode_graphs() if cuda_graphs else self.decode
        captures_before = self.decode_graphs().captures if cuda_graphs else 0

        def pick(logits, finished):
            tok = sample(logits, temperature, top_p, generator)
            tok = torch.where(finished, pad_token_id, tok)
            return tok, finished | torch.isin(tok, eos_ids)

        t0 = _now(self.device)
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        tok, finished = pick(self.prefill(input_ids, attention_mask, last_only=True, chunk_size=prefill_chunk_size),
                             finished)
        new_tokens = [tok[:, None]]
        t1 = _now(self.device)
        if cuda_graphs and temperature == 0:  # the whole greedy step, bookkeeping included, in the graph
            new_tokens.append(decode.greedy_decode(tok, finished, L, max_new_tokens - 1, pad_token_id, eos,
                                                   EOS_CHECK_EVERY))
        else:
            for n in range(1, max_new_tokens):
                # A host check between steps (never inside a forward), every few steps so that the host
                # keeps queueing work ahead of the GPU.
                if eos and n % EOS_CHECK_EVERY == 0 and bool(finished.all()):
                    break
                tok, finished = pick(decode(tok, L + n - 1), finished)
                new_tokens.append(tok[:, None])
        out = torch.cat(new_tokens, dim=1)  # [B, N]
        t2 = _now(self.device)
        if timings is not None:
            timings.update(prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=out.shape[1] - 1,
                           prompt_tokens=B * L,
                           graph_captures=(self.decode_graphs().captures - captures_before) if cuda_graphs else 0)
        if eos:  # cut the columns after the step where the last sequence finished, as HF does
            is_eos = torch.isin(out, eos_ids)
            ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, out.shape[1])
            out = out[:, : int(ends.max())]
        return out


def logits_of(lm_head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [..., H] -> logits [..., V]; a decode step's few rows stream the weight once (skinny_gemm)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    return modules.linear(flat, lm_head.weight, lm_head.bias).view(*hidden.shape[:-1], -1)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """ValueError unless every id (padding included: it runs through the model too) is in [0, vocab_size).
    One host synchronisation: for prefill and generate, never for a decode step."""
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    if input_ids.numel() == 0:
        return
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"input_ids: token id {bad} is outside the vocabulary [0, {vocab_size})")


_INT_DTYPES = (torch.int64, torch.int32)


def is_integer(value) -> bool:
    """A Python / numpy integer, not a bool (the argument checks of model, loader and distributed)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids [B, L], attention_mask [B, L]) left-padded to the longest. Every list
    must be non-empty and hold integers (numpy ones too); ``pad_id`` an integer >= 0."""
    if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Sequence) or not sequences:
        raise ValueError(f"left_pad needs a non-empty list of token lists, got {sequences!r:.80}")
    for b, seq in enumerate(sequences):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, (Sequence, torch.Tensor)) or not len(seq):
            raise ValueError(f"left_pad: sequence {b} must be a non-empty list of token ids, got {seq!r:.80}")
    sequences = [seq.tolist() if isinstance(seq, torch.Tensor) else seq for seq in sequences]
    for b, seq in enumerate(sequences):
        if bad := [t for t in seq if not is_integer(t)]:
            raise ValueError(f"left_pad: sequence {b} holds {bad[0]!r}; token ids must be integers")
        if bad := [int(t) for t in seq if not -2**63 <= int(t) < 2**63]:
            raise ValueError(f"left_pad: sequence {b} holds {bad[0]}, beyond int64")
    if not is_integer(pad_id) or pad_id < 0:
        raise ValueError(f"left_pad: pad_id must be an integer >= 0, got {pad_id!r}")
    L = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), L), dtype=torch.long)
    for b, seq in enumerate(sequences):
        if len(seq):
            ids[b, L - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[b, L - len(seq):] = 1
    return ids.to(device), mask.to(device)


def upcast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` whose floating-point parameters and buffers are in ``dtype`` (one copy
    made straight in the new dtype; parameters already in it are shared, buffers are always copied,
    so a KV cache is never written through the copy)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"upcast_copy needs a floating-point torch.dtype, got {dtype!r}")
    memo = {}
    for m in module.modules():  # share what is not data (e.g. a process group): it may not copy
        for v in vars(m).values():
            if not isinstance(v, (torch.Tensor, nn.Module, dict, list, tuple, set, str, int, float, type(None))):
                memo[id(v)] = v
    for t in module.parameters():
        if t.is_floating_point():
            memo[id(t)] = nn.Parameter(t.detach().to(dtype), requires_grad=False)
    for t in module.buffers():
        if t.is_floating_point():
            memo[id(t)] = t.to(dtype, copy=True)
    return copy.deepcopy(module, memo)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def init_random_weights_(model: Dots1ForCausalLM, seed: int = 0, std: float | None = None) -> Dots1ForCausalLM:
    """Fills every weight in place with seeded random values (on the weights' own device): normal
    ``std`` (config.initializer_range) for matrices, 1 + noise for norm weights, a nonzero
    e_score_correction_bias, and a wider router so that routing is far from ties.

    int4 routed experts (``Dots1Int4Experts``) are drawn one expert at a time in the model's dtype, at
    the point of the parameter order where the bf16 experts would be, and quantized: on the CPU the
    draws are those of the bf16 model, so it equals the bf16 model with its experts quantized."""
    if not isinstance(model, Dots1ForCausalLM):
        raise TypeError(f"init_random_weights_ needs a Dots1ForCausalLM, got {type(model).__name__}")
    if not is_integer(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    std = std if std is not None else model.config.initializer_range
    device = model.device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in _init_order(model):
        if isinstance(p, modules.Int4Tensor):
            E, N, K = p.shape
            for e in range(E):
                w = torch.empty(N, K, dtype=model.dtype, device=device).normal_(0.0, std, generator=gen)
                p.set_rows_(e, slice(None), w)
        elif name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32))
        elif name.endswith("mlp.gate.weight"):
            p.normal_(0.0, 1.0 / p.shape[1] ** 0.5, generator=gen)
        else:
            p.normal_(0.0, std, generator=gen)
    for module in model.modules():
        if isinstance(module, modules.Dots1Router):
            module.e_score_correction_bias.normal_(0.0, 0.05, generator=gen)
    return model


def _init_order(model: nn.Module):
    """(name, parameter) in ``named_parameters`` order, with each int4 experts tensor (an Int4Tensor)
    where the bf16 experts' parameter would be."""
    seen = set()
    for mname, m in model.named_modules():
        if isinstance(m, modules.Int4Tensor):
            yield mname, m
            continue
        for pname, p in m.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield f"{mname}.{pname}" if mname else pname, p


def build_random_model(config: Dots1Config, device="cpu", dtype=torch.float32, seed: int = 0,
                       experts: str = "bf16") -> Dots1ForCausalLM:
    """A random-weight model built directly on ``device`` (no default init pass, no checkpoint), its
    expert weights packed for the fused SwiGLU epilogue like a loaded model's. ``experts="int4"``
    builds the routed experts directly in int4 (``dots1_ext.quant``), one expert in ``dtype`` at a time."""
    from dots1_ext import quant

    quant.check_expert_format(experts)
    if not isinstance(config, Dots1Config):
        raise TypeError(f"build_random_model needs a Dots1Config, got {type(config).__name__}")
    if experts == "int4" and not config.num_moe_layers:
        raise ValueError("experts='int4': the model has no MoE layers")  # as load_model says
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"build_random_model: dtype must be float32, float16 or bfloat16, got {dtype}")
    if torch.device(device).type == "meta":
        raise ValueError("build_random_model: device 'meta' holds no weights to fill")
    model = Dots1ForCausalLM(config, device="meta", dtype=dtype)
    if experts == "int4":
        modules.quantize_experts_(model)
    model.to_empty(device=device)
    model.tie_weights()
    init_random_weights_(model, seed)
    return modules.pack_linears_(modules.interleave_gate_up_(model)).eval()
