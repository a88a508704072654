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
    cache longer than it raises. Anything else (and ``partial_rotary_factor`` != 1) raises.
    """
    def positive(value, kind) -> bool:  # an int / a finite real > 0, not a bool
        return (not isinstance(value, bool) and isinstance(value, kind) and value > 0
                and (isinstance(value, numbers.Integral) or math.isfinite(value)))

    if not positive(head_dim, numbers.Integral):
        raise ValueError(f"head_dim must be a positive integer, got {head_dim!r}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    if not positive(max_positions, numbers.Integral):
        raise ValueError(f"max_positions must be a positive integer, got {max_positions!r}")
    if not positive(rope_theta, numbers.Real):
        raise ValueError(f"rope_theta must be a finite number > 0, got {rope_theta!r}")
    rope_type = "default"
    factor = 1.0
    if rope_scaling:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise NotImplementedError(
                f"rope_scaling type {rope_type!r} is not supported by dots1_ext "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if float(rope_scaling.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
            raise NotImplementedError("rope_scaling partial_rotary_factor != 1 is not supported by dots1_ext")
        if rope_type == "linear":
            factor = rope_scaling.get("factor")
            if not positive(factor, numbers.Real):
                raise ValueError(f"rope_scaling 'linear' needs a finite factor > 0, got {factor!r}")
            factor = float(factor)
        elif rope_type == "dynamic":
            original = int(rope_scaling.get("original_max_position_embeddings") or max_positions)
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
