"""The Hugging Face bridge: dots1_ext.modules as drop-ins for transformers' Dots1 modules,
``patch_hf_model`` / ``unpatch_hf_model`` on a transformers Dots1ForCausalLM, and the "dots1_ext"
experts implementation.

Tolerances: fp32 on CPU, relative error norm < 1e-5 against transformers in fp32. On CUDA our side
runs in bf16 and is judged token by token against transformers in fp32, relative to transformers' own
bf16 run on the same inputs (``conftest.assert_parity``: ours <= 2x theirs + 5e-3 per token, no token
exempt).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_parity, hf_dots1_config, rel_err

transformers = pytest.importorskip("transformers")
hf_dots1 = pytest.importorskip("transformers.models.dots1.modeling_dots1")

from dots1_ext import hf as bridge  # noqa: E402
from dots1_ext import modules, ops, parity  # noqa: E402
from dots1_ext.config import Dots1Config  # noqa: E402
from dots1_ext.modules import StepInputs  # noqa: E402
from dots1_ext.rope import build_cos_sin_cache  # noqa: E402

DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
TOL = {"cpu": 1e-5, "cuda": 2e-2}
VOCAB = 96

BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
    n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1,
    max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None, pad_token_id=0,
)

# routed_scaling_factor != 1 everywhere: a shared-expert output scaled by it would fail every case.
CONFIGS = {
    "groups-gqa-attnbias": dict(attention_bias=True),
    "sliding-dense2-mqa": dict(num_hidden_layers=3, first_k_dense_replace=2, sliding_window=4, num_key_value_heads=1,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "nonorm-dense0-tied": dict(norm_topk_prob=False, first_k_dense_replace=0, tie_word_embeddings=True,
                               routed_scaling_factor=1.5, n_group=1, topk_group=1),
    "linear-rope-1shared": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
                                n_shared_experts=1, num_experts_per_tok=2, routed_scaling_factor=0.7),
    # Not in our RoPE table's types: the patched attention takes transformers' (cos, sin) instead.
    "yarn-rope-fallback": dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                                "original_max_position_embeddings": 32}),
}


def hf_config(**overrides):
    return hf_dots1_config(BASE, **overrides)


@torch.no_grad()
def randomize_(module: torch.nn.Module) -> torch.nn.Module:
    """Random weights, norm weights near 1, a wide router (far from ties) and a nonzero
    e_score_correction_bias (transformers initialises it to zero, which would hide a bias bug)."""
    for name, p in module.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif name.endswith("gate.weight"):
            p.normal_(0.0, 0.3)
        else:
            p.normal_(0.0, 0.05)
    for name, b in module.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.normal_(0.0, 0.1)
    return module


def make_hf_model(**overrides):
    return randomize_(transformers.Dots1ForCausalLM(hf_config(**overrides))).eval()


def patched_copy(hf_model, device):
    """A patched copy of ``hf_model`` on ``device`` in DTYPE[device] (patched first, then moved, so the
    move of the RoPE table and the fp32 router bias is exercised)."""
    model = bridge.patch_hf_model(copy.deepcopy(hf_model))
    return model.to(device=device, dtype=DTYPE[device])


def left_padded(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), L), generator=gen)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, L - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


# -- drop-in modules: HF state dicts load into dots1_ext.modules, outputs agree ---------------------
def _step(B, L, D, theta, device):
    S = L
    positions = torch.arange(L, device=device).repeat(B)
    cache_rows = (torch.arange(B, device=device)[:, None] * S + torch.arange(L, device=device)).reshape(-1)
    causal = torch.ones(L, S, dtype=torch.bool, device=device).tril()[None].expand(B, L, S)
    return StepInputs(B, L, S, positions, cache_rows, {None: causal}, build_cos_sin_cache(D, 64, theta, None, device))


def _hf_rope_and_mask(config, B, L):
    x = torch.zeros(B, L, config.hidden_size)
    position_ids = torch.arange(L)[None].expand(B, L)
    cos_sin = hf_dots1.Dots1RotaryEmbedding(config)(x, position_ids)
    mask = torch.full((L, L), float("-inf")).triu(1)[None, None].expand(B, 1, L, L)
    return cos_sin, mask, position_ids


@torch.no_grad()
def test_drop_in_modules_load_hf_state_dicts(device):
    config = hf_config(attention_bias=True)
    ours_config = Dots1Config.from_dict(config.to_dict())
    dtype, tol = DTYPE[device], TOL[device]
    B, L, H, D = 2, 7, config.hidden_size, ours_config.head_dim
    x = torch.randn(B, L, H)
    (cos, sin), mask, position_ids = _hf_rope_and_mask(config, B, L)
    step = _step(B, L, D, ours_config.rope_theta, device)

    def ours_like(hf_module, module):
        hf_module = randomize_(hf_module).eval()
        module.load_state_dict(hf_module.state_dict(), strict=True)
        return hf_module, module.to(device=device, dtype=dtype).eval()

    def to_ours(t):
        return t.to(device=device, dtype=dtype)

    hf_norm, norm = ours_like(hf_dots1.Dots1RMSNorm(H, eps=1e-5), modules.RMSNorm(H, 1e-5))
    assert rel_err(norm(to_ours(x)).float().cpu(), hf_norm(x)) < tol, "RMSNorm"

    hf_mlp, mlp = ours_like(hf_dots1.Dots1MLP(config), modules.Dots1MLP(H, config.intermediate_size))
    assert rel_err(mlp(to_ours(x)).float().cpu(), hf_mlp(x)) < tol, "Dots1MLP"

    hf_moe, moe = ours_like(hf_dots1.Dots1MoE(config), modules.Dots1MoE(ours_config))
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    out = moe(to_ours(x).view(B * L, H)).view(B, L, H)
    assert rel_err(out.float().cpu(), hf_moe(x)) < tol, "Dots1MoE"

    hf_attn, attn = ours_like(hf_dots1.Dots1Attention(config, 0), modules.Dots1Attention(ours_config, 0))
    attn.allocate_cache(B, L, dtype, torch.device(device))
    expected, _ = hf_attn(x, (cos, sin), mask)
    out = attn(to_ours(x).view(B * L, H), step).view(B, L, H)
    assert rel_err(out.float().cpu(), expected) < tol, "Dots1Attention"

    for layer_idx in (0, 1):  # dense MLP, then MoE
        hf_layer, layer = ours_like(hf_dots1.Dots1DecoderLayer(config, layer_idx),
                                    modules.Dots1DecoderLayer(ours_config, layer_idx))
        layer.self_attn.allocate_cache(B, L, dtype, torch.device(device))
        expected = hf_layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=(cos, sin))
        out, residual = layer(to_ours(x).view(B * L, H), None, step)
        out = out if residual is None else out + residual  # the residual stream is x + residual
        assert rel_err(out.view(B, L, H).float().cpu(), expected) < tol, f"Dots1DecoderLayer {layer_idx}"


# -- patch / unpatch -------------------------------------------------------------------------------
def test_patch_swaps_modules_in_place_sharing_weights():
    model = make_hf_model(**CONFIGS["sliding-dense2-mqa"])
    before = model.state_dict(keep_vars=True)
    values = {k: v.detach().clone() for k, v in before.items()}
    norms = sum(type(m) is hf_dots1.Dots1RMSNorm for m in model.modules())
    assert bridge.patch_hf_model(model) is model and bridge.is_patched(model)

    kinds = [type(m) for m in model.modules()]
    assert kinds.count(bridge.PatchedRMSNorm) == norms
    assert kinds.count(bridge.PatchedMoE) == 1 and kinds.count(bridge.PatchedAttention) == 3
    assert not {hf_dots1.Dots1RMSNorm, hf_dots1.Dots1MoE, hf_dots1.Dots1Attention} & set(kinds)
    assert kinds.count(hf_dots1.Dots1MLP) == 2  # dense layers stay transformers' (cuBLAS) ...
    assert kinds.count(modules.Dots1MLP) == 1  # ... the shared experts are ours (the same math, sharing weights)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    # The routed experts' gate_up_proj is repacked in place for the fused SwiGLU: the same Parameter
    # object, and state_dict still returns its HF-layout values.
    gate_up = [k for k in before if k.endswith("mlp.experts.gate_up_proj")]
    assert gate_up and all(m.experts.gate_up_interleaved for m in model.modules() if type(m) is bridge.PatchedMoE)
    assert all(after[k] is before[k] for k in before if k not in gate_up), "patching must share, never copy, the tensors"
    assert all(torch.equal(after[k], values[k]) for k in before)
    (patched_moe,) = [m for m in model.modules() if type(m) is bridge.PatchedMoE]
    assert gate_up == ["model.layers.2.mlp.experts.gate_up_proj"]
    assert patched_moe.experts.gate_up_proj is before[gate_up[0]]

    assert bridge.patch_hf_model(model) is model  # patching twice is a no-op
    assert [type(m) for m in model.modules()] == kinds

    bridge.unpatch_hf_model(model)
    assert not bridge.is_patched(model)
    restored = model.state_dict(keep_vars=True)
    assert list(restored) == list(before) and all(restored[k] is before[k] for k in before)
    assert all(torch.equal(restored[k], values[k]) for k in before), "unpatch restores the HF layout"
    assert {type(m) for m in model.modules()} & {bridge.PatchedRMSNorm, bridge.PatchedMoE, bridge.PatchedAttention} == set()
    assert bridge.unpatch_hf_model(model) is model  # unpatching an unpatched model is a no-op


def test_patch_partial_and_dtype_casts_keep_fp32_tables():
    model = make_hf_model()
    bridge.patch_hf_model(model, norms=False, moe=True, attention=False)
    kinds = {type(m) for m in model.modules()}
    assert bridge.PatchedMoE in kinds and hf_dots1.Dots1RMSNorm in kinds and hf_dots1.Dots1Attention in kinds
    bridge.unpatch_hf_model(model)

    bridge.patch_hf_model(model)
    model.to(torch.bfloat16)
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    bridge.unpatch_hf_model(model)  # the HF router gets back the (fp32) bias that moved with the patched one
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


@pytest.mark.parametrize("case", sorted(CONFIGS))
@torch.no_grad()
def test_patched_logits_match_transformers(case, device):
    hf_model = make_hf_model(**CONFIGS[case])
    ids, mask = left_padded([12, 9, 5])
    expected = hf_model(ids, attention_mask=mask).logits
    model = patched_copy(hf_model, device)
    real = mask.bool()  # padded positions' logits are garbage on both sides
    if device == "cpu":
        out = model(ids, attention_mask=mask).logits
        err = rel_err(out[real], expected[real])
        assert err < TOL[device], f"{case}: logits relative error {err:.2e}"
    else:  # bf16: token by token, no worse than transformers' own bf16 run against the same fp32 logits;
        # our run follows the routing of the patched model in fp32 through near-ties (dots1_ext.parity)
        yardstick = bridge.patch_hf_model(copy.deepcopy(hf_model)).float()  # fp64: transformers NaNs padding rows
        with modules.use_reference_ops(), parity.record_routing() as log:
            yardstick(ids, attention_mask=mask)
        with parity.follow_routing(log) as routing:
            out = model(ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        assert routing.unexplained == 0, routing.summary()
        hf_bf16 = copy.deepcopy(hf_model).to(device=device, dtype=torch.bfloat16)
        theirs = hf_bf16(ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        assert_parity(out[real], theirs[real], expected[real], torch.bfloat16, case)


@torch.no_grad()
def test_unpatch_restores_transformers_exactly():
    model = make_hf_model(**CONFIGS["groups-gqa-attnbias"])
    ids = torch.randint(1, VOCAB, (2, 9))
    expected = model(ids).logits
    bridge.patch_hf_model(model)
    patched = model(ids).logits
    assert rel_err(patched, expected) < 1e-5
    assert not torch.equal(patched, expected)  # our kernels really ran
    bridge.unpatch_hf_model(model)
    assert torch.equal(model(ids).logits, expected)


@torch.no_grad()
def test_shared_experts_output_is_not_scaled():
    config = hf_config(routed_scaling_factor=2.5)
    hf_moe = randomize_(hf_dots1.Dots1MoE(config)).eval()
    x = torch.randn(3, 5, config.hidden_size)
    expected, shared_before = hf_moe(x), hf_moe.shared_experts(x)
    moe = bridge.PatchedMoE.from_hf(hf_moe)
    assert moe.gate.weight is hf_moe.gate.weight and moe.experts.down_proj is hf_moe.experts.down_proj
    assert moe.shared_experts.up_proj.weight is hf_moe.shared_experts.up_proj.weight
    assert moe.shared_experts.is_packed  # gate/up as one weight: the decode ops run the shared experts
    assert torch.equal(hf_moe.shared_experts(x), shared_before)  # the HF module, on the packed slices
    out = moe(x)
    assert out.shape == x.shape and rel_err(out, expected) < 1e-5
    # The test can fail: scaling the shared output as well is far off.
    wrong = expected + (2.5 - 1.0) * hf_moe.shared_experts(x)
    assert rel_err(out, wrong) > 1e-2


@torch.no_grad()
def test_patched_attention_without_position_ids_uses_transformers_cos_sin():
    config = hf_config(num_key_value_heads=1)
    B, L = 2, 6
    (cos, sin), mask, position_ids = _hf_rope_and_mask(config, B, L)
    cos, sin = cos[:1], sin[:1]  # transformers may pass one row of positions for the whole batch
    hf_attn = randomize_(hf_dots1.Dots1Attention(config, 0)).eval()
    x = torch.randn(B, L, config.hidden_size)
    expected, _ = hf_attn(x, (cos, sin), mask)
    bridge.patch_hf_model(hf_attn)
    assert type(hf_attn) is bridge.PatchedAttention
    no_ids, _ = hf_attn(x, (cos, sin), mask)
    with_ids, _ = hf_attn(x, (cos, sin), mask, position_ids=position_ids[:1])
    assert rel_err(no_ids, expected) < 1e-5 and rel_err(with_ids, expected) < 1e-5


@torch.no_grad()
def test_patched_model_is_right_beyond_max_position_embeddings(device):
    # Positions past the config's max_position_embeddings (64 here) are valid for default RoPE in
    # transformers; the patched model must follow it there (it once skipped the rotation silently).
    hf_model = make_hf_model(**CONFIGS["groups-gqa-attnbias"])
    L = BASE["max_position_embeddings"] + 16
    ids = torch.randint(1, VOCAB, (1, L))
    expected = hf_model(ids).logits  # fp32 CPU
    model = patched_copy(hf_model, device)
    out = model(ids.to(device)).logits.float().cpu()
    beyond = slice(BASE["max_position_embeddings"], L)
    if device == "cpu":
        assert rel_err(out[0, beyond], expected[0, beyond]) < 1e-5
    else:
        hf_low = copy.deepcopy(hf_model).to(device=device, dtype=DTYPE[device])
        theirs = hf_low(ids.to(device)).logits.float().cpu()
        assert_parity(out[0, beyond], theirs[0, beyond], expected[0, beyond], DTYPE[device])


@torch.no_grad()
def test_patched_generate_matches_transformers(device):
    hf_model = make_hf_model(**CONFIGS["sliding-dense2-mqa"])
    ids, mask = left_padded([7, 3, 5], seed=1)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    model = patched_copy(hf_model, device)
    result = model.generate(ids.to(device), attention_mask=mask.to(device), output_logits=True,
                            return_dict_in_generate=True, **kw)
    tokens = result.sequences.cpu()
    if device == "cpu":  # fp32: the same greedy tokens as transformers
        expected = hf_model.generate(ids, attention_mask=mask, **kw)
        assert tokens.tolist() == expected.tolist()
    # Every decode step's logits (KV cache, our kernels) against transformers' full forward of the
    # same tokens: robust to a bf16 near-tie choosing another token.
    steps = kw["max_new_tokens"]
    full_mask = torch.cat((mask, torch.ones(len(ids), steps, dtype=torch.long)), dim=1)
    reference = hf_model(tokens, attention_mask=full_mask).logits
    L = ids.shape[1]
    if device == "cpu":
        for n, step_logits in enumerate(result.logits):
            err = rel_err(step_logits.float().cpu(), reference[:, L - 1 + n])
            assert err < TOL[device], f"decode step {n}: relative error {err:.2e}"
        return
    # bf16: the same steps, teacher-forced on those tokens, following the routing of the patched model
    # in fp32 through near-ties (dots1_ext.parity), judged against transformers' own bf16 error.
    yardstick = bridge.patch_hf_model(copy.deepcopy(hf_model)).float()  # fp64: transformers NaNs padding rows
    with modules.use_reference_ops(), parity.record_routing() as log:
        _stepwise_logits(yardstick, tokens, full_mask, L, steps, "cpu")
    with parity.follow_routing(log) as routing:
        ours = _stepwise_logits(model, tokens, full_mask, L, steps, device)
    assert routing.unexplained == 0, routing.summary()
    hf_bf16 = copy.deepcopy(hf_model).to(device=device, dtype=torch.bfloat16)
    theirs = hf_bf16(tokens.to(device), attention_mask=full_mask.to(device)).logits.float().cpu()
    for n, step_logits in enumerate(ours):
        col = L - 1 + n
        assert_parity(step_logits, theirs[:, col], reference[:, col], torch.bfloat16, f"decode step {n}")


def _stepwise_logits(model, tokens, full_mask, L, steps, device) -> list[torch.Tensor]:
    """A prefill of tokens[:, :L], then one token per forward through the KV cache, as generate runs
    them: the last-position logits of each of the ``steps`` forwards."""
    out = model(tokens[:, :L].to(device), attention_mask=full_mask[:, :L].to(device), use_cache=True)
    logits = [out.logits[:, -1]]
    for n in range(1, steps):
        col = L + n - 1
        out = model(tokens[:, col:col + 1].to(device), attention_mask=full_mask[:, :col + 1].to(device),
                    past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits[:, -1])
    return logits


# -- experts implementation ------------------------------------------------------------------------
@pytest.mark.skipif(not bridge.EXPERTS_IMPLEMENTATION_REGISTERED, reason="transformers has no experts interface")
@torch.no_grad()
def test_experts_implementation(device, monkeypatch):
    config = hf_config()
    model = transformers.Dots1ForCausalLM._from_config(config, experts_implementation="dots1_ext")
    assert model.config._experts_implementation == "dots1_ext"
    randomize_(model).eval()
    ids = torch.randint(1, VOCAB, (2, 9))
    model.set_experts_implementation("eager")
    expected = model(ids).logits
    model.set_experts_implementation("dots1_ext")
    model.to(device=device, dtype=DTYPE[device])

    calls = []
    permute = ops.permute
    monkeypatch.setattr(ops, "permute", lambda *args: calls.append(args[1].dtype) or permute(*args))
    out = model(ids.to(device)).logits.float().cpu()
    assert calls == [torch.int32], "the dots1_ext experts forward must run (once per MoE layer), on int32 ids"
    err = rel_err(out, expected)
    assert err < TOL[device], f"logits relative error {err:.2e}"


@pytest.mark.skipif(not bridge.EXPERTS_IMPLEMENTATION_REGISTERED, reason="transformers has no experts interface")
@torch.no_grad()
def test_experts_forward_on_the_hf_experts_module(device):
    config = hf_config(n_routed_experts=16, num_experts_per_tok=4)
    experts = randomize_(hf_dots1.Dots1Experts(config)).eval()
    T, k = 11, 4
    x = torch.randn(T, config.hidden_size)
    ids = torch.stack([torch.randperm(16)[:k] for _ in range(T)])  # int64, as HF routers give them
    ids[0] = torch.tensor([3, 3 + 1, 3 + 2, 3 + 3])
    ids[1:4, 0] = 3  # an expert with many tokens; others get none
    weights = torch.rand(T, k)
    expected = experts(x, ids, weights)  # config._experts_implementation is None: transformers' eager loop
    experts.to(device=device, dtype=DTYPE[device])
    out = bridge.dots1_ext_experts_forward(experts, x.to(device, DTYPE[device]), ids.to(device), weights.to(device))
    assert out.dtype == DTYPE[device]
    assert rel_err(out.float().cpu(), expected) < TOL[device]
    empty = bridge.dots1_ext_experts_forward(experts, x[:0].to(device, DTYPE[device]), ids[:0].to(device),
                                             weights[:0].to(device))
    assert empty.shape == (0, config.hidden_size)


# -- bad input -------------------------------------------------------------------------------------
def test_patch_refuses_models_without_dots1_modules():
    from dots1_ext.model import Dots1ForCausalLM

    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    ours = Dots1ForCausalLM(Dots1Config.from_dict(hf_config().to_dict()), device="meta")
    for model in (torch.nn.Linear(2, 2), llama, ours):
        with pytest.raises(ValueError, match=f"this {type(model).__name__} holds no transformers Dots1 module"):
            bridge.patch_hf_model(model)
        assert not bridge.is_patched(model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module .* got str"):
        bridge.patch_hf_model("abc")
    model = make_hf_model()
    for flag in ("norms", "moe", "attention"):
        with pytest.raises(TypeError, match=f"{flag} must be a bool, got 'no'"):
            bridge.patch_hf_model(model, **{flag: "no"})
    with pytest.raises(ValueError, match="all False: patch_hf_model has nothing to swap"):
        bridge.patch_hf_model(model, norms=False, moe=False, attention=False)
    assert not bridge.is_patched(model) and not any(type(m).__name__.startswith("Patched") for m in model.modules())


def test_patched_model_refuses_autograd():
    # The ops have no autograd: a backward would leave the patched modules' gradients None (torch only
    # warns). The patched modules say so instead, from host-side flags.
    model = bridge.patch_hf_model(make_hf_model()).train()
    ids = torch.randint(1, VOCAB, (2, 5))
    with pytest.raises(RuntimeError, match=r"inference-only.*torch.no_grad\(\).*requires_grad_\(False\)"):
        model(ids).logits.sum().backward()
    with torch.no_grad():
        expected = model(ids).logits
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, expected)
    model.eval()  # eval mode with gradients enabled (a common inference call): runs, as before
    assert torch.equal(model(ids).logits, expected)
    model.train().requires_grad_(False)  # frozen: gradients enabled but none wanted
    assert torch.equal(model(ids).logits, expected)
    moe = next(m for m in model.modules() if type(m) is bridge.PatchedMoE)
    with pytest.raises(RuntimeError, match="PatchedMoE runs dots1_ext ops"):
        moe(torch.randn(3, BASE["hidden_size"], requires_grad=True))


@pytest.mark.skipif(not bridge.EXPERTS_IMPLEMENTATION_REGISTERED, reason="transformers has no experts interface")
def test_experts_implementation_refuses_autograd_and_bad_names():
    experts = randomize_(hf_dots1.Dots1Experts(hf_config()))
    x, ids, weights = torch.randn(4, BASE["hidden_size"]), torch.randint(0, 8, (4, 3)), torch.rand(4, 3)
    with pytest.raises(RuntimeError, match="inference-only.*set_experts_implementation"):
        bridge.dots1_ext_experts_forward(experts, x, ids, weights)
    with torch.no_grad():
        assert bridge.dots1_ext_experts_forward(experts, x, ids, weights).shape == x.shape
    for name in (123, "", None):
        with pytest.raises(TypeError, match="name must be a non-empty str"):
            bridge.register_experts_implementation(name)
