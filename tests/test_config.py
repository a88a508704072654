"""Dots1Config validation: every bad field is rejected when the config is read, by a ValueError that
names the field and the value (never a ZeroDivisionError, a torch shape error, or a silent default)."""

from __future__ import annotations

import json
import math
import re

import pytest

from dots1_ext.config import MAX_EXPERTS, MAX_TOPK, Dots1Config
from dots1_ext.ops import dispatch as dispatch_op
from dots1_ext.ops import gating as gating_op

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
