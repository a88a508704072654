"""Argument checks shared by the Python wrappers, the fake kernels and the reference fallbacks.

They mirror the C++ checks of csrc/<family>/<family>.cpp so an error reads the same whether it is
raised while tracing (fake kernels), on a reference fallback, or by a compiled kernel. Messages name
the argument and the expectation. None of them reads tensor data (no host synchronisation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_dtype(t: torch.Tensor, name: str, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"dots1_ext: {name} must have dtype {_names(allowed)}, got {str(t.dtype).replace('torch.', '')}")


def check_shape(t: torch.Tensor, name: str, expected: Sequence[int | None]) -> None:
    """``expected`` entries of None match any size."""
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"dots1_ext: {name} must have shape {want}, got {list(t.shape)}")


def check_same_device(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"dots1_ext: {name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def check_last_dim_contiguous(t: torch.Tensor, name: str) -> None:
    if t.dim() > 0 and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"dots1_ext: {name} must have a contiguous last dimension, got strides {tuple(t.stride())}")


def check_positive(value: int, name: str) -> None:
    if value <= 0:
        raise ValueError(f"dots1_ext: {name} must be positive, got {value}")


def check_index_range(index: torch.Tensor, name: str, upper: int, what: str) -> None:
    """Host-side range check of an index tensor (reads data: synchronises; wrappers call it only when asked)."""
    if index.numel() == 0:
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= upper:
        raise IndexError(f"dots1_ext: {name} must be in [0, {upper}) ({what}), got values in [{lo}, {hi}]")
