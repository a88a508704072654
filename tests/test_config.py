"""Dots1Config validation: every bad field is rejected when the config is read, by a ValueError that
names the field and the value (never a ZeroDivisionError, a torch shape error, or a silent default)."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch

from dots1_ext.config import MAX_EXPERTS, MAX_TOPK, Dots1Config, parse_dtype
from dots1_ext.ops import dispatch as dispatch_op
from dots1_ext.ops import gating as gating_op
from dots1_ext.rope import build_cos_sin_cache

# A valid MoE config (2 layers: dense then MoE, grouped routing, a sliding layer).
GOOD = dict(
    vocab_size=96, hidden_size=64, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
    n_group=4, topk_group=2, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4,
    layer_types=["full_attention", "sliding_attention"], bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

# (field, bad value, a regex the message must match besides the field's name and the value)
BAD = [
    ("num_key_value_heads", 0, "integer >= 1"),
    ("num_key_value_heads", -2, "integer >= 1"),
    ("num_key_value_heads", 3, "not a multiple"),
    ("num_attention_heads", 0, "integer >= 1"),
    ("n_group", 0, "integer >= 1"),
    ("n_group", 3, "not a multiple"),
    ("topk_group", 0, "integer >= 1"),
    ("topk_group", 5, r"\[1, n_group=4\]"),
    ("vocab_size", 0, "integer >= 1"),
    ("vocab_size", -96, "integer >= 1"),
    ("hidden_size", -64, "integer >= 1"),
    ("hidden_size", 64.0, "integer"),
    ("intermediate_size", -80, "integer >= 0"),
    ("intermediate_size", 0, "dense"),
    ("moe_intermediate_size", -24, "integer >= 0"),
    ("moe_intermediate_size", 0, "MoE"),
    ("num_hidden_layers", 0, "integer >= 1"),
    ("num_hidden_layers", "2", "integer"),
    ("head_dim", 0, "integer >= 1"),
    ("head_dim", 15, "even"),
    ("n_routed_experts", 0, "integer >= 1"),
    ("n_routed_experts", MAX_EXPERTS + 8, "kernels' limit"),
    ("n_shared_experts", -1, "integer >= 0"),
    ("num_experts_per_tok", 0, "integer >= 1"),
    ("num_experts_per_tok", 7, "kept groups"),
    ("first_k_dense_replace", -1, "integer >= 0"),
    ("max_position_embeddings", 0, "integer >= 1"),
    ("sliding_window", 0, "integer >= 1"),
    ("sliding_window", -4, "integer >= 1"),
    ("max_window_layers", -1, "integer >= 0"),
    ("rms_norm_eps", 0.0, "> 0"),
    ("rms_norm_eps", -1e-6, "> 0"),
    ("rms_norm_eps", math.nan, "finite"),
    ("rope_theta", 0.0, "> 0"),
    ("rope_theta", -10000.0, "> 0"),
    ("rope_theta", math.inf, "finite"),
    ("routed_scaling_factor", 0.0, "> 0"),
    ("initializer_range", -0.02, ">= 0"),
    ("norm_topk_prob", 1, "true or false"),
    ("attention_bias", "no", "true or false"),
    ("tie_word_embeddings", None, "true or false"),
    ("pad_token_id", 96, r"token id in \[0, vocab_size=96\)"),
    ("bos_token_id", -1, "token id"),
    ("eos_token_id", [2, 200], r"eos_token_id\[1\] .*got 200"),
    ("layer_types", ["full_attention"], r"\['full_attention'\] has 1 entries for num_hidden_layers=2"),
    ("layer_types", ["full_attention", "linear_attention"], r"layer_types\[1\].*'linear_attention'"),
    ("hidden_act", "gelu", "silu"),
    ("torch_dtype", "int8", "unsupported dtype"),
    ("rope_scaling", "linear", "dict"),
]


@pytest.mark.parametrize("field,value,why", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_field_is_rejected_naming_field_and_value(field, value, why):
    with pytest.raises(ValueError) as info:
        Dots1Config(**{**GOOD, field: value})
    message = str(info.value)
    assert field in message, message
    if not isinstance(value, list):  # a list's offending element is matched by `why`
        assert repr(value) in message, message
    assert re.search(why, message), message


@pytest.mark.parametrize("field,value,why", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_field_in_config_json_names_the_file(tmp_path, field, value, why):
    d = Dots1Config(**GOOD).to_dict()
    d[field] = value
    if field == "rope_scaling":
        d.pop("rope_parameters")
    if field == "rope_theta":
        d["rope_parameters"]["rope_theta"] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=field) as info:
        Dots1Config.from_json_file(path)
    assert str(path) in str(info.value)


def test_null_means_default_but_zero_is_rejected():
    c = Dots1Config(**{**GOOD, "n_group": None, "topk_group": None, "num_experts_per_tok": 2,
                       "num_key_value_heads": None, "head_dim": None, "n_shared_experts": None})
    assert (c.n_group, c.topk_group, c.num_key_value_heads, c.head_dim, c.n_shared_experts) == (1, 1, 4, 16, 0)
    for field in ("n_group", "topk_group"):
        with pytest.raises(ValueError, match=f"{field} must be an integer >= 1.*got 0"):
            Dots1Config(**{**GOOD, field: 0})


def test_head_dim_derived_from_too_few_hidden_units_is_named():
    with pytest.raises(ValueError, match=r"head_dim .*got 0.*hidden_size=2, num_attention_heads=4"):
        Dots1Config(**{**GOOD, "hidden_size": 2, "head_dim": None})


def test_kernel_limits_are_the_ops_limits():
    assert MAX_EXPERTS == min(gating_op.MAX_EXPERTS, dispatch_op.MAX_EXPERTS) == 512
    assert MAX_TOPK == gating_op.MAX_TOPK == 16
    Dots1Config(**{**GOOD, "n_routed_experts": MAX_EXPERTS, "n_group": 1, "topk_group": 1,
                   "num_experts_per_tok": MAX_TOPK})
    with pytest.raises(ValueError, match=f"num_experts_per_tok={MAX_TOPK + 1}.*{MAX_TOPK}"):
        Dots1Config(**{**GOOD, "n_routed_experts": 64, "n_group": 1, "topk_group": 1,
                       "num_experts_per_tok": MAX_TOPK + 1})


def test_dense_only_model_needs_no_expert_fields():
    c = Dots1Config(**{**GOOD, "first_k_dense_replace": 2, "n_routed_experts": None, "num_experts_per_tok": None,
                       "moe_intermediate_size": 0})
    assert c.num_moe_layers == 0


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"vocab_size": 96,')
    with pytest.raises(ValueError, match=rf"{path}: invalid JSON"):
        Dots1Config.from_json_file(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{path}: expected a JSON object, got list"):
        Dots1Config.from_json_file(path)


def test_round_trip_still_valid(tmp_path):
    c = Dots1Config(**GOOD)
    c.save(tmp_path)
    assert Dots1Config.from_pretrained(tmp_path) == c


# -- RoPE keys given twice: the effective values are transformers' (5.x) on the same dict ------------------------
def _hf_rope(d: dict) -> tuple[float, str, float | None]:
    transformers = pytest.importorskip("transformers")
    rope = transformers.Dots1Config.from_dict(copy.deepcopy({**GOOD, **d})).rope_parameters  # it edits the dicts
    return rope["rope_theta"], rope["rope_type"], rope.get("factor")


def _our_rope(c: Dots1Config) -> tuple[float, str, float | None]:
    rope = c.rope_scaling or {}
    return c.rope_theta, rope.get("rope_type") or rope.get("type") or "default", rope.get("factor")


DUPLICATED_ROPE = {
    "theta at top and in rope_parameters": {"rope_theta": 1e4, "rope_parameters": {"rope_type": "default",
                                                                                   "rope_theta": 5e5}},
    "theta at top and in linear rope_parameters": {"rope_theta": 1e4, "rope_parameters": {
        "rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}},
    "theta only at top": {"rope_theta": 7e4, "rope_parameters": {"rope_type": "linear", "factor": 2.0}},
    "null theta at top": {"rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
    "rope_scaling and rope_parameters": {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
                                         "rope_scaling": {"type": "linear", "factor": 4}},
    "rope_scaling, rope_parameters and theta": {"rope_theta": 3e3, "rope_scaling": {"type": "linear", "factor": 4},
                                                "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
    "rope_scaling with its own theta": {"rope_theta": 3e3, "rope_scaling": {"type": "linear", "factor": 4,
                                                                            "rope_theta": 9e3}},
    "empty rope_scaling": {"rope_scaling": {}, "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                   "rope_theta": 5e5}},
}


@pytest.mark.parametrize("d", DUPLICATED_ROPE.values(), ids=DUPLICATED_ROPE.keys())
def test_duplicated_rope_keys_resolve_as_in_transformers(tmp_path, d):
    expect = _hf_rope(d)
    assert _our_rope(Dots1Config.from_dict({**GOOD, **d})) == expect
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**GOOD, **d}))
    c = Dots1Config.from_json_file(path)
    assert _our_rope(c) == expect
    c.save(tmp_path / "again")  # our save writes rope_theta at the top and in rope_parameters: they agree
    assert _our_rope(Dots1Config.from_pretrained(tmp_path / "again")) == expect


def test_rope_theta_inside_rope_scaling_wins_in_the_constructor():
    c = Dots1Config(**{**GOOD, "rope_theta": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 2.0,
                                                                  "rope_theta": 5e5}})
    assert c.rope_theta == 5e5 and c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert c.to_dict()["rope_parameters"]["rope_theta"] == c.to_dict()["rope_theta"] == 5e5


def test_top_level_partial_rotary_factor_is_a_rope_parameter():
    # transformers moves it into rope_parameters; its linear / dynamic RoPE then rotate part of the head.
    d = {**GOOD, "partial_rotary_factor": 0.5, "rope_parameters": {"rope_type": "linear", "factor": 2.0}}
    transformers = pytest.importorskip("transformers")
    assert transformers.Dots1Config.from_dict(copy.deepcopy(d)).rope_parameters["partial_rotary_factor"] == 0.5
    with pytest.raises(NotImplementedError, match="partial_rotary_factor=0.5"):
        Dots1Config.from_dict(d)
    with pytest.raises(ValueError, match="partial_rotary_factor.*'x'"):
        Dots1Config.from_dict({**d, "partial_rotary_factor": "x"})
    # ... while its Dots1 default RoPE rotates the whole head anyway.
    assert Dots1Config.from_dict({**d, "rope_parameters": {"rope_type": "default"}}).rope_scaling is None


# -- RoPE parameters are checked when the config is read, not at the first forward -------------------------------
BAD_ROPE = [
    ({"rope_type": "linear"}, ValueError, r"'linear' needs a finite factor > 0, got None"),
    ({"rope_type": "linear", "factor": -2}, ValueError, "factor > 0, got -2"),
    ({"rope_type": "linear", "factor": 0}, ValueError, "factor > 0, got 0"),
    ({"rope_type": "linear", "factor": "2"}, ValueError, "factor > 0, got '2'"),
    ({"rope_type": "dynamic"}, ValueError, r"'dynamic' needs a finite factor > 0, got None"),
    ({"rope_type": "linear", "factor": 2, "partial_rotary_factor": 0.5}, NotImplementedError,
     "partial_rotary_factor=0.5"),
    ({"rope_type": "linear", "factor": 2, "partial_rotary_factor": "x"}, ValueError, "partial_rotary_factor.*'x'"),
    ({"rope_type": "dynamic", "factor": 2, "original_max_position_embeddings": "abc"}, ValueError,
     "original_max_position_embeddings.*'abc'"),
    ({"rope_type": "dynamic", "factor": 2, "original_max_position_embeddings": 0}, ValueError,
     "original_max_position_embeddings.*got 0"),
    ({"rope_type": "yarn", "factor": 2}, NotImplementedError, "'yarn' is not supported"),
    ({"full_attention": {"rope_type": "linear", "factor": 2}}, NotImplementedError, "per-layer-type"),
]


@pytest.mark.parametrize("rope,exc,why", BAD_ROPE, ids=[repr(r) for r, _, _ in BAD_ROPE])
def test_bad_rope_parameters_are_rejected_when_read(tmp_path, rope, exc, why):
    with pytest.raises(exc, match=f"Dots1Config: rope_scaling.*{why}"):
        Dots1Config(**{**GOOD, "rope_scaling": rope})
    with pytest.raises(exc, match=why):
        Dots1Config.from_dict({**GOOD, "rope_parameters": rope})
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**GOOD, "rope_scaling": rope}))
    with pytest.raises(exc, match=why) as info:
        Dots1Config.from_json_file(path)
    assert str(path) in str(info.value)


def test_null_rope_type_means_default_everywhere():
    c = Dots1Config(**{**GOOD, "rope_scaling": {"rope_type": None}})
    assert Dots1Config.from_dict({**GOOD, "rope_parameters": {"rope_type": None}}).rope_scaling is None
    # a null rope_type falls back on the 4.x "type" key, as a missing one does
    with pytest.raises(ValueError, match="'linear' needs a finite factor"):
        Dots1Config(**{**GOOD, "rope_scaling": {"rope_type": None, "type": "linear"}})
    assert torch.equal(build_cos_sin_cache(c.head_dim, 8, c.rope_theta, c.rope_scaling),
                       build_cos_sin_cache(c.head_dim, 8, c.rope_theta))


# -- dtypes: a torch.dtype object passes only where its string form would ----------------------------------------
BAD_DTYPES = [torch.int8, torch.int32, torch.int64, torch.float64, torch.complex64, torch.float8_e4m3fn, torch.bool]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
def test_parse_dtype_rejects_dtype_objects_the_strings_do_not_allow(tmp_path, dtype):
    from dots1_ext.loader import load_model, save_checkpoint
    from dots1_ext.model import build_random_model

    with pytest.raises(ValueError, match=rf"unsupported dtype {re.escape(str(dtype))}"):
        parse_dtype(dtype)
    with pytest.raises(ValueError, match=rf"torch_dtype: unsupported dtype {re.escape(str(dtype))}"):
        Dots1Config(**{**GOOD, "torch_dtype": dtype})
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_model(tmp_path / "no-such-checkpoint", dtype=dtype)  # rejected before the path is looked at
    model = build_random_model(Dots1Config(**GOOD), dtype=torch.float32)
    with pytest.raises(ValueError, match="unsupported dtype"):
        save_checkpoint(model, tmp_path / "out", dtype=dtype)
    assert not (tmp_path / "out").exists()


def test_parse_dtype_keeps_the_supported_dtype_objects():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert parse_dtype(dtype) is dtype and parse_dtype(str(dtype)) is dtype
    assert parse_dtype(None) is None


# -- the containers themselves ---------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [[], None, "config.json", [("vocab_size", 96)]], ids=repr)
def test_from_dict_needs_a_dict(d):
    with pytest.raises(TypeError, match=rf"from_dict: expected a dict, got {type(d).__name__}"):
        Dots1Config.from_dict(d)


def test_extra_must_be_a_dict():
    with pytest.raises(ValueError, match="Dots1Config: extra must be a dict, got None"):
        Dots1Config(**GOOD, extra=None)


def test_binary_config_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"\xff\xfe\x00\x01binary")
    with pytest.raises(ValueError, match=rf"{path}: not a UTF-8 JSON file"):
        Dots1Config.from_json_file(path)


# -- model_type ---------------------------------------------------------------------------------------------
def test_model_type_must_be_dots1(tmp_path):
    transformers = pytest.importorskip("transformers")
    assert transformers.Dots1Config.model_type == "dots1" == Dots1Config(**GOOD).to_dict()["model_type"]
    for model_type in ("llama", "deepseek_v3", "", 1):
        why = rf"model_type must be 'dots1' \(or absent\), got {re.escape(repr(model_type))}"
        with pytest.raises(ValueError, match=why):
            Dots1Config.from_dict({**GOOD, "model_type": model_type})
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**GOOD, "model_type": "llama"}))
    with pytest.raises(ValueError, match=rf"{path}: .*model_type"):
        Dots1Config.from_json_file(path)
    # absent (as in hand-written configs) or transformers' own
    assert Dots1Config.from_dict(GOOD) == Dots1Config.from_dict({**GOOD, "model_type": "dots1"})
    hf = transformers.Dots1Config(**copy.deepcopy({k: v for k, v in GOOD.items() if k != "rope_theta"}))
    assert Dots1Config.from_dict(hf.to_dict()).num_experts_per_tok == GOOD["num_experts_per_tok"]
