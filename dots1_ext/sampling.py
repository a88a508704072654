"""Token choice from logits: greedy or temperature / top-p, with no host synchronisation. Shared by
``Dots1ForCausalLM.generate`` and the greedy CUDA graph (``dots1_ext.cuda_graph``), which must pick
exactly as generate does."""

from __future__ import annotations

import math

import torch


def check_sampling(temperature: float, top_p: float) -> None:
    """ValueError unless temperature is a finite number >= 0 and top_p is in (0, 1]."""
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
            or temperature < 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:  # NaN fails both
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B] int64: argmax at temperature 0, else a temperature / nucleus draw.
    A poisoned row (a NaN or +inf logit, or every logit -inf) gets -1, outside every vocabulary, rather
    than a plausible id; fed back to ``decode`` it keeps the sequence poisoned. No host sync."""
    check_sampling(temperature, top_p)
    if temperature == 0:
        # argmax picks a NaN or +inf if there is one, and a -inf only when every logit is: the picked
        # value alone tells a poisoned row (B reads, not a second pass over [B, V]).
        picked, tok = logits.max(dim=-1)  # argmax's index (the first of ties) and its value, in one kernel
        return torch.where(torch.isfinite(picked), tok, -1)
    top = logits.amax(dim=-1, keepdim=True)  # NaN if any element is NaN (amax propagates it)
    # Shifted by the row's max first: (logits - max) / t is <= 0, so a tiny t gives -inf, never the
    # inf - inf = NaN that logits / t overflowed to (a 1e-39 temperature drew token 0).
    probs = torch.softmax((logits.float() - top.float()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keeps at least the top token
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0.0))
    # argmax(p / Exp(1)) is a draw from p, without torch.multinomial's host synchronisation.
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    tok = (probs / noise).argmax(dim=-1)
    return torch.where(torch.isfinite(top.squeeze(-1)), tok, -1)  # NaN, +inf, or every logit -inf
