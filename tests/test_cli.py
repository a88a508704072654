"""The main job: `python -m dots1_ext` end to end (tiny cached checkpoint, --model with a tokenizer,
--real-shape), printing tokens, tokens/s and a PASS/FAIL parity check against the reference ops."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch
from conftest import requires_cuda
from test_model import BASE, tiny_ours

from dots1_ext import cli
from dots1_ext.config import Dots1Config
from dots1_ext.loader import load_model, save_checkpoint
from dots1_ext.tiny import TINY_VERSION, make_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dots1_ext_cache"))


def test_python_m_dots1_ext_on_cpu(cache_root):
    env = dict(os.environ, DOTS1_EXT_CACHE=cache_root,
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "dots1_ext", "--device", "cpu", "--max-new-tokens", "4"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "PASS" in out and "FAIL" not in out
    assert "generated:" in out and "prefill:" in out and "tokens/s" in out
    ckpt = os.path.join(cache_root, f"tiny-dots1-v{TINY_VERSION}")
    assert os.path.exists(os.path.join(ckpt, "model.safetensors.index.json"))  # made once, sharded hub layout
    assert f"making the small default checkpoint (once): {ckpt}" in out  # a fresh cache: it says so
    assert "loading weights:" in proc.stderr


def test_cli_batch_sampling(cache_root, device, monkeypatch, capsys):
    monkeypatch.setenv("DOTS1_EXT_CACHE", cache_root)
    make_tiny_checkpoint()  # (usually made by the test before)
    rc = cli.main(["--device", device, "--max-new-tokens", "3", "--batch-size", "3", "--prompt-len", "20",
                   "--temperature", "0.8", "--top-p", "0.9"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS" in out and "[2] generated:" in out and "(14 tokens)" in out  # ragged, left-padded batch
    assert "making the small default checkpoint" not in out  # there already: loaded, not remade


def test_default_job_prints_the_tokens_of_eager_decoding(cache_root, device, monkeypatch, capsys):
    # The job times its second generate, which replays the CUDA graphs the first one captured. On the H200
    # a graph that kept a freed tensor stopped the greedy run after 7 of 32 tokens, with exit status 0 and
    # PASS. The tokens printed must be the eager step-by-step decode's.
    monkeypatch.setenv("DOTS1_EXT_CACHE", cache_root)
    path = make_tiny_checkpoint()
    assert cli.main(["--device", device, "--no-parity"]) == 0
    out = capsys.readouterr().out
    printed = ast.literal_eval(out.split("[0] generated: ")[1].splitlines()[0])
    args = cli.parse_args(["--device", device])
    model = load_model(path, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    prompts = cli.make_prompts(args, model.config.vocab_size, None)
    eager = model.generate(prompts, max_new_tokens=args.max_new_tokens, cuda_graphs=False)
    assert printed == eager[0].tolist(), (printed, eager)


@requires_cuda
def test_job_fails_when_the_graph_tokens_differ_from_eager_decoding(cache_root, monkeypatch, capsys):
    from dots1_ext.cuda_graph import DecodeGraphs

    monkeypatch.setenv("DOTS1_EXT_CACHE", cache_root)
    make_tiny_checkpoint()
    assert cli.main(["--device", "cuda", "--max-new-tokens", "6"]) == 0
    assert "CUDA-graph decode vs eager decode: identical (6 tokens); PASS" in capsys.readouterr().out
    real = DecodeGraphs.greedy_decode

    def one_token_off(self, *args, **kwargs):  # a stand-in for a graph that reads a stale buffer
        out = real(self, *args, **kwargs)
        out[:, -1] = (out[:, -1] + 1) % 1024
        return out

    monkeypatch.setattr(DecodeGraphs, "greedy_decode", one_token_off)
    assert cli.main(["--device", "cuda", "--max-new-tokens", "6"]) == 1
    out = capsys.readouterr().out
    assert "CUDA-graph decode vs eager decode: differ" in out and out.rstrip().endswith("FAIL")


def test_cli_model_dir_with_tokenizer(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    save_checkpoint(tiny_ours("cpu", eos_token_id=None), tmp_path)
    vocab = {f"w{i}": i for i in range(BASE["vocab_size"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    rc = cli.main(["--model", str(tmp_path), "--device", "cpu", "--max-new-tokens", "5", "--prompt", "w5 w17 w33"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "prompt (3 tokens): 'w5 w17 w33'" in out
    generated = out.split("[0] generated: ")[1].splitlines()[0]
    assert generated.startswith("'w") and len(generated.strip("'").split()) == 5


def test_cli_real_shape_path_on_small_dims(monkeypatch, capsys):
    # The --real-shape code path, at toy dimensions so that it runs on a CPU.
    small = dict(BASE, n_group=1, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
                 routed_scaling_factor=2.5)
    monkeypatch.setattr(cli, "dots1_real_config", lambda layers: Dots1Config(**{**small, "num_hidden_layers": layers}))
    rc = cli.main(["--real-shape", "--layers", "2", "--device", "cpu", "--max-new-tokens", "2", "--prompt-len", "8"])
    out = capsys.readouterr().out
    assert rc == 0 and "2 layers" in out and "PASS" in out


@requires_cuda
def test_cli_real_shape_on_cuda(capsys):
    rc = cli.main(["--real-shape", "--layers", "2", "--device", "cuda", "--max-new-tokens", "8", "--prompt-len", "128"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "hidden 4096, 128 experts top-6" in out and "PASS" in out
    torch.cuda.empty_cache()


def test_parity_check_fails_on_a_wrong_op(cache_root, monkeypatch, capsys):
    # A broken compiled op must turn the verdict into FAIL and the exit status into 1.
    from dots1_ext import modules

    monkeypatch.setenv("DOTS1_EXT_CACHE", cache_root)
    wrong = dict(vars(modules.REFERENCE_OPS))
    wrong["rms_norm"] = lambda x, w, eps: modules.REFERENCE_OPS.rms_norm(x, w, eps) * 1.01
    monkeypatch.setattr(modules, "ops", type(modules.REFERENCE_OPS)(**wrong))
    rc = cli.main(["--device", "cpu", "--max-new-tokens", "2", "--prompt-len", "8"])
    assert rc == 1 and "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_parity_check_fails_on_a_wrong_routed_scaling_factor(cache_root, monkeypatch, capsys, dtype):
    # A gating kernel applying the wrong routed_scaling_factor (2.5 -> 2.0) must FAIL in either dtype,
    # while the same run with the right factor PASSes (the criterion separates rounding from bugs).
    from dots1_ext import modules

    monkeypatch.setenv("DOTS1_EXT_CACHE", cache_root)
    args = ["--device", "cpu", "--dtype", dtype, "--max-new-tokens", "2", "--prompt-len", "12", "--batch-size", "2"]
    assert cli.main(args) == 0 and "PASS" in capsys.readouterr().out
    wrong = dict(vars(modules.REFERENCE_OPS))
    good_router, good_topk = wrong["router_topk_gating"], wrong["topk_gating"]
    wrong["router_topk_gating"] = lambda h, w, b, k, ng=1, tg=1, renorm=True, scale=1.0: good_router(
        h, w, b, k, ng, tg, renorm, scale * 0.8)
    wrong["topk_gating"] = lambda logits, b, k, ng=1, tg=1, renorm=True, scale=1.0: good_topk(
        logits, b, k, ng, tg, renorm, scale * 0.8)
    monkeypatch.setattr(modules, "ops", type(modules.REFERENCE_OPS)(**wrong))
    rc = cli.main(args)
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL" in out and "reference ops in" in out, out


def test_parity_check_fails_on_one_wrong_token(cache_root, monkeypatch, capsys):
    # One token of one sequence off (an error diluted below any whole-tensor norm) still fails.
    from dots1_ext import modules

    monkeypatch.setenv("DOTS1_EXT_CACHE", cache_root)
    wrong = dict(vars(modules.REFERENCE_OPS))
    good_unpermute = wrong["unpermute"]

    def unpermute_one_row_off(*a, **kw):
        y = good_unpermute(*a, **kw)
        if y.shape[0] > 1:
            y[1] *= 1.05
        return y

    wrong["unpermute"] = unpermute_one_row_off
    monkeypatch.setattr(modules, "ops", type(modules.REFERENCE_OPS)(**wrong))
    rc = cli.main(["--device", "cpu", "--max-new-tokens", "2", "--prompt-len", "16", "--batch-size", "3"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL" in out, out


@pytest.mark.parametrize("flag, value", [("--max-new-tokens", "-5"), ("--max-new-tokens", "0"), ("--top-p", "0"),
                                         ("--top-p", "1.5"), ("--top-p", "nan"), ("--temperature", "-1"),
                                         ("--temperature", "nan"), ("--batch-size", "0"), ("--prompt-len", "0"),
                                         ("--dtype", "int8"), ("--layers", "0"), ("--device", "gpu"),
                                         ("--device", "meta"), ("--device", ""), ("--device", "cuda:99"),
                                         ("--seed", "-1"), ("--seed", "99999999999999999999999")])
def test_cli_rejects_bad_arguments(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--device", "cpu", flag, value] if flag != "--device" else [flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--prompt", "5 6", "--prompt-len", "7"], "--prompt-len: not allowed with argument --prompt"),
    (["--layers", "4"], "--layers applies to --real-shape only"),
])
def test_cli_rejects_flag_combinations(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--device", "cpu", *argv])
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("prompt", ["", "   ", "5 x 6", "-5 3", "hello", "5 99999"])
def test_cli_bad_prompt_without_tokenizer_is_one_error_line(prompt, capsys):
    # No tokenizer: the prompt is token ids; anything else used to be byte-encoded silently (text) or exit 1.
    assert cli.main(["--device", "cpu", "--prompt", prompt, "--max-new-tokens", "2", "--no-parity"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert errors and len(errors) == 1 and errors[0].startswith("error: --prompt") and "Traceback" not in err, err


def test_cli_model_that_cannot_be_built_is_one_error_line(tmp_path, capsys):
    # int4 experts need hidden_size % 128 == 0: a ValueError from the build is the user's (exit 2), not a bug.
    save_checkpoint(tiny_ours("cpu", hidden_size=64, head_dim=16), tmp_path)
    assert cli.main(["--model", str(tmp_path), "--device", "cpu", "--experts", "int4", "--no-parity"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "128" in errors[0] and "Traceback" not in err, err


def test_bad_checkpoint_is_one_error_line_and_exit_2(tmp_path, capsys):
    # A truncated shard: `python -m dots1_ext` prints one `error: ...` line naming the file, no traceback.
    save_checkpoint(tiny_ours("cpu"), tmp_path)
    shard = tmp_path / "model.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "dots1_ext", "--model", str(tmp_path), "--device", "cpu"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {shard}: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    # In process, for each kind of checkpoint problem: exit status 2 and the file named.
    (tmp_path / "config.json").write_text("{")
    assert cli.main(["--model", str(tmp_path), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'config.json'}: invalid JSON")
    assert cli.main(["--model", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
