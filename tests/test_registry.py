"""The op registry: every op has a schema, a kernel or reference for CPU and CUDA, and a fake; in a
CUDA build, every CPU and CUDA kernel is the compiled C++ one (read from the dispatcher itself)."""

import re
from pathlib import Path

import pytest
import torch

import dots1_ext  # noqa: F401  (registers the ops)
from dots1_ext import _C

OPS = [
    "topk_gating",
    "router_topk_gating",
    "permute",
    "unpermute",
    "grouped_gemm",
    "grouped_gemm_int4",
    "rms_norm",
    "add_rms_norm_",
    "qk_norm_rope_",
    "qk_norm_rope_kv_cache_",
    "skinny_gemm",
    "moe_decode_gate_up",
    "moe_decode_down",
    "moe_decode_int4_gate_up",
    "moe_decode_int4_down",
    "decode_attention",
    "qk_norm_rope_decode_attention",
    "decode_step_inputs",
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


def _is_cuda_build() -> bool:
    # A CUDA build of the extension links torch's CUDA library; a CPU-only build does not.
    return b"libc10_cuda.so" in Path(_C.__file__).read_bytes()


def _kernel_source(qualname: str, key: str) -> str | None:
    """Where the dispatcher's kernel for `key` was registered ("path:line"), or None."""
    for line in torch._C._dispatch_dump(qualname).splitlines():
        if line.startswith(f"{key}: registered at "):
            return line[len(f"{key}: registered at "):].split(" ")[0]
    return None


@pytest.mark.parametrize("key", ["CPU", "CUDA"])
@pytest.mark.parametrize("name", OPS)
def test_kernel_is_compiled_cpp(name, key):
    # The Python reference fallback also counts as "a kernel for CUDA", so existence proves nothing:
    # the kernel must have been registered from the extension's C++ sources (csrc/<family>/*.cpp).
    if key == "CUDA" and not _is_cuda_build():
        pytest.skip("CPU-only build of the extension: CUDA runs the reference fallback by design")
    qualname = f"dots1_ext::{name}"
    source = _kernel_source(qualname, key)
    assert source is not None, f"{qualname} has no {key} kernel"
    assert re.search(r"csrc/[\w/]+\.cpp:\d+$", source), f"{qualname}: the {key} kernel comes from {source}, not csrc"
    assert key not in dots1_ext.ops.reference_backed_ops().get(name, []), f"{qualname}: {key} runs the reference"


def test_python_limits_match_the_kernels():
    # Each limit is defined once per language (the C++ constant in its family's header, the Python
    # mirror in ops/<family>.py, which the config and the modules import): a change to one side only
    # would let a bad size reach a kernel, or refuse a good one. This keeps the two in step.
    from dots1_ext.ops import dispatch as dispatch_op
    from dots1_ext.ops import gating as gating_op

    root = Path(__file__).resolve().parent.parent / "csrc"

    def constant(header: str, name: str) -> int:
        match = re.search(rf"constexpr\s+int\s+{name}\s*=\s*(\d+)\s*;", (root / header).read_text())
        assert match, f"{name} not found in csrc/{header}"
        return int(match.group(1))

    assert gating_op.MAX_EXPERTS == constant("gating/gating.h", "kGatingMaxExperts")
    assert gating_op.MAX_TOPK == constant("gating/gating.h", "kGatingMaxTopk")
    assert gating_op.ROUTER_FUSED_MAX_TOKENS == constant("gating/gating.h", "kRouterFusedMaxTokens")
    assert dispatch_op.MAX_EXPERTS == constant("dispatch/dispatch.h", "kPermuteMaxExperts")
    from dots1_ext.ops import attention as attention_op

    assert attention_op.MAX_HEAD_DIM == constant("attention/attention.h", "kAttentionMaxHeadDim")
    from dots1_ext import modules

    assert modules.ROUTER_FUSED_MAX_TOKENS is gating_op.ROUTER_FUSED_MAX_TOKENS
