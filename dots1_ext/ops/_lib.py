"""Loads the compiled library and fills dispatch gaps with the reference ops.

Every op is defined once, in C++ (csrc/registry.cpp). A backend without a compiled kernel for an op
(a CPU-only build running CUDA tensors, or a kernel not written yet) gets the eager reference as
that backend's implementation of the *same* op, so callers, torch.compile and tests never see two
different ops.
"""

from __future__ import annotations

from typing import Callable

import torch

try:
    from dots1_ext import _C  # noqa: F401  (loading it registers the schemas and kernels)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "dots1_ext._C (the compiled extension) could not be loaded. Build it with "
        "`pip install --no-build-isolation .` from the repository root, against the torch you run with. "
        f"Original error: {exc}"
    ) from exc

NAMESPACE = "dots1_ext"
_FALLBACKS: dict[str, list[str]] = {}


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether the compiled library registered a kernel for ``dots1_ext::op_name`` on ``dispatch_key``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op_name}", dispatch_key)


def fill_with_reference(op_name: str, reference_fn: Callable, check_fn: Callable | None = None) -> None:
    """Registers ``reference_fn`` (after ``check_fn``) for CPU and CUDA where no compiled kernel exists."""
    qualname = f"{NAMESPACE}::{op_name}"

    def impl(*args):
        if check_fn is not None:
            check_fn(*args)
        return reference_fn(*args)

    for key, device in (("CPU", "cpu"), ("CUDA", "cuda")):
        if not has_kernel(op_name, key):
            torch.library.register_kernel(qualname, device, impl)
            _FALLBACKS.setdefault(op_name, []).append(key)


def reference_backed_ops() -> dict[str, list[str]]:
    """{op name: dispatch keys that run the reference} — empty when every kernel is compiled in."""
    return {k: list(v) for k, v in _FALLBACKS.items()}


def op(op_name: str):
    return getattr(torch.ops.dots1_ext, op_name).default
