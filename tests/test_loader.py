"""Checkpoints: transformers' save_pretrained loads here and ours loads there; hub and fused expert
layouts, shards, dtype conversion, and clear errors for missing / unexpected / misshapen tensors.

Logit tolerances as in test_model.py (fp32 on CPU < 1e-5; bf16 on CUDA 2e-2 per token, see there).
"""

from __future__ import annotations

import json
import os
import re
import warnings

import pytest
import torch
from conftest import rel_err
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_model import BASE, CONFIGS, DTYPE, assert_matches_transformers, make_hf_model, tiny_ours

from dots1_ext import modules, quant
from dots1_ext.loader import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    CheckpointError,
    CheckpointKeyError,
    CheckpointNotFoundError,
    check_device_memory,
    checkpoint_files,
    keep_experts_,
    load_model,
    parse_size,
    save_checkpoint,
)
from dots1_ext.model import Dots1ForCausalLM


def saved_tiny(tmp_path, layout="hub", shard_size="1GB", **overrides):
    model = tiny_ours("cpu", dtype=torch.float32, **overrides)
    save_checkpoint(model, tmp_path, shard_size=shard_size, layout=layout)
    return model


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key].cpu(), sb[key].cpu()), key


def rewrite_single_file(tmp_path, edit):
    path = os.path.join(tmp_path, SAFE_WEIGHTS_NAME)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# -- interoperability with transformers --------------------------------------------------------------
def test_transformers_save_pretrained_loads(tmp_path, device):
    hf = make_hf_model(**CONFIGS["groups-gqa-attnbias"])
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, BASE["vocab_size"], (2, 10))
    with torch.no_grad():
        expected = hf(ids).logits
    model = load_model(tmp_path, device=device, dtype=DTYPE[device], progress=False)
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert_matches_transformers(model, hf, ids, expected)


def test_transformers_loads_our_hub_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = saved_tiny(tmp_path, layout="hub", shard_size="40KB")
    hf = transformers.Dots1ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    ids = torch.randint(0, BASE["vocab_size"], (1, 9))
    with torch.no_grad():
        expected = hf(ids).logits
    assert rel_err(model(ids), expected) < 1e-5


# -- our own round trips -------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["hub", "fused"])
@pytest.mark.parametrize("shard_size", ["1GB", "30KB"])
def test_save_load_round_trip(tmp_path, layout, shard_size):
    model = saved_tiny(tmp_path, layout=layout, shard_size=shard_size)
    keys = checkpoint_files(tmp_path)
    sharded = os.path.exists(os.path.join(tmp_path, SAFE_WEIGHTS_INDEX_NAME))
    assert sharded == (shard_size != "1GB") and len(set(keys.values())) > (1 if sharded else 0)
    hub_key = "model.layers.1.mlp.experts.7.up_proj.weight"
    assert (hub_key in keys) == (layout == "hub")
    assert ("model.layers.1.mlp.experts.gate_up_proj" in keys) == (layout == "fused")
    loaded = load_model(tmp_path, "cpu", torch.float32, progress=False)
    assert_same_weights(loaded, model)
    # Saving de-interleaves the experts in place and restores them; loading packs them again.
    for ours, theirs in zip(modules.gate_up_modules(model), modules.gate_up_modules(loaded), strict=True):
        assert ours.gate_up_interleaved and theirs.gate_up_interleaved
        assert torch.equal(ours.gate_up_proj, theirs.gate_up_proj)
    ids = torch.randint(0, BASE["vocab_size"], (2, 7))
    assert torch.equal(loaded(ids), model(ids))


def test_load_onto_device_and_dtype(tmp_path, device):
    model = saved_tiny(tmp_path, shard_size="50KB")
    loaded = load_model(tmp_path, device=device, dtype=torch.bfloat16, progress=False)
    assert loaded.device.type == device and loaded.dtype == torch.bfloat16
    for key, t in model.state_dict().items():
        got = loaded.state_dict()[key]
        want = t if key.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
        assert torch.equal(got.cpu(), want), key


def test_bf16_checkpoint_loads_as_fp32(tmp_path):
    model = tiny_ours("cpu", dtype=torch.float32)
    save_checkpoint(model, tmp_path, dtype=torch.bfloat16)
    with safe_open(os.path.join(tmp_path, SAFE_WEIGHTS_NAME), framework="pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
        assert f.get_slice("model.layers.1.mlp.gate.e_score_correction_bias").get_dtype() == "F32"
    assert json.load(open(os.path.join(tmp_path, "config.json")))["torch_dtype"] == "bfloat16"
    loaded = load_model(tmp_path, "cpu", torch.float32, progress=False)
    w = model.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(loaded.model.layers[1].mlp.experts.gate_up_proj, w.to(torch.bfloat16).float())


def test_tied_embeddings(tmp_path):
    model = saved_tiny(tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in checkpoint_files(tmp_path)
    loaded = load_model(tmp_path, progress=False)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_same_weights(loaded, model)


def test_progress_is_reported_on_stderr(tmp_path, capsys):
    saved_tiny(tmp_path)
    load_model(tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "loading weights:" in err and "tensors" in err


# -- errors ------------------------------------------------------------------------------------------
def test_missing_tensor_is_named(tmp_path):
    saved_tiny(tmp_path)
    rewrite_single_file(tmp_path, lambda t: t.pop("model.layers.0.self_attn.k_norm.weight"))
    with pytest.raises(KeyError, match=r"missing 1 tensor.*model\.layers\.0\.self_attn\.k_norm\.weight"):
        load_model(tmp_path, progress=False)


def test_missing_hub_expert_is_named(tmp_path):
    saved_tiny(tmp_path, layout="hub")
    rewrite_single_file(tmp_path, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        load_model(tmp_path, progress=False)


def test_unexpected_tensor_is_named(tmp_path):
    saved_tiny(tmp_path)
    rewrite_single_file(tmp_path, lambda t: t.update({"model.layers.0.mlp.bogus.weight": torch.zeros(2)}))
    with pytest.raises(KeyError, match=r"unexpected.*model\.layers\.0\.mlp\.bogus\.weight"):
        load_model(tmp_path, progress=False)


def test_expert_out_of_range_is_unexpected(tmp_path):
    saved_tiny(tmp_path, layout="hub")
    rewrite_single_file(tmp_path, lambda t: t.update(
        {"model.layers.1.mlp.experts.8.down_proj.weight": torch.zeros(BASE["hidden_size"], 24)}))
    with pytest.raises(KeyError, match=r"experts\.8\.down_proj"):
        load_model(tmp_path, progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_router_bias_is_named(tmp_path, bad):
    # A NaN / inf router bias would route silently (the router's logits stay finite): the load stops.
    saved_tiny(tmp_path)
    key = "model.layers.1.mlp.gate.e_score_correction_bias"
    rewrite_single_file(tmp_path, lambda t: t[key].__setitem__(2, bad))
    with pytest.raises(ValueError, match=rf"{re.escape(key)}.*non-finite"):
        load_model(tmp_path, progress=False)


def test_misshapen_tensor_names_both_shapes(tmp_path):
    saved_tiny(tmp_path)
    rewrite_single_file(tmp_path, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 65)}))
    with pytest.raises(ValueError, match=r"q_proj\.weight.*\[64, 65\].*\[64, 64\]"):
        load_model(tmp_path, progress=False)


def test_duplicate_layouts_rejected(tmp_path):
    model = saved_tiny(tmp_path, layout="hub")
    fused = model.model.layers[1].mlp.experts.down_proj.detach().clone()
    rewrite_single_file(tmp_path, lambda t: t.update({"model.layers.1.mlp.experts.down_proj": fused}))
    with pytest.raises(ValueError, match="second time"):
        load_model(tmp_path, progress=False)


def test_rotary_inv_freq_is_ignored(tmp_path):
    model = saved_tiny(tmp_path)
    rewrite_single_file(tmp_path, lambda t: t.update({"model.rotary_emb.inv_freq": torch.ones(8)}))
    assert_same_weights(load_model(tmp_path, progress=False), model)


def test_no_checkpoint_files(tmp_path):
    tiny_ours("cpu").config.save(tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path, progress=False)


def test_out_of_memory_message(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 8000))
    with pytest.raises(torch.OutOfMemoryError, match=r"needs 123456789 bytes.*only 1000 bytes"):
        check_device_memory(123456789, "cuda:0")
    check_device_memory(500, "cuda:0")
    check_device_memory(10**15, "cpu")  # host memory is not checked


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("lots")


# -- errors name the file (CheckpointError) ------------------------------------------------------------
def test_truncated_safetensors_names_the_file(tmp_path):
    saved_tiny(tmp_path, shard_size="30KB")
    shard = os.path.join(tmp_path, sorted(set(checkpoint_files(tmp_path).values()))[1])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    with pytest.raises(CheckpointError, match=rf"{re.escape(shard)}: not a readable safetensors file"):
        load_model(tmp_path, progress=False)


def test_truncated_single_file_names_the_file(tmp_path):
    saved_tiny(tmp_path)
    path = os.path.join(tmp_path, SAFE_WEIGHTS_NAME)
    with open(path, "r+b") as f:
        f.truncate(50)
    with pytest.raises(CheckpointError, match=re.escape(path)):
        checkpoint_files(tmp_path)


def test_invalid_config_json_names_the_file(tmp_path):
    saved_tiny(tmp_path)
    path = os.path.join(tmp_path, "config.json")
    with open(path, "w") as f:
        f.write('{"vocab_size": 96,\n  "hidden_size": }')
    with pytest.raises(CheckpointError, match=rf"{re.escape(path)}: invalid JSON.*line 2"):
        load_model(tmp_path, progress=False)


def test_invalid_config_field_names_the_file_and_field(tmp_path):
    saved_tiny(tmp_path)
    path = os.path.join(tmp_path, "config.json")
    config = json.load(open(path))
    config["num_key_value_heads"] = 0
    json.dump(config, open(path, "w"))
    with pytest.raises(CheckpointError, match=rf"{re.escape(path)}: .*num_key_value_heads must be .*got 0"):
        load_model(tmp_path, progress=False)


def test_missing_config_and_directory_are_named(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"no such checkpoint directory"):
        load_model(tmp_path / "nowhere", progress=False)
    with pytest.raises(CheckpointNotFoundError, match=r"config\.json: no such file"):
        load_model(tmp_path, progress=False)


@pytest.mark.parametrize("index,why", [
    ({"metadata": {}}, r"non-empty \"weight_map\".*found keys \['metadata'\]"),
    ({"weight_map": []}, r"\"weight_map\""),
    ([1, 2], r"found a JSON list"),
    ({"weight_map": {"model.norm.weight": 3}}, r"weight_map\['model\.norm\.weight'\] must be a file name"),
])
def test_bad_index_names_the_file(tmp_path, index, why):
    saved_tiny(tmp_path, shard_size="30KB")
    path = os.path.join(tmp_path, SAFE_WEIGHTS_INDEX_NAME)
    json.dump(index, open(path, "w"))
    with pytest.raises(CheckpointError, match=rf"{re.escape(path)}: .*{why}"):
        load_model(tmp_path, progress=False)


def test_index_with_invalid_json_or_missing_shard(tmp_path):
    saved_tiny(tmp_path, shard_size="30KB")
    path = os.path.join(tmp_path, SAFE_WEIGHTS_INDEX_NAME)
    shard = sorted(set(checkpoint_files(tmp_path).values()))[0]
    os.remove(shard)
    with pytest.raises(CheckpointNotFoundError, match=rf"{re.escape(shard)}: no such file \(listed in {re.escape(path)}"):
        load_model(tmp_path, progress=False)
    with open(path, "w") as f:
        f.write("{")
    with pytest.raises(CheckpointError, match=rf"{re.escape(path)}: invalid JSON in the checkpoint index"):
        load_model(tmp_path, progress=False)


def test_checkpoint_errors_keep_their_old_types(tmp_path):
    # CheckpointError is a ValueError; missing / unexpected tensors stay KeyErrors, missing files FileNotFoundErrors.
    assert issubclass(CheckpointError, ValueError)
    assert issubclass(CheckpointKeyError, CheckpointError) and issubclass(CheckpointKeyError, KeyError)
    assert issubclass(CheckpointNotFoundError, CheckpointError) and issubclass(CheckpointNotFoundError, FileNotFoundError)
    saved_tiny(tmp_path)
    rewrite_single_file(tmp_path, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointKeyError) as info:
        load_model(tmp_path, progress=False)
    assert str(info.value).startswith("checkpoint ") and "'model.norm.weight'" in str(info.value)  # not quoted


# -- save_checkpoint is crash-safe -------------------------------------------------------------------
def test_crash_mid_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    from dots1_ext import loader

    old = saved_tiny(tmp_path, shard_size="30KB")
    (tmp_path / "tokenizer.json").write_text("{}")
    before = sorted(os.listdir(tmp_path))
    new = tiny_ours("cpu", dtype=torch.float32, seed=1)
    calls = []

    def crash_on_third_shard(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(loader, "save_file", crash_on_third_shard)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(new, tmp_path, shard_size="30KB")
    assert sorted(os.listdir(tmp_path)) == before
    assert_same_weights(load_model(tmp_path, progress=False), old)
    assert [p for p in os.listdir(tmp_path.parent) if p.startswith(f".{tmp_path.name}.")] == []  # no leftovers


def test_save_over_a_checkpoint_replaces_weights_and_keeps_other_files(tmp_path):
    saved_tiny(tmp_path, shard_size="30KB")  # sharded: an index and several shards
    (tmp_path / "tokenizer.json").write_text('{"hello": 1}')
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "notes.txt").write_text("kept")
    mode = os.stat(tmp_path).st_mode & 0o777
    new = tiny_ours("cpu", dtype=torch.float32, seed=1)
    save_checkpoint(new, tmp_path, shard_size="1GB")  # one file now: the old shards and index must go
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(["config.json", SAFE_WEIGHTS_NAME, "tokenizer.json", "extra"])
    assert (tmp_path / "tokenizer.json").read_text() == '{"hello": 1}'
    assert (tmp_path / "extra" / "notes.txt").read_text() == "kept"
    assert os.stat(tmp_path).st_mode & 0o777 == mode
    assert_same_weights(load_model(tmp_path, progress=False), new)
    assert [p for p in os.listdir(tmp_path.parent) if p.startswith(f".{tmp_path.name}.")] == []


# -- an expert range (expert parallelism) ------------------------------------------------------------
@pytest.mark.parametrize("layout", ["hub", "fused"])
@pytest.mark.parametrize("experts", [(0, 8), (2, 6), (7, 8)])
def test_expert_range_equals_the_slice_of_a_full_load(tmp_path, monkeypatch, layout, experts):
    from dots1_ext import loader

    saved_tiny(tmp_path, layout=layout, shard_size="30KB")
    full = load_model(tmp_path, progress=False)
    reads = []
    real_open = loader.safe_open

    class Recording:
        def __init__(self, path, **kw):
            self._cm = real_open(path, **kw)

        def __enter__(self):
            f = self._cm.__enter__()

            class F:
                keys = f.keys

                def get_tensor(_, key):
                    reads.append(key)
                    return f.get_tensor(key)

                def get_slice(_, key):
                    src = f.get_slice(key)

                    class S:
                        get_shape, get_dtype = src.get_shape, src.get_dtype

                        def __getitem__(_, index):
                            reads.append((key, index))
                            return src[index]
                    return S()
            return F()

        def __exit__(self, *exc):
            return self._cm.__exit__(*exc)

    monkeypatch.setattr(loader, "safe_open", Recording)
    part = load_model(tmp_path, progress=False, experts=experts)
    start, end = experts
    sd_full, sd_part = full.state_dict(), part.state_dict()
    assert sd_full.keys() == sd_part.keys()
    for key, t in sd_full.items():
        want = t[start:end] if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")) else t
        assert torch.equal(sd_part[key], want), key
    for m in modules.gate_up_modules(part):
        assert m.expert_range == experts and m.gate_up_interleaved
        assert m.gate_up_proj.shape[0] == end - start
    hub_experts = {int(k.split(".")[5]) for k in reads if isinstance(k, str) and ".mlp.experts." in k
                   and k.split(".")[5].isdigit()}
    fused_rows = {index for k, index in (r for r in reads if isinstance(r, tuple)) if "mlp.experts" in k}
    assert hub_experts <= set(range(start, end)) and fused_rows <= set(range(start, end))
    assert (hub_experts if layout == "hub" else fused_rows) == set(range(start, end))
    if experts != (0, 8):
        with pytest.raises(ValueError, match=r"holds only routed experts"):
            save_checkpoint(part, tmp_path / "again")


def test_bad_expert_range(tmp_path):
    saved_tiny(tmp_path)
    for bad in [(0, 9), (3, 3), (-1, 2), (1,), "0:4", (0.0, 4)]:
        with pytest.raises(ValueError, match="experts"):
            load_model(tmp_path, progress=False, experts=bad)


def test_expert_range_takes_any_integral_pair_and_nothing_else(tmp_path):
    np = pytest.importorskip("numpy")
    saved_tiny(tmp_path)
    part = load_model(tmp_path, progress=False, experts=(np.int64(2), np.int64(6)))
    assert part.model.layers[1].mlp.experts.expert_range == (2, 6)
    # a dict or set would unpack to its keys (experts 0-4 of {0: 1, 4: 2}), a range to its items
    for bad in [{0: 1, 4: 2}, {0, 4}, range(0, 4), "04", (False, 4), (torch.tensor(0), 4)]:
        with pytest.raises(ValueError, match=r"experts"):
            load_model(tmp_path, progress=False, experts=bad)


def test_keep_experts_checks_its_range():
    config = tiny_ours("cpu").config
    for start, end in [(-2, 4), (4, 2), (3, 3), (0, 9), (True, 4), (0.0, 4)]:
        with pytest.raises(ValueError, match=r"keep_experts_: start and end .*n_routed_experts=8"):
            keep_experts_(Dots1ForCausalLM(config, device="meta"), start, end)
    kept = keep_experts_(Dots1ForCausalLM(config, device="meta"), 2, 6)
    assert kept.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 4


# -- tie_word_embeddings with a separate lm_head (transformers' rule) ----------------------------------
def test_tied_config_with_a_different_lm_head_loads_untied_like_transformers(tmp_path):
    # transformers 5 unties (and warns) when a tied config's checkpoint holds an lm_head.weight that differs
    # from the embedding; dropping it would change every logit.
    transformers = pytest.importorskip("transformers")
    model = saved_tiny(tmp_path, tie_word_embeddings=False)
    path = os.path.join(tmp_path, "config.json")
    json.dump({**json.load(open(path)), "tie_word_embeddings": True}, open(path, "w"))
    with pytest.warns(UserWarning, match=r"lm_head\.weight differs .*untied"):
        loaded = load_model(tmp_path, progress=False)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert_same_weights(loaded, model)
    hf = transformers.Dots1ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    ids = torch.randint(0, BASE["vocab_size"], (2, 9))
    with torch.no_grad():
        expected = hf(ids).logits
    assert rel_err(loaded(ids), expected) < 1e-5
    save_checkpoint(loaded, tmp_path / "again")  # both tensors written again, config untied
    assert "lm_head.weight" in checkpoint_files(tmp_path / "again")
    assert_same_weights(load_model(tmp_path / "again", progress=False), model)


def test_tied_config_with_an_equal_lm_head_ties_silently(tmp_path):
    model = saved_tiny(tmp_path, tie_word_embeddings=True)
    rewrite_single_file(tmp_path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_model(tmp_path, progress=False)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_same_weights(loaded, model)


# -- int4 experts: errors name the tensor --------------------------------------------------------------
INT4_DIMS = dict(hidden_size=128, moe_intermediate_size=128)  # int4 needs K % 128 == 0


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_non_finite_expert_weight_quantized_while_loading_is_named(tmp_path, layout):
    saved_tiny(tmp_path, layout=layout, **INT4_DIMS)
    key = ("model.layers.1.mlp.experts.3.gate_proj.weight" if layout == "hub"
           else "model.layers.1.mlp.experts.gate_up_proj")
    rewrite_single_file(tmp_path, lambda t: t[key].view(-1).__setitem__(t[key].numel() // 2, float("nan")))
    path = os.path.join(tmp_path, SAFE_WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)}.*in {re.escape(path)} cannot be quantized to int4.*"
                                              r"NaN or Inf"):
        load_model(tmp_path, progress=False, experts="int4")


def claim_int4(tmp_path, symmetric=False, drop=False):
    path = os.path.join(tmp_path, "config.json")
    config = json.load(open(path))
    if drop:
        config.pop("quantization_config")
    else:
        config["quantization_config"] = quant.quantization_config(symmetric)
    json.dump(config, open(path, "w"))


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_config_claiming_int4_over_unquantized_experts_says_so(tmp_path, layout):
    saved_tiny(tmp_path, layout=layout, **INT4_DIMS)
    claim_int4(tmp_path)
    with pytest.raises(CheckpointKeyError, match=r"mlp\.experts.*quantization_config says the routed experts are "
                                                 r"int4.*unquantized \(bf16/fp16/fp32\) expert weight"):
        load_model(tmp_path, progress=False)


@pytest.mark.parametrize("edit,why", [
    (dict(drop=True), r"down_proj\.qweight': an int4 expert tensor, but config\.json has no dots1_ext "
                      r"quantization_config"),
    (dict(symmetric=True), r"down_proj\.zeros': int4 zero points, but .*says symmetric int4"),
])
def test_int4_tensors_the_config_does_not_describe_are_explained(tmp_path, edit, why):
    model = tiny_ours("cpu", dtype=torch.float32, **INT4_DIMS)
    save_checkpoint(modules.quantize_experts_(model), tmp_path)
    claim_int4(tmp_path, **edit)
    with pytest.raises(CheckpointKeyError, match=why):
        load_model(tmp_path, progress=False)


# -- device ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,why", [
    ("gpu", r"device 'gpu' is not a torch device string"),
    ("bogus", r"device 'bogus' is not a torch device string"),
    ("meta", r"device 'meta' holds no data"),
    ("mps", r"device 'mps': dots1_ext runs on 'cpu' or 'cuda'"),
    (None, r"device must be a torch\.device"),
    (True, r"device must be a torch\.device"),
    ("cuda:99", r"device 'cuda:99' requested but"),
])
def test_bad_device_is_named(tmp_path, device, why):
    saved_tiny(tmp_path)
    with pytest.raises(ValueError, match=why):
        load_model(tmp_path, device=device, progress=False)
    with pytest.raises(ValueError, match=why):
        check_device_memory(10, device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:5", 3, torch.device("cuda", 0)])
def test_cuda_device_without_cuda_is_named(tmp_path, device):
    saved_tiny(tmp_path)
    why = rf"device {re.escape(repr(device))} requested but torch\.cuda\.is_available\(\) is False"
    with pytest.raises(ValueError, match=why):
        load_model(tmp_path, device=device, progress=False)
    with pytest.raises(ValueError, match=why):
        check_device_memory(10, device)


# -- save_checkpoint's arguments -----------------------------------------------------------------------
def test_parse_size_takes_positive_sizes_only():
    assert parse_size("40 kib") == 40 * 1024 and parse_size("1.5KB") == 1500 and parse_size(1) == 1
    for bad in [0, -1, True, 1.5, None, "0MB", "0.5B", "1.2.3MB", ".", "abc", "1e3MB", "-5MB"]:
        with pytest.raises(ValueError, match=r"^size must be a positive number of bytes"):
            parse_size(bad)


def test_bad_shard_size_is_named(tmp_path):
    model = tiny_ours("cpu", dtype=torch.float32)
    for bad in [0, -5, True, "0MB", 1.5, "1.2.3MB", ".", "abc", "1e3MB", None]:
        why = rf"shard_size must be a positive number of bytes.*got {re.escape(repr(bad))}"
        with pytest.raises(ValueError, match=why):
            save_checkpoint(model, tmp_path / "out", shard_size=bad)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("directory", ["", "   "])
def test_save_checkpoint_refuses_an_empty_path(tmp_path, monkeypatch, directory):
    # "" would resolve to the current directory, which the save renames away and replaces.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"save_checkpoint: directory must be a non-empty path"):
        save_checkpoint(tiny_ours("cpu", dtype=torch.float32), directory)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_save_checkpoint_keeps_files_made_while_it_saves(tmp_path, monkeypatch):
    # Files another process makes in the directory after the save linked the other files across (and
    # before the rename) were deleted with the old directory; they are moved into the new one. The old
    # checkpoint's own files are not.
    from dots1_ext import loader

    ckpt = tmp_path / "ckpt"
    saved_tiny(ckpt, shard_size=20_000)  # several shards: the new save writes one
    assert len(list(ckpt.glob("model-*-of-*.safetensors"))) > 1
    (ckpt / "tokenizer").mkdir()
    (ckpt / "tokenizer" / "vocab.txt").write_text("a b")
    real_link = loader._link_other_files

    def link_then_write(src, dst):
        real_link(src, dst)
        (ckpt / "notes.txt").write_text("written during the save")
        (ckpt / "tokenizer" / "merges.txt").write_text("c d")

    monkeypatch.setattr(loader, "_link_other_files", link_then_write)
    save_checkpoint(tiny_ours("cpu", dtype=torch.float32), ckpt)
    assert (ckpt / "notes.txt").read_text() == "written during the save"
    assert (ckpt / "tokenizer" / "merges.txt").read_text() == "c d"
    assert (ckpt / "tokenizer" / "vocab.txt").read_text() == "a b"
    assert sorted(p.name for p in ckpt.glob("model*.safetensors")) == ["model.safetensors"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    load_model(ckpt, progress=False)


def test_save_checkpoint_takes_a_bytes_path(tmp_path):
    # os.PathLike and str paths worked; a bytes path (also an os.fspath result) was a TypeError halfway.
    model = tiny_ours("cpu", dtype=torch.float32)
    files = save_checkpoint(model, os.fsencode(tmp_path / "ckpt"))
    assert files and all(isinstance(f, str) for f in files)
    loaded = load_model(tmp_path / "ckpt", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_save_checkpoint_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.py").write_text("print(1)")
    (project / "config.json").write_text('{"name": "my app"}')  # ours, not a model's
    inode = os.stat(project).st_ino
    with pytest.raises(FileExistsError, match=rf"{re.escape(str(project))}' exists and is not a Dots1 checkpoint"):
        save_checkpoint(tiny_ours("cpu", dtype=torch.float32), project)
    assert os.stat(project).st_ino == inode and sorted(os.listdir(project)) == ["config.json", "main.py"]
    assert (project / "config.json").read_text() == '{"name": "my app"}'
    assert os.listdir(tmp_path) == ["project"]  # no temporary directory left
    (tmp_path / "empty").mkdir()
    save_checkpoint(tiny_ours("cpu", dtype=torch.float32), tmp_path / "empty")  # an empty one is fine


def test_save_checkpoint_refuses_the_working_directory_and_mount_points(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    saved_tiny(ckpt)
    (ckpt / "sub").mkdir()
    monkeypatch.chdir(ckpt / "sub")  # renaming ckpt away would leave the process in a deleted directory
    with pytest.raises(ValueError, match=r"current working directory or above it"):
        save_checkpoint(tiny_ours("cpu", dtype=torch.float32), ckpt)
    monkeypatch.chdir(tmp_path)
    real_stat = os.stat

    def stat(path, *args, **kwargs):  # ckpt/sub as a mount point: the old tree's rmtree would empty it
        st = real_stat(path, *args, **kwargs)
        return os.stat_result((*st[:2], st.st_dev + 1, *st[3:10])) if str(path).endswith("sub") else st

    monkeypatch.setattr(os, "stat", stat)
    with pytest.raises(ValueError, match=r"ckpt/sub' inside directory .* is on another filesystem"):
        save_checkpoint(tiny_ours("cpu", dtype=torch.float32), ckpt)


def test_save_checkpoint_bad_model_path_or_dtype(tmp_path):
    for bad in [None, torch.nn.Linear(2, 2)]:
        with pytest.raises(TypeError, match=r"save_checkpoint: model must be a dots1_ext Dots1ForCausalLM"):
            save_checkpoint(bad, tmp_path / "out")
    model = tiny_ours("cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"model has tensors on the meta device"):
        save_checkpoint(Dots1ForCausalLM(model.config, device="meta"), tmp_path / "out")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(NotADirectoryError, match=rf"directory {re.escape(repr(str(afile)))} exists and is not a dir"):
        save_checkpoint(model, afile)
    assert afile.read_text() == "x"
    saved_tiny(tmp_path / "ckpt")
    # load_model would refuse what these wrote, and the old checkpoint would be gone
    for bad in [torch.int8, torch.float64]:
        with pytest.raises(ValueError, match=r"dtype.*float32, bfloat16,? (or )?float16"):
            save_checkpoint(model, tmp_path / "ckpt", dtype=bad)
    with pytest.raises(ValueError, match=r"save_checkpoint: dtype must be float32, bfloat16 or float16, got .*float64"):
        save_checkpoint(tiny_ours("cpu", dtype=torch.float32).double(), tmp_path / "ckpt")  # the model's dtype
    load_model(tmp_path / "ckpt", progress=False)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
