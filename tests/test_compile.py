"""torch.compile and CUDA graphs: every op passes torch.library.opcheck (schema, fake kernel, autograd
registration, AOT dispatch); the MoE block, the model's prefill and decode step and a patched
transformers model compile with fullgraph=True (no graph break at our ops) and match eager; on CUDA
the MoE block and the decode step replay as CUDA graphs (mode="reduce-overhead") on new inputs.

CPU compiles are few and tiny (compiling is slow on small machines): Inductor for the MoE block,
the "aot_eager" backend (Dynamo + fake kernels + AOT functionalisation, no code generation) for the
larger graphs. On CUDA everything uses Inductor.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, requires_cuda
from torch._dynamo.utils import counters

from dots1_ext import ops
from dots1_ext.config import Dots1Config
from dots1_ext.model import build_random_model
from dots1_ext.rope import build_cos_sin_cache

DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
TOL = {"cpu": 1e-5, "cuda": 2e-2}
BACKEND = {"cpu": "aot_eager", "cuda": "inductor"}

CONFIG = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, n_routed_experts=8, n_shared_experts=2,
    num_experts_per_tok=3, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
    first_k_dense_replace=1, max_position_embeddings=64, rms_norm_eps=1e-5, sliding_window=None,
)


def tiny_model(device):
    return build_random_model(Dots1Config(**CONFIG), device=device, dtype=DTYPE[device], seed=0)


def _reference_backed_on_cuda() -> list[str]:
    return [name for name, keys in ops.reference_backed_ops().items() if "CUDA" in keys]


# -- opcheck on every op ---------------------------------------------------------------------------
def _op_cases(device):
    """{case: (op name, args)}, small inputs on ``device``."""
    dt = DTYPE[device]
    T, E, k, H, I, D, Hq, Hk, P = 7, 8, 3, 64, 32, 64, 4, 2, 16

    def randn(*shape, dtype=dt):
        return torch.randn(*shape, device=device, dtype=dtype)

    hidden = randn(T, H)
    bias = 0.1 * randn(E, dtype=torch.float32)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(device=device, dtype=torch.int32)
    permuted, offsets, row_map = ops.permute(hidden, ids, E)
    weights = torch.rand(T, k, device=device)
    q, kk, v = randn(T, Hq, D), randn(T, Hk, D), randn(T, Hk, D)
    positions = torch.randint(0, P, (T,), device=device)
    cos_sin = build_cos_sin_cache(D, P, 10000.0, None, device)
    k_cache, v_cache = randn(2, 8, Hk, D), randn(2, 8, Hk, D)
    cache_rows = torch.randperm(16)[:T].to(device)
    return {
        "topk_gating": ("topk_gating", (randn(T, E, dtype=torch.float32), bias, k, 4, 2, True, 2.5)),
        "router_topk_gating": ("router_topk_gating", (hidden, randn(E, H), bias, k, 4, 2, True, 2.5)),
        "permute": ("permute", (hidden, ids, E, 1)),
        "permute-padded": ("permute", (hidden, ids, E, 4)),
        "grouped_gemm-swiglu": ("grouped_gemm", (permuted, randn(E, 2 * I, H), offsets, "swiglu")),
        "grouped_gemm-swiglu_interleaved": ("grouped_gemm", (permuted, randn(E, 2 * I, H), offsets, "swiglu_interleaved")),
        "grouped_gemm-none": ("grouped_gemm", (randn(T * k, I), randn(E, H, I), offsets, "none")),
        # W4A16 grouped GEMM: bf16 activations on every device, K a multiple of 128.
        "grouped_gemm_int4-swiglu_interleaved": ("grouped_gemm_int4", (
            randn(T * k, 128, dtype=torch.bfloat16), *_int4(E, 2 * 128, 128, device), offsets, "swiglu_interleaved")),
        "grouped_gemm_int4-none-symmetric": ("grouped_gemm_int4", (
            randn(T * k, 128, dtype=torch.bfloat16), *_int4(E, 64, 128, device, symmetric=True), offsets, "none")),
        "unpermute": ("unpermute", (randn(T * k, H), row_map, weights, None, None)),
        "unpermute-shared-residual": ("unpermute", (randn(T * k, H), row_map, weights, randn(T, H), randn(T, H))),
        "rms_norm": ("rms_norm", (hidden, randn(H), 1e-5)),
        "add_rms_norm_": ("add_rms_norm_", (randn(T, H), randn(T, H), randn(H), 1e-5)),
        "qk_norm_rope_": ("qk_norm_rope_", (q, kk, randn(D), randn(D), positions, cos_sin, 1e-5)),
        "qk_norm_rope_kv_cache_": ("qk_norm_rope_kv_cache_", (q.clone(), kk.clone(), v, randn(D), randn(D), positions,
                                                              cos_sin, 1e-5, k_cache, v_cache, cache_rows)),
        "decode_attention": ("decode_attention", (randn(2, Hq, D), k_cache, v_cache,
                                                  torch.tensor([0, 2], device=device), torch.tensor([5, 8], device=device),
                                                  0, D**-0.5)),
        "decode_attention-window": ("decode_attention", (randn(2, Hq, D), k_cache, v_cache,
                                                         torch.tensor([0, 2], device=device),
                                                         torch.tensor([5, 8], device=device), 3, D**-0.5)),
        "qk_norm_rope_decode_attention": ("qk_norm_rope_decode_attention", (
            randn(2, Hq, D), randn(2, Hk, D), randn(2, Hk, D), randn(D), randn(D), torch.tensor([4, 5], device=device),
            cos_sin, 1e-5, k_cache.clone(), v_cache.clone(), torch.tensor([4, 8 + 7], device=device),
            torch.tensor([0, 2], device=device), torch.tensor([5, 8], device=device), 3, D**-0.5)),
        "decode_step_inputs": ("decode_step_inputs", (torch.tensor([3, 1, 7], device=device),
                                                      torch.tensor([6], device=device),
                                                      torch.tensor([0, 2, 6], device=device), randn(16, H), 9,
                                                      torch.tensor([6], device=device))),
        "skinny_gemm-none": ("skinny_gemm", (randn(3, H), randn(2 * I, H), "none")),
        "skinny_gemm-swiglu": ("skinny_gemm", (randn(3, H), randn(2 * I, H), "swiglu")),
        "moe_decode_gate_up": ("moe_decode_gate_up", (hidden, randn(E, 2 * I, H), ids, randn(4 * I, H),
                                                      "swiglu_interleaved")),
        "moe_decode_down": ("moe_decode_down", (randn(T, k * I + 2 * I), randn(E, H, I), ids, weights,
                                                randn(H, 2 * I), randn(T, H))),
        # int4 routed experts: K (H for gate_up, I for down) a multiple of the 128-wide group.
        "moe_decode_int4_gate_up": ("moe_decode_int4_gate_up", (randn(T, 128), *_int4(E, 2 * 128, 128, device), ids,
                                                                randn(4 * I, 128), "swiglu_interleaved")),
        "moe_decode_int4_gate_up-symmetric": ("moe_decode_int4_gate_up", (
            randn(T, 128), *_int4(E, 2 * 128, 128, device, symmetric=True), ids, None, "swiglu")),
        "moe_decode_int4_down": ("moe_decode_int4_down", (randn(T, k * 128 + 2 * I), *_int4(E, H, 128, device), ids,
                                                          weights, randn(H, 2 * I), randn(T, H))),
    }


def _int4(E, N, K, device, symmetric=False):
    """(qweight, scales, zeros) of a random [E, N, K] weight in the int4 format."""
    from dots1_ext.quant import quantize_int4

    q = quantize_int4(torch.randn(E, N, K, device=device) * 0.05, symmetric=symmetric)
    return q.qweight, q.scales, q.zeros


OP_CASES = sorted(_op_cases("cpu"))


def test_every_op_has_an_opcheck_case():
    # Every schema registered by the extension (dir(torch.ops.dots1_ext) lists only packets touched so far).
    schemas = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("dots1_ext::")}
    assert schemas == {op_name for op_name, _ in _op_cases("cpu").values()}


@pytest.mark.parametrize("case", OP_CASES)
def test_opcheck(case, device):
    op_name, args = _op_cases(device)[case]
    torch.library.opcheck(getattr(torch.ops.dots1_ext, op_name).default, args)


# -- torch.compile ---------------------------------------------------------------------------------
@torch.no_grad()
def test_compiled_moe_block_matches_eager(device):
    """dots1_ext.modules.Dots1MoE under Inductor, fullgraph: the GEMM-router path (T > 32) with the
    residual fused into the combine, and on CUDA also the fused-router (decode) path."""
    torch._dynamo.reset()
    moe = tiny_model(device).model.layers[1].mlp
    compiled = torch.compile(moe, fullgraph=True, dynamic=False)
    for T in (40,) if device == "cpu" else (40, 3):
        x = torch.randn(T, CONFIG["hidden_size"], device=device, dtype=DTYPE[device])
        residual = torch.randn_like(x)
        expected = moe(x, residual=residual)
        out = compiled(x, residual=residual)
        assert rel_err(out.float(), expected.float()) < TOL[device], f"T={T}"


@torch.no_grad()
def test_compiled_model_prefill_and_decode_match_eager(device):
    """Dots1Model.forward (the prefill) and Dots1ForCausalLM.decode with a tensor slot, fullgraph."""
    torch._dynamo.reset()
    model = tiny_model(device)
    B, L, S = 2, 20, 32  # T = 40 prefill tokens: the GEMM router; decode T = 2: the fused router
    model.setup_cache(B, S)
    ids = torch.randint(0, CONFIG["vocab_size"], (B, L + 1), device=device)
    slots = torch.arange(L, device=device)
    expected = model.model(ids[:, :L], slots, L)
    k_cache = model.model.layers[1].self_attn.k_cache.clone()
    model.model.layers[1].self_attn.k_cache.zero_()
    out = torch.compile(model.model, fullgraph=True, backend=BACKEND[device])(ids[:, :L], slots, L)
    assert rel_err(out.float(), expected.float()) < TOL[device], "prefill"
    assert rel_err(model.model.layers[1].self_attn.k_cache.float(), k_cache.float()) < TOL[device], "KV cache write"

    slot = torch.tensor(L, device=device)
    expected = model.decode(ids[:, L], slot)
    out = torch.compile(model.decode, fullgraph=True, backend=BACKEND[device])(ids[:, L], slot)
    assert rel_err(out.float(), expected.float()) < TOL[device], "decode"


@torch.no_grad()
def test_compiled_patched_transformers_model_matches_eager(device):
    transformers = pytest.importorskip("transformers")
    from dots1_ext.hf import patch_hf_model

    torch._dynamo.reset()
    keys = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "n_routed_experts", "n_shared_experts",
            "num_experts_per_tok", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor",
            "first_k_dense_replace", "max_position_embeddings", "rms_norm_eps", "sliding_window")
    config = transformers.Dots1Config(**{key: CONFIG[key] for key in keys})
    config._attn_implementation = "sdpa"
    model = transformers.Dots1ForCausalLM(config).eval()
    with torch.no_grad():  # a wide router and a nonzero bias: routing far from ties
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.3)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    patch_hf_model(model).to(device=device, dtype=DTYPE[device])
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 9), device=device)
    expected = model(ids, use_cache=False).logits
    out = torch.compile(model, fullgraph=True, backend=BACKEND[device])(ids, use_cache=False).logits
    assert rel_err(out.float(), expected.float()) < TOL[device]


# -- CUDA graphs -----------------------------------------------------------------------------------
def _skip_if_reference_backed():
    backed = _reference_backed_on_cuda()
    if backed:
        pytest.skip(f"ops still running the eager reference on CUDA (not graph-capturable): {backed}")


@requires_cuda
@torch.no_grad()
def test_moe_block_replays_as_cuda_graph_on_new_inputs():
    _skip_if_reference_backed()
    torch._dynamo.reset()
    counters.clear()
    moe = tiny_model("cuda").model.layers[1].mlp
    compiled = torch.compile(moe, mode="reduce-overhead", fullgraph=True)
    for T in (5, 5, 5, 5, 48, 48, 48):  # warm-up, record, then replays; a second shape records its own graph
        torch.compiler.cudagraph_mark_step_begin()
        x = torch.randn(T, CONFIG["hidden_size"], device="cuda", dtype=torch.bfloat16)
        out = compiled(x).clone()  # the graph's output buffer is reused by the next replay
        assert rel_err(out.float(), moe(x).float()) < TOL["cuda"], f"T={T}"
    assert counters["inductor"]["cudagraph_skips"] == 0, "the MoE block must be captured as a CUDA graph"


@requires_cuda
@torch.no_grad()
def test_decode_step_replays_as_cuda_graph():
    """The static-cache decode step of Dots1ForCausalLM under mode="reduce-overhead", slot advanced as
    a device tensor, against eager decode on a copy of the same cache."""
    _skip_if_reference_backed()
    torch._dynamo.reset()
    counters.clear()
    model, eager = tiny_model("cuda"), tiny_model("cuda")
    B, L, S = 2, 6, 16
    ids = torch.randint(0, CONFIG["vocab_size"], (B, L + 5), device="cuda")
    for m in (model, eager):
        m.setup_cache(B, S)
        m.prefill(ids[:, :L])
    step = torch.compile(model.decode, mode="reduce-overhead", fullgraph=True)
    for n in range(5):
        slot = torch.tensor(L + n, device="cuda")
        torch.compiler.cudagraph_mark_step_begin()
        out = step(ids[:, L + n], slot).clone()
        expected = eager.decode(ids[:, L + n], slot)
        assert rel_err(out.float(), expected.float()) < TOL["cuda"], f"decode step {n}"
    assert counters["inductor"]["cudagraph_skips"] == 0, "the decode step must be captured as a CUDA graph"
