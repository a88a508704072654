"""The rotary-embedding cos/sin cache, built once per model.

Layout: fp32 [P, D]; row p holds cos(p * inv_freq) in columns [0, D/2) and sin(p * inv_freq) in
[D/2, D). The angles are computed in fp64: at rope_theta 1e7 and positions near 32768, an fp32
product p * inv_freq already loses ~4e-3 rad, which is visible in bf16 attention scores.
"""

from __future__ import annotations

import math
import numbers

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic")


def _positive(value, kind) -> bool:  # an int / a finite real > 0, not a bool
    return (not isinstance(value, bool) and isinstance(value, kind) and value > 0
            and (isinstance(value, numbers.Integral) or math.isfinite(value)))


def rope_type_of(rope_scaling: dict) -> str:
    """The type of an HF rope dict: "rope_type", else the 4.x "type"; null or absent is "default"."""
    rope_type = rope_scaling.get("rope_type")
    if rope_type is None:
        rope_type = rope_scaling.get("type")
    return "default" if rope_type is None else rope_type


def check_rope_scaling(rope_scaling: dict | None) -> tuple[str, float, int | None]:
    """Validates an HF ``rope_parameters``/``rope_scaling`` dict (None or {}: plain RoPE) and returns
    (rope type, linear factor, ``original_max_position_embeddings`` or None). ValueError names the bad
    field; NotImplementedError for what dots1_ext does not support. Dots1Config runs it when a config is
    read, build_cos_sin_cache again, so a bad dict fails at the same place whichever way it came in."""
    if rope_scaling is None:
        return "default", 1.0, None
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling must be a dict (or null), got {rope_scaling!r}")
    nested = sorted(k for k, v in rope_scaling.items() if isinstance(v, dict))
    if nested:
        # transformers reads a dict of dicts as parameters per layer type; its Dots1 model does not.
        raise NotImplementedError(f"rope_scaling: per-layer-type RoPE parameters ({', '.join(map(str, nested))}) "
                                  f"are not supported by dots1_ext")
    rope_type = rope_type_of(rope_scaling)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"rope_scaling type {rope_type!r} is not supported by dots1_ext "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    partial = rope_scaling.get("partial_rotary_factor")
    if partial is not None and not (_positive(partial, numbers.Real) and partial <= 1):
        raise ValueError(f"rope_scaling partial_rotary_factor must be a number in (0, 1] (or null), got {partial!r}")
    if rope_type == "default":
        # transformers' Dots1 default RoPE rotates the whole head whatever partial_rotary_factor says.
        return rope_type, 1.0, None
    if partial is not None and partial != 1:
        raise NotImplementedError(f"rope_scaling partial_rotary_factor={partial!r} != 1 is not supported by dots1_ext")
    factor = rope_scaling.get("factor")
    if not _positive(factor, numbers.Real):
        raise ValueError(f"rope_scaling {rope_type!r} needs a finite factor > 0, got {factor!r}")
    original = rope_scaling.get("original_max_position_embeddings")
    if rope_type == "dynamic" and original is not None and not _positive(original, numbers.Integral):
        raise ValueError(f"rope_scaling original_max_position_embeddings must be a positive integer (or null), "
                         f"got {original!r}")
    return rope_type, float(factor) if rope_type == "linear" else 1.0, original if rope_type == "dynamic" else None


def inv_freq(head_dim: int, rope_theta: float) -> torch.Tensor:
    """fp64 [D/2] inverse frequencies, theta ** (-2i / D)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return 1.0 / (float(rope_theta) ** exponents)


def build_cos_sin_cache(
    head_dim: int,
    max_positions: int,
    rope_theta: float,
    rope_scaling: dict | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Returns the fp32 [max_positions, head_dim] cos/sin cache.

    ``rope_scaling`` is the HF ``rope_parameters``/``rope_scaling`` dict; types "default" (or None)
    and "linear" (positions divided by ``factor``) are supported, and "dynamic" (NTK) as far as it is
    a static table: HF rescales the base only once a sequence outgrows the original
    ``max_position_embeddings``, so up to there it equals "default". ``max_positions`` is taken as
    that original length unless the dict carries ``original_max_position_embeddings``; a dynamic
    cache longer than it raises. Anything else (and ``partial_rotary_factor`` != 1 with "linear" or
    "dynamic") raises, as does a ``rope_theta`` in the dict that differs from ``rope_theta``.
    """
    if not _positive(head_dim, numbers.Integral):
        raise ValueError(f"head_dim must be a positive integer, got {head_dim!r}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    if not _positive(max_positions, numbers.Integral):
        raise ValueError(f"max_positions must be a positive integer, got {max_positions!r}")
    if not _positive(rope_theta, numbers.Real):
        raise ValueError(f"rope_theta must be a finite number > 0, got {rope_theta!r}")
    rope_type, factor, original = check_rope_scaling(rope_scaling)
    inner_theta = rope_scaling.get("rope_theta") if rope_scaling else None
    if inner_theta is not None and inner_theta != rope_theta:
        raise ValueError(f"rope_theta={rope_theta!r} differs from rope_scaling's rope_theta={inner_theta!r}")
    if rope_type == "dynamic":
        if original is None:
            original = max_positions
        if max_positions > original:
            raise NotImplementedError(
                f"rope_scaling type 'dynamic' rescales every position once a sequence exceeds "
                f"{original} tokens, which no static cos/sin cache can hold; build the cache with "
                f"max_positions <= {original}"
            )
    positions = torch.arange(max_positions, dtype=torch.float64) / factor
    angles = positions[:, None] * inv_freq(head_dim, rope_theta)[None, :]
    cache = torch.cat((angles.cos(), angles.sin()), dim=-1).to(torch.float32)
    return cache.to(device) if device is not None else cache
