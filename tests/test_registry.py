"""The op registry: every op has a schema, a kernel or reference for CPU and CUDA, and a fake."""

import pytest
import torch

import dots1_ext  # noqa: F401  (registers the ops)

OPS = [
    "topk_gating",
    "router_topk_gating",
    "permute",
    "unpermute",
    "grouped_gemm",
    "rms_norm",
    "add_rms_norm_",
    "qk_norm_rope_",
    "qk_norm_rope_kv_cache_",
]


@pytest.mark.parametrize("name", OPS)
def test_op_has_every_backend(name):
    qualname = f"dots1_ext::{name}"
    assert hasattr(torch.ops.dots1_ext, name), f"{qualname} has no schema"
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key), f"{qualname} has no {key} kernel"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta") or torch._library.simple_registry.singleton.find(
        qualname
    ).fake_impl.kernel is not None, f"{qualname} has no fake kernel"


def test_cpu_ops_are_compiled_not_reference():
    # On CPU every op must run its C++ kernel; only CUDA may fall back to the reference, and only in
    # a CPU-only build.
    backed = dots1_ext.ops.reference_backed_ops()
    assert not [n for n, keys in backed.items() if "CPU" in keys], f"CPU ops running the reference: {backed}"
