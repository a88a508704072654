"""The whole Dots1 model: parity with transformers' Dots1ForCausalLM, KV-cache decode, left padding,
generation, the reference-ops switch, argument checks.

Tolerances, token by token (no token exempt): fp32 on CPU, every token's logits within a relative
error of 1e-5 of the other side. On CUDA the model runs in bf16: against transformers, our error
against its fp32 logits may be at most 2x transformers' own bf16 error (+ 5e-3) on every token
(``conftest.assert_parity``), our run following the fp64 reference's routing through near-ties
(``dots1_ext.parity``: a flip must be explained by the run's own router inputs); two bf16 paths of our own model (decode vs recompute, batched vs alone)
agree within 2e-2 on every token.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_parity, hf_dots1_config, requires_cuda

from dots1_ext import modules, ops
from dots1_ext.config import Dots1Config
from dots1_ext.model import Dots1ForCausalLM, build_random_model, left_pad, reference_ops, sample
from dots1_ext.parity import aligned_logits, per_token_rel_err

DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
TOL = {"cpu": 1e-5, "cuda": 2e-2}

BASE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
    max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None,
)

# Each case is a transformers Dots1Config; together they cover every branch of the architecture.
CONFIGS = {
    "groups-gqa-attnbias": dict(n_group=4, topk_group=2, num_key_value_heads=2, attention_bias=True,
                                norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1),
    "nonorm-dense0-mqa": dict(norm_topk_prob=False, first_k_dense_replace=0, num_key_value_heads=1),
    "sliding-dense2": dict(num_hidden_layers=3, first_k_dense_replace=2, sliding_window=4, norm_topk_prob=True,
                           routed_scaling_factor=2.5,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "tied-headdim-windowrule": dict(tie_word_embeddings=True, head_dim=32, sliding_window=5, max_window_layers=1,
                                    n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.5),
    "linear-rope-1shared": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
                                n_shared_experts=1, num_experts_per_tok=2, norm_topk_prob=True,
                                routed_scaling_factor=0.7, first_k_dense_replace=1),
}


def assert_logits_close(out: torch.Tensor, expected: torch.Tensor, device: str, what: str = "logits") -> None:
    """out, expected [..., V]: every token (row) within TOL[device] relative error; NaN never passes."""
    out, expected = out.float().cpu(), expected.float().cpu()
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    per_token = per_token_rel_err(out, expected)
    off = (per_token >= TOL[device]).nonzero().flatten().tolist()
    assert not off, (f"{what}: tokens {off[:8]} of {per_token.numel()} beyond {TOL[device]:.0e} "
                     f"(max {per_token.max():.2e})")


def assert_matches_transformers(ours: Dots1ForCausalLM, hf, ids: torch.Tensor, expected: torch.Tensor,
                                what: str = "logits") -> None:
    """ours (any device, DTYPE of it) on ids [B, L] vs transformers' fp32 logits ``expected``. fp32:
    every token within 1e-5. bf16: token by token against transformers' own bf16 run on the same inputs
    (assert_parity), our run following the fp64 reference's routing through near-ties (dots1_ext.parity)."""
    device = ours.device.type
    if device == "cpu":
        assert_logits_close(ours(ids), expected, device, what)
        return
    out, _, _, routing = aligned_logits(ours, ids.to(device))
    with torch.no_grad():
        theirs = copy.deepcopy(hf).to(device=device, dtype=ours.dtype)(ids.to(device)).logits
    assert routing.unexplained == 0, f"{what}: {routing.summary()}"
    assert_parity(out, theirs, expected, ours.dtype, what)


def hf_config(**overrides):
    return hf_dots1_config(BASE, **overrides)


@torch.no_grad()
def make_hf_model(seed: int = 0, **overrides):
    """transformers' Dots1ForCausalLM in fp32 with random weights, random norm weights and a nonzero
    e_score_correction_bias (HF initialises it to zero, which would hide a bias bug)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.Dots1ForCausalLM(hf_config(**overrides)).eval()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif name.endswith("mlp.gate.weight"):
            p.normal_(0.0, 0.3)  # wide router logits: routing far from ties
        else:
            p.normal_(0.0, 0.05)
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    for p in model.parameters():  # bf16-representable weights: a bf16 run then differs by activations only
        p.copy_(p.to(torch.bfloat16).float())
    return model


def ours_from_hf(hf_model, device="cpu", dtype=torch.float32) -> Dots1ForCausalLM:
    model = Dots1ForCausalLM(Dots1Config.from_dict(hf_model.config.to_dict()), device=device, dtype=dtype)
    model.load_state_dict(hf_model.state_dict(), strict=True)
    return model.eval()


def tiny_ours(device="cpu", dtype=None, seed=0, **overrides) -> Dots1ForCausalLM:
    kw = {**BASE, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
          "routed_scaling_factor": 2.5, "num_key_value_heads": 2, **overrides}
    return build_random_model(Dots1Config(**kw), device=device, dtype=dtype or DTYPE[device], seed=seed)


# -- config ----------------------------------------------------------------------------------------
def test_config_reads_hf_json(tmp_path):
    raw = {"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
           "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": None, "topk_group": None,
           "first_k_dense_replace": 1, "rope_theta": 1e7, "rope_scaling": None, "sliding_window": 16,
           "max_window_layers": 2, "torch_dtype": "bfloat16", "eos_token_id": [5, 6], "use_sliding_window": False}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = Dots1Config.from_pretrained(tmp_path)
    assert (c.n_group, c.topk_group, c.num_key_value_heads, c.head_dim) == (1, 1, 4, 16)
    assert c.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2  # HF's max_window_layers rule
    assert c.rope_theta == 1e7 and c.rope_scaling is None and c.torch_dtype == "bfloat16"
    assert c.eos_token_ids == [5, 6] and c.extra == {"use_sliding_window": False}
    c.save(tmp_path / "again")
    assert Dots1Config.from_pretrained(tmp_path / "again") == c


def test_config_rope_parameters_and_errors():
    c = Dots1Config.from_dict({"num_hidden_layers": 1, "first_k_dense_replace": 1, "rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                                                          "rope_theta": 123.0}})
    assert c.rope_theta == 123.0 and c.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    with pytest.raises(NotImplementedError, match="yarn"):
        Dots1Config.from_dict({"num_hidden_layers": 1, "first_k_dense_replace": 1, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Dots1Config(num_hidden_layers=1, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="n_group"):
        Dots1Config(num_hidden_layers=1, n_routed_experts=6, num_experts_per_tok=2, n_group=4, topk_group=1)


def test_config_matches_transformers_defaults():
    transformers = pytest.importorskip("transformers")
    hf = transformers.Dots1Config(n_routed_experts=8, num_experts_per_tok=2, num_hidden_layers=3, max_window_layers=1)
    c = Dots1Config.from_dict(hf.to_dict())
    assert c.layer_types == list(hf.layer_types)
    for name in ("hidden_size", "rms_norm_eps", "sliding_window", "norm_topk_prob", "routed_scaling_factor",
                 "first_k_dense_replace", "max_position_embeddings"):
        assert getattr(c, name) == getattr(hf, name), name
    assert c.rope_theta == hf.rope_parameters["rope_theta"]


# -- parity with transformers --------------------------------------------------------------------
def test_state_dict_names_match_transformers():
    hf = make_hf_model(**CONFIGS["groups-gqa-attnbias"])
    ours = Dots1ForCausalLM(Dots1Config.from_dict(hf.config.to_dict()))
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
    assert ours.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


# -- the experts' gate_up layout ----------------------------------------------------------------------
def _gate_up(model, layer=1):
    return model.model.layers[layer].mlp.experts


def test_gate_up_interleaved_state_dict_speaks_hf_layout(device):
    model = tiny_ours(device)  # built like a loaded model: experts packed for the fused SwiGLU
    experts = _gate_up(model)
    assert experts.gate_up_interleaved and experts.gate_up_epilogue == "swiglu_interleaved"
    key = "model.layers.1.mlp.experts.gate_up_proj"
    hf_layout = model.state_dict()[key]
    assert torch.equal(hf_layout, modules.reference.deinterleave_gate_up(experts.gate_up_proj.detach()))

    # Into a model in the HF layout: the same tensors; into an interleaved one: packed on the way in.
    plain = Dots1ForCausalLM(model.config, device=device, dtype=model.dtype).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    assert not _gate_up(plain).gate_up_interleaved
    assert torch.equal(_gate_up(plain).gate_up_proj, hf_layout)
    other = tiny_ours(device, seed=1)
    other.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(_gate_up(other).gate_up_proj, experts.gate_up_proj)
    ids = torch.randint(0, BASE["vocab_size"], (2, 40), device=device)
    out = model(ids)
    assert_logits_close(plain(ids), out, device, "HF layout (unfused SwiGLU) vs interleaved")
    assert torch.equal(other(ids), out)
    with pytest.raises(RuntimeError, match="size mismatch"):  # a wrong shape is still reported
        other.load_state_dict({**model.state_dict(), key: hf_layout[:, :16]})


def test_gate_up_layout_conversions_are_exact_and_in_place():
    model = tiny_ours("cpu")
    experts = _gate_up(model)
    param, packed = experts.gate_up_proj, experts.gate_up_proj.detach().clone()
    with modules.experts_in_hf_layout(model):
        assert not experts.gate_up_interleaved and experts.gate_up_epilogue == "swiglu"
        assert experts.gate_up_proj is param  # converted in place, no second copy
        assert torch.equal(param, modules.reference.deinterleave_gate_up(packed))
        key = "model.layers.1.mlp.experts.gate_up_proj"
        assert model.state_dict(keep_vars=True)[key] is param
    assert experts.gate_up_interleaved and torch.equal(param, packed)
    assert experts.interleave_gate_up_() and torch.equal(param, packed)  # idempotent
    # 2I not a multiple of 16: stays in the HF layout (the unfused SwiGLU path).
    odd = tiny_ours("cpu", moe_intermediate_size=12)
    assert not _gate_up(odd).gate_up_interleaved and _gate_up(odd).gate_up_epilogue == "swiglu"


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_logits_match_transformers(case, device):
    hf = make_hf_model(**CONFIGS[case])
    ids = torch.randint(0, BASE["vocab_size"], (2, 12))  # longer than every sliding window here
    with torch.no_grad():
        expected = hf(ids).logits
    assert_matches_transformers(ours_from_hf(hf, device, DTYPE[device]), hf, ids, expected, case)


def test_greedy_generate_matches_transformers():
    overrides = dict(CONFIGS["sliding-dense2"], num_key_value_heads=2, pad_token_id=0)
    hf = make_hf_model(**overrides)
    ours = ours_from_hf(hf)
    prompts = [[5, 17, 33, 2, 9, 41, 60], [7, 8, 11]]
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                             eos_token_id=None)[:, ids.shape[1]:]
    mine = ours.generate(prompts, max_new_tokens=16, pad_token_id=0)
    assert mine.tolist() == theirs.tolist()

    # eos stops a sequence: afterwards it holds pad tokens, as in transformers.
    eos = theirs[0, 3].item()
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                             eos_token_id=eos)[:, ids.shape[1]:]
    mine = ours.generate(ids, mask, max_new_tokens=16, pad_token_id=0, eos_token_id=eos)
    assert mine.tolist() == theirs.tolist()
    assert (mine[0] == eos).nonzero()[0, 0] <= 3

    # Every sequence stops: the output ends at the step where the last one emitted its eos.
    first_run = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                            eos_token_id=None)[:, ids.shape[1]:]
    eos = sorted({first_run[0, 2].item(), first_run[1, 4].item()})
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                             eos_token_id=eos)[:, ids.shape[1]:]
    mine = ours.generate(ids, mask, max_new_tokens=16, pad_token_id=0, eos_token_id=eos)
    assert mine.tolist() == theirs.tolist() and mine.shape[1] <= 5


# -- KV cache and batching -------------------------------------------------------------------------
def test_decode_matches_full_recompute(device):
    model = tiny_ours(device, num_hidden_layers=3, sliding_window=4,
                      layer_types=["full_attention", "sliding_attention", "full_attention"])
    recompute = copy.deepcopy(model)  # its own cache, so the decode state is never touched
    tokens = torch.randint(0, BASE["vocab_size"], (2, 11), device=device)
    prompt_len = 4
    model.setup_cache(2, 16)
    model.prefill(tokens[:, :prompt_len])
    for slot in range(prompt_len, tokens.shape[1]):  # the window (4) is passed after slot 4
        step = model.decode(tokens[:, slot], slot).float()
        full = recompute(tokens[:, : slot + 1])[:, -1].float()
        if device == "cpu":  # fp32: the same numbers up to summation order
            assert_logits_close(step, full, device, f"slot {slot}")
        else:  # bf16: the decode ops round differently from prefill's; judged against an fp32 run
            gold = recompute.prefill(tokens[:, : slot + 1], upcast=torch.float32)[:, -1]
            assert_parity(step, full, gold, model.dtype, f"slot {slot}")


def test_decode_with_tensor_slot_reads_the_whole_cache(device):
    model = tiny_ours(device)
    tokens = torch.randint(0, BASE["vocab_size"], (1, 6), device=device)
    model.setup_cache(1, 12)
    model.prefill(tokens[:, :5])
    by_int = model.decode(tokens[:, 5], 5).float()
    slot = torch.tensor(5, device=device)  # the CUDA-graph form: the length comes from the device
    by_tensor = model.decode(tokens[:, 5], slot).float()
    assert_logits_close(by_tensor, by_int, device)


def test_left_padding_matches_each_sequence_alone(device):
    model = tiny_ours(device, num_hidden_layers=3, sliding_window=3,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    prompts = [torch.randint(0, BASE["vocab_size"], (n,)).tolist() for n in (7, 2, 5)]
    forced = torch.randint(0, BASE["vocab_size"], (3, 4), device=device)  # teacher-forced decode tokens
    ids, mask = left_pad(prompts, device=device)
    model.setup_cache(3, ids.shape[1] + 4)
    batched = model.prefill(ids, mask).float()
    batched_steps = [model.decode(forced[:, n], ids.shape[1] + n).float() for n in range(4)]
    for b, prompt in enumerate(prompts):
        alone_ids = torch.tensor([prompt], device=device)
        model.setup_cache(1, len(prompt) + 4)
        alone = model.prefill(alone_ids)[0].float()
        assert_logits_close(batched[b, -len(prompt):], alone, device, f"prefill of sequence {b}")
        for n in range(4):
            step = model.decode(forced[b : b + 1, n], len(prompt) + n)[0].float()
            assert_logits_close(batched_steps[n][b], step, device, f"decode step {n} of sequence {b}")
        model.setup_cache(3, ids.shape[1] + 4)


def test_batched_generate_equals_single():
    model = tiny_ours("cpu", num_hidden_layers=2)
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13]]
    batched = model.generate(prompts, max_new_tokens=8)
    for b, prompt in enumerate(prompts):
        assert batched[b].tolist() == model.generate([prompt], max_new_tokens=8)[0].tolist()


def test_prefill_rejects_right_padding_and_small_cache():
    model = tiny_ours("cpu")
    model.setup_cache(2, 8)
    ids = torch.randint(0, BASE["vocab_size"], (2, 4))
    with pytest.raises(ValueError, match="left-padded"):
        model.prefill(ids, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="setup_cache"):
        model.prefill(torch.randint(0, BASE["vocab_size"], (2, 9)))
    with pytest.raises(IndexError, match="outside the KV cache"):
        model.decode(ids[:, 0], 8)


# -- sampling, buffers, reference ops ---------------------------------------------------------------
def test_sampling():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert sample(logits).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, temperature=1.0, top_p=0.6, generator=gen) for _ in range(200)])
    assert set(draws[:, 0].tolist()) <= {1, 3}  # the nucleus of row 0 is {1, 3}
    assert set(draws[:, 0].tolist()) == {1, 3}
    draws = torch.stack([sample(logits, temperature=1.0, generator=gen) for _ in range(400)])
    assert set(draws[:, 0].tolist()) == {0, 1, 2, 3}

    model = tiny_ours("cpu")
    a = model.generate([[1, 2, 3]], max_new_tokens=6, temperature=0.9, top_p=0.9,
                       generator=torch.Generator().manual_seed(3))
    b = model.generate([[1, 2, 3]], max_new_tokens=6, temperature=0.9, top_p=0.9,
                       generator=torch.Generator().manual_seed(3))
    assert a.tolist() == b.tolist() and a.shape == (1, 6)
    assert ((a >= 0) & (a < BASE["vocab_size"])).all()


def test_sample_tiny_temperatures_and_poisoned_rows():
    # logits / t used to overflow to inf - inf = NaN at tiny t (token 0 drawn at t = 1e-39); a poisoned
    # row (NaN, +inf, all -inf) gives -1, never a plausible id; -inf entries beside finite ones are a mask.
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 10
    for t in (1e-39, 1e-30, 1e-6):
        assert torch.equal(sample(logits, temperature=t), logits.argmax(-1)), t
    tied = torch.tensor([[0.0, 2.0, 1.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    assert sample(tied).tolist() == [1, 0]  # greedy ties: the first maximum, as argmax (and HF)
    bad = logits.clone()
    bad[0, 7] = float("nan")
    bad[1, 3] = float("inf")
    bad[2] = float("-inf")
    bad[3, :40] = float("-inf")  # masked, not poisoned
    for t, top_p in ((0.0, 1.0), (1.0, 1.0), (0.7, 0.5), (1e-39, 1.0)):
        tok = sample(bad, temperature=t, top_p=top_p, generator=torch.Generator().manual_seed(1))
        assert tok[:3].tolist() == [-1, -1, -1], (t, top_p, tok)
        assert 40 <= int(tok[3]) < 50, (t, top_p, tok)


def test_generate_gives_minus_one_for_a_poisoned_sequence(device):
    # A NaN embedding row (a stand-in for NaN weights) poisons the sequence whose prompt holds that token:
    # it gets -1 at every step (fed back, -1 keeps it poisoned), the other sequence its normal tokens.
    # The poisoned token must be one the other sequence never reads, or it is rightly poisoned too (on the
    # H200 the clean sequence generated token 5, the first choice); it is picked from a clean run.
    model = tiny_ours(device)
    other = [6, 7, 8, 9]
    first = model.generate([[3, 4, 5], other], max_new_tokens=5, cuda_graphs=False)
    poison = next(t for t in range(10, model.config.vocab_size) if t not in first[1].tolist())
    prompts = [[3, 4, poison], other]
    clean = model.generate(prompts, max_new_tokens=5, cuda_graphs=False)
    assert poison not in clean[1].tolist() + other, (poison, clean)
    model.model.embed_tokens.weight.data[poison] = float("nan")
    modes = (False, True) if device == "cuda" else (False,)
    for cuda_graphs in modes:
        for temperature in (0.0, 0.8):
            out = model.generate(prompts, max_new_tokens=5, temperature=temperature,
                                 cuda_graphs=cuda_graphs, generator=torch.Generator(device).manual_seed(0))
            assert out[0].tolist() == [-1] * 5, (cuda_graphs, temperature, out)
            if temperature == 0:
                assert out[1].tolist() == clean[1].tolist(), (cuda_graphs, out)


def test_left_pad_rejects_what_is_not_token_ids():
    ids, mask = left_pad([torch.tensor([1, 2]), [3]], pad_id=0)  # tensors rows and lists
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[1, 1], [0, 1]]
    for bad, match in (([], "non-empty list"), ("ab", "non-empty list"), ([[]], "sequence 0 must be a non-empty"),
                       ([[1, 2], []], "sequence 1 must be a non-empty"), ([[1.5, 2]], "holds 1.5"),
                       ([[True, 2]], "holds True"), ([[2**70]], "beyond int64"), ([1, 2], "sequence 0")):
        with pytest.raises(ValueError, match=match):
            left_pad(bad)
    for pad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="pad_id"):
            left_pad([[1]], pad_id=pad)


def test_model_builders_reject_bad_arguments(tmp_path):
    from dots1_ext.loader import load_model, save_checkpoint
    from dots1_ext.model import init_random_weights_, upcast_copy

    config = Dots1Config(**{**BASE, "first_k_dense_replace": 1})
    with pytest.raises(TypeError, match="Dots1Config"):
        Dots1ForCausalLM(dict(BASE))
    with pytest.raises(TypeError, match="Dots1Config"):
        build_random_model(dict(BASE))
    dense = Dots1Config(**{**BASE, "first_k_dense_replace": BASE["num_hidden_layers"]})
    with pytest.raises(ValueError, match="no MoE layers"):
        build_random_model(dense, experts="int4")
    for dtype in (torch.int32, torch.float64):
        with pytest.raises(ValueError, match="dtype"):
            build_random_model(config, dtype=dtype)
    with pytest.raises(ValueError, match="meta"):
        build_random_model(config, device="meta")
    for seed in (2**70, 1.5, "a", -1, True):
        with pytest.raises(ValueError, match="seed"):
            build_random_model(config, seed=seed)
    with pytest.raises(TypeError, match="Dots1ForCausalLM"):
        init_random_weights_(torch.nn.Linear(2, 2))
    model = build_random_model(config)
    for dtype in (torch.int32, "float64"):
        with pytest.raises(ValueError, match="floating-point"):
            upcast_copy(model.lm_head, dtype)
    # A model holding a range of the experts runs only under expert parallelism: an error, not NaN logits.
    save_checkpoint(model, tmp_path)
    part = load_model(tmp_path, experts=(0, 4), progress=False)
    with pytest.raises(RuntimeError, match=r"holds routed experts \[0, 4\) of 8"):
        part(torch.tensor([[1, 2, 3]]))


def test_fp32_buffers_survive_dtype_casts():
    model = tiny_ours("cpu", dtype=torch.float32)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias.clone()
    model.setup_cache(1, 8)
    model.to(torch.bfloat16)
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(model.model.layers[1].mlp.gate.e_score_correction_bias, bias)
    assert model.model.cos_sin_cache.dtype == torch.float32
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.bfloat16


def test_reference_ops_switch(device):
    model = tiny_ours(device)
    ids = torch.randint(0, BASE["vocab_size"], (2, 40), device=device)  # > 32 tokens: the GEMM router path
    out = model(ids).float()
    with reference_ops():
        assert modules.ops is modules.REFERENCE_OPS
        ref = model(ids).float()
    assert modules.ops is ops
    with pytest.raises(RuntimeError), reference_ops():
        raise RuntimeError
    assert modules.ops is ops  # restored on errors too
    assert_logits_close(out, ref, device)


@torch.no_grad()
@pytest.mark.parametrize("T", [1, 16, 17, 32, 33, 64, 65])
def test_moe_layer_path_by_token_count(device, T, monkeypatch):
    # Up to modules.MOE_DECODE_MAX_TOKENS (INT4_MOE_DECODE_MAX_TOKENS with int4 experts) a MoE layer runs
    # the two decode ops, above it permute + grouped GEMMs; either way the reference's result (the int4
    # layer's values: test_quant).
    model = tiny_ours(device, hidden_size=128, moe_intermediate_size=128)  # int4: K a multiple of 128
    moe = model.model.layers[1].mlp
    int4_moe = modules.quantize_experts_(copy.deepcopy(model)).model.layers[1].mlp
    assert isinstance(moe, modules.Dots1MoE) and isinstance(int4_moe.experts, modules.Dots1Int4Experts)
    calls = []
    for name in ("moe_decode_gate_up", "moe_decode_int4_gate_up"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    x = torch.randn(T, 128, device=device, dtype=DTYPE[device])
    residual = torch.randn_like(x)
    out = moe(x, residual=residual).float()
    int4_moe(x, residual=residual)
    expected = ["moe_decode_gate_up"] if T <= modules.MOE_DECODE_MAX_TOKENS else []
    expected += ["moe_decode_int4_gate_up"] if T <= modules.INT4_MOE_DECODE_MAX_TOKENS else []
    assert calls == expected, (T, calls)
    with reference_ops():
        ref = moe(x, residual=residual).float()
    assert_logits_close(out, ref, device, f"MoE layer T={T}")


@requires_cuda
def test_cuda_decode_step_does_not_synchronise():
    backed = [name for name, keys in ops.reference_backed_ops().items() if "CUDA" in keys]
    assert not backed, f"ops still running the eager reference on CUDA: {backed}"
    model = tiny_ours("cuda")
    tokens = torch.randint(0, BASE["vocab_size"], (2, 6), device="cuda")
    model.setup_cache(2, 16)
    model.prefill(tokens)
    slot = torch.tensor(6, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.decode(tokens[:, -1], slot)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_graph_generate_equals_eager(batch):
    model = tiny_ours("cuda")
    prompts = [torch.randint(1, BASE["vocab_size"], (n,)).tolist() for n in (5, 9, 2)[:batch]]
    eager = model.generate(prompts, max_new_tokens=12, cuda_graphs=False)
    graphed = model.generate(prompts, max_new_tokens=12, cuda_graphs=True)
    assert graphed.tolist() == eager.tolist()
    # Logits of a replayed step equal the eager step's at the same slot.
    graphs = model.decode_graphs()
    tok = eager[:, -1]
    ref = model.decode(tok, 10).clone()
    out = graphs(tok, 10)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # An eos inside the graph loop: the same tokens, pads after it, the same cut, as the eager loop.
    eos = int(eager[0, 3])
    with_eos = model.generate(prompts, max_new_tokens=12, eos_token_id=eos, pad_token_id=0, cuda_graphs=False)
    assert model.generate(prompts, max_new_tokens=12, eos_token_id=eos, pad_token_id=0).tolist() == with_eos.tolist()
    # A reallocated cache invalidates the captured graphs rather than replaying stale addresses.
    model.setup_cache(batch, 64)
    again = model.generate(prompts, max_new_tokens=12, cuda_graphs=True)
    assert again.tolist() == eager.tolist()


# -- cache reuse, bad indices, bad arguments -------------------------------------------------------
def test_generate_reuses_a_growing_cache():
    # Alternating request lengths must neither shrink nor reallocate the cache each call: a
    # reallocation invalidates the decode graphs and put a capture inside every timed generate.
    model = tiny_ours("cpu")
    prompts = [[3, 4, 5, 6], [7, 8]]
    model.generate(prompts, max_new_tokens=2)
    first = model.model.layers[0].self_attn.k_cache
    assert model.model.cache_shape == (2, 6)
    model.generate(prompts, max_new_tokens=5)  # longer: grows geometrically (at least doubles)
    grown = model.model.layers[0].self_attn.k_cache
    assert grown.data_ptr() != first.data_ptr() and model.model.cache_shape == (2, 12)
    for n in (2, 8, 3):  # every later request that fits reuses it
        model.generate(prompts, max_new_tokens=n)
        assert model.model.layers[0].self_attn.k_cache.data_ptr() == grown.data_ptr()
    model.generate([[3, 4, 5]], max_new_tokens=2)  # another batch size: new cache, never fewer slots
    assert model.model.cache_shape == (1, 12)


def test_setup_cache_warns_past_max_position_embeddings():
    # Positions past the config's max_position_embeddings are computed (RoPE extrapolates, as in
    # transformers) but lie outside what the model was trained on: said once, at setup_cache.
    model = tiny_ours("cpu", max_position_embeddings=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.setup_cache(1, 16)
    with pytest.warns(UserWarning, match="17 slots pass max_position_embeddings \\(16\\)"):
        model.setup_cache(1, 17)
    assert model.model.cache_shape == (1, 17)


def test_dynamic_rope_cache_past_max_position_embeddings_raises():
    # transformers' dynamic RoPE rescales once a sequence passes config.max_position_embeddings; a static
    # table cannot, so a longer cache is an error (it was the default table, silently) and the old cache stays.
    model = tiny_ours("cpu", max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    model.setup_cache(1, 16)
    before = model.model.layers[0].self_attn.k_cache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the max_position_embeddings warning
        with pytest.raises(NotImplementedError, match="exceeds 16 tokens"):
            model.setup_cache(1, 17)
    assert model.model.layers[0].self_attn.k_cache is before and model.model.cache_shape == (1, 16)


@requires_cuda
def test_second_generate_captures_no_graph():
    model = tiny_ours("cuda")
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    first, second, shorter = {}, {}, {}
    out = model.generate(prompts, max_new_tokens=16, timings=first)
    assert first["graph_captures"] >= 1
    again = model.generate(prompts, max_new_tokens=16, timings=second)
    assert second["graph_captures"] == 0 and again.tolist() == out.tolist()
    model.generate(prompts, max_new_tokens=4, timings=shorter)
    assert shorter["graph_captures"] == 0
    assert model.decode_graphs().replay_ms(iters=5) > 0


@requires_cuda
def test_greedy_graph_keeps_the_eos_ids_it_captured():
    # The greedy graph compares each token with the eos ids it captured, at every replay. They were a
    # tensor made per generate call, freed after the capturing call; the next call's graph read whatever
    # the allocator put there (on the H200 the README job stopped at a token that was not an eos). Here the
    # freed small blocks are filled with a token the sequence emits, which would then read as its eos.
    model = tiny_ours("cuda")
    prompts = [[3, 4, 5, 6, 7]]
    clean = model.generate(prompts, max_new_tokens=16, eos_token_id=[], cuda_graphs=False)[0].tolist()
    eos = next(t for t in range(10, BASE["vocab_size"]) if t not in clean)
    out = model.generate(prompts, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)
    assert out[0].tolist() == clean
    filler = [torch.full((1,), clean[3], dtype=torch.long, device="cuda") for _ in range(512)]
    again = model.generate(prompts, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)
    assert again[0].tolist() == clean, (again, clean[3])
    del filler


@requires_cuda
def test_release_graphs_destroys_them_and_the_next_decode_captures_anew():
    model = tiny_ours("cuda")
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    out = model.generate(prompts, max_new_tokens=6)
    graphs = model.decode_graphs()
    captured = list(graphs.graphs.values())
    assert captured
    model.release_graphs()
    assert graphs.graphs == {} and graphs.last_key is None
    with pytest.raises(RuntimeError):  # the released graph is gone, not merely forgotten
        captured[0][0].replay()
    timings = {}
    again = model.generate(prompts, max_new_tokens=6, timings=timings)
    assert timings["graph_captures"] >= 1 and again.tolist() == out.tolist()
    model.release_graphs()
    model.release_graphs()  # twice, and on a model that never decoded: no-ops
    tiny_ours("cuda").release_graphs()


def _caches(model):
    return [(layer.self_attn.k_cache.clone(), layer.self_attn.v_cache.clone()) for layer in model.model.layers]


@pytest.mark.parametrize("bad_slot", ["S", "-1"])
def test_tensor_slot_outside_the_cache_never_aliases_another_sequence(device, bad_slot):
    # The graph form takes the slot as a device tensor, unchecked on the host. Row b*S + slot for
    # slot >= S is sequence b+1's slot 0: it must not be written, and the step must not return numbers.
    model = tiny_ours(device)
    B, S = 2, 8
    model.setup_cache(B, S)
    tokens = torch.randint(0, BASE["vocab_size"], (B, 4), device=device)
    model.prefill(tokens)
    before = _caches(model)
    slot = torch.tensor(S if bad_slot == "S" else -1, device=device)
    try:
        logits = model.decode(tokens[:, -1], slot)
    except (RuntimeError, ValueError, IndexError) as exc:  # a backend may refuse instead of poisoning
        assert "row" in str(exc) or "slot" in str(exc) or "position" in str(exc), exc
    else:
        assert torch.isnan(logits).all(), "an out-of-range slot must poison the logits with NaN"
    for (k0, v0), (k1, v1) in zip(before, _caches(model)):
        assert torch.equal(k0, k1) and torch.equal(v0, v1), "no cache row may be written"


def test_decode_past_the_written_slots_raises_or_poisons(device):
    # Slots [0, cache_filled) hold keys (the prefill's, then one per step). A step past them would attend
    # over rows no step wrote: an int slot raises while the host knows the count; a tensor slot (the
    # graph form, unchecked on the host) gives NaN logits and writes nothing, and so do the steps after it
    # until a usable one; an earlier slot rolls back.
    model = tiny_ours(device)
    B, S = 2, 16
    model.setup_cache(B, S)
    tokens = torch.randint(0, BASE["vocab_size"], (B, 12), device=device)
    model.prefill(tokens[:, :4])
    assert model.model.cache_filled_host == 4 and int(model.model.cache_filled) == 4
    before = _caches(model)
    with pytest.raises(IndexError, match="past the 4 cache slots written so far.*next slot is 4"):
        model.decode(tokens[:, 4], 5)
    assert model.model.cache_filled_host == 4 and int(model.model.cache_filled) == 4
    step4 = model.decode(tokens[:, 4], 4)
    assert torch.isfinite(step4).all() and model.model.cache_filled_host == 5 and int(model.model.cache_filled) == 5
    before = _caches(model)
    for slot in (7, 6):  # slot 5 unwritten; slot 6 after the poisoned step 7 is still past the written ones
        logits = model.decode(tokens[:, slot], torch.tensor(slot, device=device))
        assert torch.isnan(logits).all(), f"tensor slot {slot} past the written slots must poison every sequence"
        assert model.model.cache_filled_host is None and int(model.model.cache_filled) == 5
    for (k0, v0), (k1, v1) in zip(before, _caches(model)):
        assert torch.equal(k0, k1) and torch.equal(v0, v1), "a poisoned step must write no cache row"
    assert torch.isnan(model.decode(tokens[:, 9], 9)).all()  # an int slot, now that only the device knows
    assert model.model.cache_filled_host is None
    step5 = model.decode(tokens[:, 5], torch.tensor(5, device=device))
    assert torch.isfinite(step5).all() and int(model.model.cache_filled) == 6
    # Rolling back to slot 4 gives the step-4 logits again and forgets slot 5.
    model.prefill(tokens[:, :4])
    torch.testing.assert_close(model.decode(tokens[:, 4], 4), step4, rtol=0, atol=0)
    model.decode(tokens[:, 5], 5)
    model.decode(tokens[:, 2], 2)
    assert model.model.cache_filled_host == 3 and int(model.model.cache_filled) == 3
    with pytest.raises(IndexError, match="past the 3 cache slots"):
        model.decode(tokens[:, 4], 4)
    # A shorter prompt after a longer request: the longer request's rows are stale.
    model.prefill(tokens[:, :10])
    model.decode(tokens[:, 10], 10)
    model.prefill(tokens[:, :3])
    with pytest.raises(IndexError, match="past the 3 cache slots"):
        model.decode(tokens[:, 10], 10)
    assert torch.isnan(model.decode(tokens[:, 10], torch.tensor(10, device=device))).all()
    # The upcast decode (Dots1Model.forward's other decode path) reads the same count.
    model.prefill(tokens[:, :3])
    ids = tokens[:, 3:4]
    assert torch.isfinite(model.model(ids, torch.tensor([3], device=device), S, upcast=torch.float32)).all()
    assert torch.isnan(model.model(ids, torch.tensor([4], device=device), S, upcast=torch.float32)).all()
    assert int(model.model.cache_filled) == 3, "an upcast run writes its copies' caches, not the model's"
    # A continuation may start at the written end, not past it.
    with pytest.raises(ValueError, match="start_slot 4: only slots \\[0, 3\\) of the cache are written"):
        model.prefill(tokens[:, 4:6], start_slot=4)
    model.prefill(tokens[:, 3:5], start_slot=3)
    assert model.model.cache_filled_host == 5 and int(model.model.cache_filled) == 5


def test_decode_into_a_sequences_padding_poisons_that_sequence(device):
    # Rolling a left-padded batch back to a slot before one sequence's first real token: that sequence
    # has no keys there (the empty range would attend to nothing and give a plausible zero): NaN for it
    # alone; at its first real slot it attends to itself only, a number.
    model = tiny_ours(device)
    ids, mask = left_pad([[3, 4, 5, 6, 7], [8, 9]], device=device)  # cache_start [0, 3]
    model.setup_cache(2, 8)
    model.prefill(ids, mask)
    tokens = torch.tensor([10, 11], device=device)
    for slot in (2, torch.tensor(2, device=device), 0):
        logits = model.decode(tokens, slot)
        assert torch.isfinite(logits[0]).all() and torch.isnan(logits[1]).all(), slot
    model.prefill(ids, mask)
    assert torch.isfinite(model.decode(tokens, 3)).all()


@requires_cuda
def test_graphs_check_and_poison_slots_past_the_written_ones():
    model = tiny_ours("cuda")
    B, S = 2, 32
    model.setup_cache(B, S)
    tokens = torch.randint(0, BASE["vocab_size"], (B, 20), device="cuda")
    model.prefill(tokens[:, :6])
    graphs = model.decode_graphs()
    with pytest.raises(IndexError, match="past the 6 cache slots"):
        graphs(tokens[:, 7], 7)
    with pytest.raises(IndexError, match="past the 6 cache slots"):
        graphs.greedy_decode(tokens[:, 7], torch.zeros(B, dtype=torch.bool, device="cuda"), 7, 3, 0, ())
    ref = model.decode(tokens[:, 6], 6).clone()
    out = graphs(tokens[:, 6], 6).clone()  # slot 6 again: the cache holds [0, 7), the step rolls back to 7
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert model.model.cache_filled_host == 7 and int(model.model.cache_filled) == 7
    picked = graphs.greedy_decode(tokens[:, 7], torch.zeros(B, dtype=torch.bool, device="cuda"), 7, 4, 0, ())
    assert picked.shape == (B, 4) and model.model.cache_filled_host == 11 and int(model.model.cache_filled) == 11
    # Once only the device knows the count (a tensor-slot decode), a replay past it comes out NaN.
    model.decode(tokens[:, 11], torch.tensor(11, device="cuda"))
    assert model.model.cache_filled_host is None
    assert torch.isnan(graphs(tokens[:, 14], 14)).all() and int(model.model.cache_filled) == 12
    assert model.model.cache_filled_host is None
    assert torch.isfinite(graphs(tokens[:, 12], 12)).all() and int(model.model.cache_filled) == 13


def test_decode_token_outside_the_vocabulary_poisons_only_its_sequence(device):
    model = tiny_ours(device)
    model.setup_cache(2, 8)
    model.prefill(torch.randint(0, BASE["vocab_size"], (2, 3), device=device))
    tokens = torch.tensor([5, BASE["vocab_size"] + 7], device=device)
    logits = model.decode(tokens, 3)
    assert torch.isfinite(logits[0]).all() and torch.isnan(logits[1]).all()


@pytest.mark.parametrize("bad, match", [
    (dict(input_ids=[]), "empty batch"),
    (dict(input_ids=[[]]), "empty"),
    (dict(input_ids=[[3, 4], []]), r"prompts \[1\] are empty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-5), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=-1.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(pad_token_id=BASE["vocab_size"]), "pad_token_id"),
    (dict(pad_token_id=-1), "pad_token_id"),
    (dict(eos_token_id=BASE["vocab_size"] + 1), "eos_token_id"),
    (dict(input_ids=[[3, BASE["vocab_size"]]]), "input_ids: token id 96"),
    (dict(input_ids=[[-1, 4]]), "input_ids: token id -1"),
    (dict(input_ids=[[3.7, 4.2]]), "token ids must be integers, got 3.7"),
    (dict(input_ids=[[True, 4]]), "token ids must be integers, got True"),
    (dict(input_ids=torch.tensor([3, 4, 5])), r"non-empty \[batch, length\] tensor"),
    (dict(input_ids=torch.zeros(0, 3, dtype=torch.long)), r"non-empty \[batch, length\] tensor"),
    (dict(pad_token_id=1.5), "pad_token_id must be an int"),
    (dict(pad_token_id=True), "pad_token_id must be an int"),
    (dict(eos_token_id=2.5), "eos_token_id must be an int"),
    (dict(eos_token_id="2"), "eos_token_id must be an int"),
    (dict(temperature=True), "temperature"),
    (dict(top_p=True), "top_p"),
])
def test_generate_rejects_bad_arguments(bad, match):
    model = tiny_ours("cpu")
    kwargs = dict(input_ids=[[3, 4, 5]], max_new_tokens=3)
    kwargs.update(bad)
    with pytest.raises(ValueError, match=match):
        model.generate(**kwargs)


def test_decode_rejects_bad_tokens_and_slots(device):
    # Host-side metadata checks only (no synchronisation): the type of tokens and slot, the cache.
    model = tiny_ours(device)
    tokens = torch.tensor([3, 4], device=device)
    with pytest.raises(ValueError, match="setup_cache"):
        model.decode(tokens, 0)
    model.setup_cache(2, 8)
    model.prefill(torch.randint(0, BASE["vocab_size"], (2, 3), device=device))
    for bad_tokens in (tokens.float() + 0.7, tokens.bool(), tokens.to(torch.uint8), [3, 4]):
        with pytest.raises(TypeError, match="tokens must be an integer tensor"):
            model.decode(bad_tokens, 3)
    for bad_slot in (True, 3.0, torch.tensor(3.9, device=device), torch.tensor([3, 4], device=device), "3"):
        with pytest.raises(TypeError, match="slot must be an int or a one-element integer tensor"):
            model.decode(tokens, bad_slot)
    a = model.decode(tokens, 3)
    b = model.decode(tokens.int(), torch.tensor(3, device=device))  # int32 tokens, a 0-d tensor slot
    c = model.decode(tokens, np.int64(3))  # a numpy integer slot
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_prefill_rejects_bad_tokens_and_masks(device):
    model = tiny_ours(device)
    model.setup_cache(2, 8)
    ids = torch.randint(0, BASE["vocab_size"], (2, 4), device=device)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.prefill(ids.masked_fill(ids == ids[0, 0], BASE["vocab_size"]))
    with pytest.raises(ValueError, match="integer token ids"):
        model.prefill(ids.float())
    with pytest.raises(ValueError, match=r"sequences \[1\] have no real token"):
        model.prefill(ids, torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0]], device=device))
    with pytest.raises(ValueError, match="shape of input_ids"):
        model.prefill(ids, torch.ones(2, 3, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="empty"):
        model.prefill(ids[:, :0])
    ones = torch.ones(2, 4, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="only 0 and 1"):
        model.prefill(ids, ones * 2)
    with pytest.raises(ValueError, match="0 / 1"):
        model.prefill(ids, ones.float() * 0.5)
    torch.testing.assert_close(model.prefill(ids, ones.bool()), model.prefill(ids, ones), rtol=0, atol=0)
    for bad in ((True, 8), (2, 8.0), (0, 8)):
        with pytest.raises(ValueError, match="setup_cache needs integers"):
            model.setup_cache(*bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_rule_separates_rounding_from_bugs(dtype):
    # The rule of dots1_ext.parity: the right model passes in fp32 and bf16; a wrong
    # routed_scaling_factor in the ops fails; so does an error planted in one token of one sequence.
    from dots1_ext.parity import logits_parity

    model = tiny_ours("cpu", dtype=dtype, num_hidden_layers=3)
    prompts = [torch.randint(0, BASE["vocab_size"], (n,)).tolist() for n in (12, 7, 9)]
    result = logits_parity(model, prompts)
    assert result.passed, result.summary()

    broken = dict(vars(modules.REFERENCE_OPS))
    good_router, good_unpermute = broken["router_topk_gating"], broken["unpermute"]
    good_topk = broken["topk_gating"]
    broken["router_topk_gating"] = lambda h, w, b, k, ng=1, tg=1, renorm=True, scale=1.0: good_router(
        h, w, b, k, ng, tg, renorm, scale * 0.8)
    broken["topk_gating"] = lambda logits, b, k, ng=1, tg=1, renorm=True, scale=1.0: good_topk(
        logits, b, k, ng, tg, renorm, scale * 0.8)
    ns = type(modules.REFERENCE_OPS)
    with modules.use_ops(ns(**broken)):
        assert not logits_parity(model, prompts).passed
    no_bias = dict(vars(modules.REFERENCE_OPS))  # picks experts without e_score_correction_bias
    no_bias["router_topk_gating"] = lambda h, w, b, k, ng=1, tg=1, renorm=True, scale=1.0: good_router(
        h, w, torch.zeros_like(b), k, ng, tg, renorm, scale)
    no_bias["topk_gating"] = lambda logits, b, k, ng=1, tg=1, renorm=True, scale=1.0: good_topk(
        logits, torch.zeros_like(b), k, ng, tg, renorm, scale)
    with modules.use_ops(ns(**no_bias)):
        result = logits_parity(model, prompts)
    assert not result.passed and result.routing.unexplained > 0, result.summary()

    def unpermute_last_token_off(*a, **kw):
        y = good_unpermute(*a, **kw)
        y[-1] += 0.05 * y[-1].abs().mean()  # the last token of the last sequence, last MoE layer only
        return y

    with modules.use_ops(ns(**{**vars(modules.REFERENCE_OPS), "unpermute": unpermute_last_token_off})):
        result = logits_parity(model, prompts)
    assert not result.passed and result.bad_tokens.tolist()[-1] == result.ours_err.numel() - 1, result.summary()


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_chunked_prefill_equals_one_pass(device, chunk):
    # Chunks attend to the cache the earlier chunks wrote: the same logits as one pass, with left
    # padding and a sliding window smaller than the prompt, then the same decode step.
    model = tiny_ours(device, num_hidden_layers=3, sliding_window=4,
                      layer_types=["full_attention", "sliding_attention", "full_attention"])
    prompts = [torch.randint(0, BASE["vocab_size"], (n,)).tolist() for n in (11, 6)]
    ids, mask = left_pad(prompts, device=device)
    model.setup_cache(2, ids.shape[1] + 1)
    whole = model.prefill(ids, mask).float()
    step = model.decode(ids[:, -1], ids.shape[1]).float()
    chunked = model.prefill(ids, mask, chunk_size=chunk).float()
    chunked_step = model.decode(ids[:, -1], ids.shape[1]).float()
    real = mask.bool()
    assert_logits_close(chunked[real], whole[real], device, f"chunk {chunk}")
    assert_logits_close(chunked_step, step, device, "decode after a chunked prefill")
    last = model.prefill(ids, mask, last_only=True, chunk_size=chunk).float()
    assert_logits_close(last, whole[:, -1], device, "last_only")
    with pytest.raises(ValueError, match="chunk_size"):
        model.prefill(ids, mask, chunk_size=0)


def test_prefill_continues_a_cached_prompt(device):
    # A second prompt appended to the cache (start_slot) sees the first one: the same logits as the
    # whole prompt in one pass, for a left-padded batch.
    model = tiny_ours(device, num_hidden_layers=3, sliding_window=4,
                      layer_types=["full_attention", "sliding_attention", "full_attention"])
    prompts = [torch.randint(0, BASE["vocab_size"], (n,)).tolist() for n in (9, 5)]
    ids, mask = left_pad(prompts, device=device)
    tail = torch.randint(0, BASE["vocab_size"], (2, 4), device=device)
    model.setup_cache(2, ids.shape[1] + 4)
    whole = model.prefill(torch.cat((ids, tail), 1), torch.cat((mask, torch.ones_like(tail)), 1)).float()
    model.prefill(ids, mask)
    continued = model.prefill(tail, start_slot=ids.shape[1], chunk_size=3).float()
    assert_logits_close(continued, whole[:, ids.shape[1]:], device, "continuation")
    with pytest.raises(ValueError, match="attention_mask must be None"):
        model.prefill(tail, torch.ones_like(tail), start_slot=ids.shape[1])
    with pytest.raises(ValueError, match="from slot"):
        model.prefill(tail, start_slot=ids.shape[1] + 1)


@pytest.mark.parametrize("L, S, starts", [(9, 9, [0, 0]), (9, 9, [0, 4]), (9, 9, [3, 3]), (4, 12, [0, 0]),
                                          (4, 12, [2, 7]), (4, 12, [9, 11]), (1, 6, [0, 5])])
@pytest.mark.parametrize("kv_heads", [6, 2])
@pytest.mark.parametrize("window", [None, 3])
def test_prefill_attention_equals_the_masked_form(device, L, S, starts, kv_heads, window, monkeypatch):
    # The mask-free prefill attention (per-sequence causal SDPA, GQA without repeated K/V; sliding
    # windows block by block, blocks of 4 queries here) against the boolean-mask rule of
    # Dots1Model.step_inputs: causal over real keys, a padding query sees only itself.
    from dots1_ext.modules import prefill_attention

    monkeypatch.setattr(modules, "WINDOW_QUERY_BLOCK", 4)

    B, H, D = len(starts), 6, 16
    dtype = DTYPE[device]
    q = torch.randn(B, H, L, D, device=device, dtype=dtype)
    k = torch.randn(B, kv_heads, S, D, device=device, dtype=dtype)
    v = torch.randn(B, kv_heads, S, D, device=device, dtype=dtype)
    q_slot = torch.arange(S - L, S, device=device)[None, :, None]
    k_slot = torch.arange(S, device=device)[None, None, :]
    start = torch.tensor(starts, device=device)[:, None, None]
    visible = (k_slot <= q_slot) & ((k_slot >= start) | (k_slot == q_slot))  # [B, L, S]
    if window is not None:
        visible = visible & (k_slot > q_slot - window)
    group = H // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=visible[:, None], scale=0.25)
    out = prefill_attention(q, k, v, starts, 0.25, window)
    assert_logits_close(out.reshape(-1, D), expected.reshape(-1, D), device, "prefill attention rows")


# -- packed projections, decode over device lengths ------------------------------------------------
def _attn(model, layer=1):
    return model.model.layers[layer].self_attn


def test_packed_projections_keep_the_hf_state_dict(device):
    # q/k/v (and gate/up of the dense MLP and shared experts) live as row slices of one packed weight;
    # the module's interface stays transformers': names, shapes, and loads that write through.
    model = tiny_ours(device)
    attn, shared = _attn(model), model.model.layers[1].mlp.shared_experts
    assert attn.is_packed and shared.is_packed and model.model.layers[0].mlp.is_packed
    Hq, D = attn.num_heads, attn.head_dim
    assert attn.qkv.shape == ((attn.num_heads + 2 * attn.num_kv_heads) * D, BASE["hidden_size"])
    for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight):
        assert p.untyped_storage().data_ptr() == attn.qkv.untyped_storage().data_ptr()
    keys = set(model.state_dict())
    assert "model.layers.1.self_attn.q_proj.weight" in keys and not any("qkv" in k or "gate_up." in k for k in keys)
    unpacked = Dots1ForCausalLM(model.config, device=device, dtype=model.dtype)
    unpacked.load_state_dict(model.state_dict())
    assert not _attn(unpacked).is_packed
    # load_state_dict into a packed model writes through into the packed weights.
    fresh = tiny_ours(device, seed=1)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(_attn(fresh).qkv[: Hq * D], _attn(model).q_proj.weight)
    assert torch.equal(fresh.model.layers[1].mlp.shared_experts.gate_up, shared.gate_up)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 7), device=device)
    expected = unpacked.eval()(tokens).float()
    assert_logits_close(fresh(tokens).float(), expected, device, "packed vs unpacked")
    # A dtype cast converts the slices one by one; the packing is redone, so they stay one tensor.
    half = fresh.to(torch.bfloat16)
    attn16 = _attn(half)
    assert attn16.qkv.dtype == torch.bfloat16
    assert attn16.k_proj.weight.untyped_storage().data_ptr() == attn16.qkv.untyped_storage().data_ptr()
    assert torch.equal(attn16.qkv[Hq * D: Hq * D + attn16.k_proj.weight.shape[0]], attn16.k_proj.weight)


def test_decode_reads_exactly_each_sequences_slots(device):
    # Stale numbers beyond a sequence's slot (and before its start) must not change its decode step:
    # decode attention reads [cache_start, slot + 1) from the device, whatever the cache holds elsewhere.
    model = tiny_ours(device)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    ids, mask = left_pad(prompts, device=device)
    model.setup_cache(2, 16)
    model.prefill(ids, mask)
    tok = ids[:, -1]
    clean = model.decode(tok, 5).float()
    for layer in model.model.layers:
        layer.self_attn.k_cache[:, 7:].normal_(0, 100)
        layer.self_attn.v_cache[:, 7:].normal_(0, 100)
        layer.self_attn.k_cache[1, :3].normal_(0, 100)  # sequence 1's left padding
        layer.self_attn.v_cache[1, :3].normal_(0, 100)
    torch.testing.assert_close(model.decode(tok, 5).float(), clean, rtol=0, atol=0)


@requires_cuda
def test_one_graph_serves_every_length():
    model = tiny_ours("cuda")
    tokens = torch.randint(0, BASE["vocab_size"], (2, 40), device="cuda")
    model.setup_cache(2, 64)
    graphs = model.decode_graphs()
    before = graphs.captures
    for slot in (8, 9, 20, 39):  # lengths across what used to be separate buckets
        if slot != 9:  # slot 9 follows slot 8's step; the others need their slots [0, slot) written first
            model.prefill(tokens[:, :slot])
        out = graphs(tokens[:, slot], slot).clone()
        ref = model.decode(tokens[:, slot], slot)
        assert torch.equal(out, ref), f"graph replay differs from the eager step at slot {slot}"
    assert graphs.captures - before == 1


@requires_cuda
def test_graphs_notice_a_new_cache_of_the_same_shape():
    # A new cache of the same shape (the inner model's setup_cache allocates anew; the outer one keeps a
    # cache that fits): the captured graph's addresses are stale, so the next call captures anew
    # (DecodeGraphs keys its graphs on layer 0's k_cache buffer) and matches eager.
    model = tiny_ours("cuda")
    tokens = torch.randint(0, BASE["vocab_size"], (2, 12), device="cuda")
    model.setup_cache(2, 16)
    model.prefill(tokens[:, :8])
    graphs = model.decode_graphs()
    first = graphs(tokens[:, 8], 8).clone()
    before = graphs.captures
    old_cache = model.model.layers[0].self_attn.k_cache
    model.model.setup_cache(2, 16)
    assert model.model.layers[0].self_attn.k_cache.data_ptr() != old_cache.data_ptr()
    del old_cache
    model.prefill(tokens[:, :8])
    out = graphs(tokens[:, 8], 8).clone()
    assert graphs.captures == before + 1
    assert torch.equal(out, model.decode(tokens[:, 8], 8)) and torch.equal(out, first)
    with pytest.raises(IndexError, match="outside the KV cache"):
        graphs(tokens[:, 8], 16)


# -- programmatic dependent launch (csrc/pdl.cuh) ---------------------------------------------------
PDL_CASES = {
    "tiny": {},  # head_dim 16: the generic qk kernel; H 64: one CTA per projection tile
    "wide": dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=128, n_routed_experts=16, num_experts_per_tok=4),
}


@requires_cuda
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", list(PDL_CASES))
def test_pdl_changes_no_bit_of_the_decode_step(monkeypatch, case, batch):
    # PDL changes when each kernel's CTAs start (and they read only weights before waiting for the
    # previous kernel), never what they compute: the same decode steps, eager and replayed from a CUDA
    # graph captured under each setting, give bitwise the same logits with DOTS1_EXT_PDL=1 and 0.
    from dots1_ext.cuda_graph import DecodeGraphs

    model = tiny_ours("cuda", **PDL_CASES[case])
    V, L, steps = model.config.vocab_size, 6, 4
    prompt = torch.randint(1, V, (batch, L), device="cuda")
    feed = torch.randint(1, V, (steps, batch), device="cuda")
    model.setup_cache(batch, L + steps)
    model.prefill(prompt)
    # Each run writes slots L .. L + steps - 1 before it reads them: every run starts from the same cache.
    runs = {}
    for pdl in ("1", "0"):
        monkeypatch.setenv("DOTS1_EXT_PDL", pdl)
        runs[f"eager, PDL={pdl}"] = torch.stack([model.decode(feed[n], L + n).clone() for n in range(steps)])
        graphs = DecodeGraphs(model)  # captured now, under this setting
        runs[f"graph, PDL={pdl}"] = torch.stack([graphs(feed[n], L + n).clone() for n in range(steps)])
        assert graphs.captures == 1
    (ref_name, ref), *others = runs.items()
    assert torch.isfinite(ref).all(), f"{ref_name}: non-finite logits"
    for name, out in others:
        assert torch.equal(out, ref), f"{name} differs from {ref_name} (max {(out - ref).abs().max().item():.3e})"


@requires_cuda
def test_bad_pdl_setting_raises(monkeypatch):
    # Every CUDA wrapper of the decode step reads DOTS1_EXT_PDL per call; anything but 0 or 1 is an error.
    model = tiny_ours("cuda")
    model.setup_cache(1, 8)
    model.prefill(torch.tensor([[3, 4, 5]], device="cuda"))
    layer = model.model.layers[1]
    moe, attn = layer.mlp, layer.self_attn
    H, D = model.config.hidden_size, attn.head_dim
    x = torch.randn(1, H, device="cuda", dtype=model.dtype)
    weights, ids = moe.gate(x)  # PDL at its default
    act = ops.moe_decode_gate_up(x, moe.experts.gate_up_proj, ids, moe.shared_experts.gate_up,
                                 moe.experts.gate_up_epilogue)
    q = torch.randn(1, attn.num_heads, D, device="cuda", dtype=model.dtype)
    k = torch.randn(1, attn.num_kv_heads, D, device="cuda", dtype=model.dtype)
    calls = {
        "rms_norm": lambda: ops.rms_norm(x, layer.input_layernorm.weight, 1e-5),
        "add_rms_norm_": lambda: ops.add_rms_norm_(x.clone(), x.clone(), layer.input_layernorm.weight, 1e-5),
        "qk_norm_rope_": lambda: ops.qk_norm_rope_(q, k, attn.q_norm.weight, attn.k_norm.weight,
                                                   torch.zeros(1, dtype=torch.long, device="cuda"),
                                                   torch.zeros(4, D, device="cuda"), 1e-5),
        "skinny_gemm": lambda: ops.skinny_gemm(x, attn.qkv),
        "router_topk_gating": lambda: moe.gate(x),
        "moe_decode_gate_up": lambda: ops.moe_decode_gate_up(x, moe.experts.gate_up_proj, ids,
                                                             moe.shared_experts.gate_up, moe.experts.gate_up_epilogue),
        "moe_decode_down": lambda: ops.moe_decode_down(act, moe.experts.down_proj, ids, weights,
                                                       moe.shared_experts.down_proj.weight, x),
    }
    monkeypatch.setenv("DOTS1_EXT_PDL", "2")
    for name, call in calls.items():
        with pytest.raises(ValueError, match="DOTS1_EXT_PDL"):
            call()
            pytest.fail(f"{name}: DOTS1_EXT_PDL=2 was accepted")
    with pytest.raises(ValueError, match="DOTS1_EXT_PDL"):
        model.decode(torch.tensor([6], device="cuda"), 3)
