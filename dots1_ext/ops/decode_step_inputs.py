"""One decode step's inputs in one launch: the token embedding and the positions, cache rows and
attention ends the layers read (what Dots1Model built from a dozen small kernels per step).

Kernels: csrc/decode_step_inputs/. Reference: dots1_ext.reference.decode_step_inputs. The slot and the
tokens stay on the device (one CUDA graph serves every step); bad values poison instead of raising:
a token id outside the vocabulary gives a NaN row; a slot outside the cache, past ``cache_filled``
(the slots written so far: attending over unwritten ones would read stale or empty rows) or, for one
sequence, before its ``cache_start`` (its padding: the empty range would attend to nothing and give a
plausible zero) gives cache row -1 and kv_end -1 (the cache write and decode_attention then poison
that sequence).
"""

from __future__ import annotations

import torch

from dots1_ext import reference
from dots1_ext.ops import _checks as C
from dots1_ext.ops._lib import fill_with_reference, op


def _check_decode_step_inputs(tokens, slot, cache_start, embed_weight, cache_len, cache_filled):
    C.check_dtype(tokens, "tokens", (torch.int64,))
    C.check_shape(tokens, "tokens", (None,))
    C.check_dtype(slot, "slot", (torch.int64,))
    C.check_shape(slot, "slot", (1,))
    C.check_dtype(cache_start, "cache_start", (torch.int64,))
    C.check_shape(cache_start, "cache_start", (tokens.shape[0],))
    C.check_dtype(embed_weight, "embed_weight", C.FLOAT_DTYPES)
    C.check_shape(embed_weight, "embed_weight", (None, None))
    C.check_last_dim_contiguous(embed_weight, "embed_weight")
    C.check_dtype(cache_filled, "cache_filled", (torch.int64,))
    C.check_shape(cache_filled, "cache_filled", (1,))
    for t, name in ((slot, "slot"), (cache_start, "cache_start"), (embed_weight, "embed_weight"),
                    (cache_filled, "cache_filled")):
        C.check_same_device(t, name, tokens, "tokens")
    if cache_len < 1:
        raise ValueError(f"dots1_ext: cache_len must be at least 1, got {cache_len}")
    if cache_len > (2**63 - 1) // max(tokens.shape[0], 1):
        raise ValueError(f"dots1_ext: cache_len {cache_len} x {tokens.shape[0]} sequences overflows int64 cache rows")


fill_with_reference("decode_step_inputs", reference.decode_step_inputs, _check_decode_step_inputs)


@torch.library.register_fake("dots1_ext::decode_step_inputs")
def _decode_step_inputs_fake(tokens, slot, cache_start, embed_weight, cache_len, cache_filled):
    _check_decode_step_inputs(tokens, slot, cache_start, embed_weight, cache_len, cache_filled)
    B = tokens.shape[0]
    ints = [torch.empty(B, dtype=torch.int64, device=tokens.device) for _ in range(3)]
    return (torch.empty(B, embed_weight.shape[1], dtype=embed_weight.dtype, device=tokens.device), *ints)


def decode_step_inputs(
    tokens: torch.Tensor, slot: torch.Tensor, cache_start: torch.Tensor, embed_weight: torch.Tensor, cache_len: int,
    cache_filled: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens [B] int64 at cache ``slot`` ([1] int64, on the device), sequences starting at ``cache_start``
    [B] int64, in a cache of ``cache_len`` slots of which ``cache_filled`` ([1] int64, on the device) are
    written -> (x [B, H] = the tokens' rows of ``embed_weight`` [V, H] (NaN for an id outside [0, V)),
    positions [B] = max(slot - cache_start, 0), cache_rows [B] = b * cache_len + slot, kv_end [B] =
    slot + 1; both -1 where the slot is unusable for sequence b: outside [0, cache_len), past
    ``cache_filled``, or before ``cache_start[b]``).

    A slot in the cache and not past ``cache_filled`` sets it (in place) to slot + 1: the step writes
    that slot, and the slots after it, if any, held an older continuation (decoding at an earlier slot
    rolls the sequences back). Any other slot leaves it, so every later step stays poisoned too. B = 0
    changes nothing."""
    return op("decode_step_inputs")(tokens, slot, cache_start, embed_weight, cache_len, cache_filled)
