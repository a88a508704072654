"""Typed wrappers of the dots1_ext custom ops (torch.ops.dots1_ext.*), one module per op family."""

from dots1_ext.ops._lib import reference_backed_ops
from dots1_ext.ops.attention import decode_attention, fused_qk_enabled, qk_norm_rope_decode_attention
from dots1_ext.ops.decode_step_inputs import decode_step_inputs
from dots1_ext.ops.dispatch import permute, permuted_rows, unpermute
from dots1_ext.ops.gating import router_topk_gating, topk_gating
from dots1_ext.ops.grouped_gemm import deinterleave_gate_up, grouped_gemm, interleave_gate_up
from dots1_ext.ops.grouped_gemm_int4 import grouped_gemm_int4
from dots1_ext.ops.moe_decode import moe_decode_down, moe_decode_gate_up
from dots1_ext.ops.moe_decode_int4 import moe_decode_int4_down, moe_decode_int4_gate_up
from dots1_ext.ops.norm import add_rms_norm_, qk_norm_rope_, qk_norm_rope_kv_cache_, rms_norm
from dots1_ext.ops.skinny_gemm import skinny_gemm

__all__ = [
    "add_rms_norm_",
    "decode_attention",
    "decode_step_inputs",
    "deinterleave_gate_up",
    "fused_qk_enabled",
    "grouped_gemm",
    "grouped_gemm_int4",
    "interleave_gate_up",
    "moe_decode_down",
    "moe_decode_gate_up",
    "moe_decode_int4_down",
    "moe_decode_int4_gate_up",
    "permute",
    "permuted_rows",
    "qk_norm_rope_",
    "qk_norm_rope_decode_attention",
    "qk_norm_rope_kv_cache_",
    "reference_backed_ops",
    "rms_norm",
    "router_topk_gating",
    "skinny_gemm",
    "topk_gating",
    "unpermute",
]
