"""``python -m dots1_ext`` / ``dots1-ext``: load a Dots1 model, generate, time it, check it.

With no arguments it makes (once, cached under $DOTS1_EXT_CACHE or ~/.cache/dots1_ext) a small
random-weight checkpoint in the hub layout, loads it through the real loader, runs prefill and
generation, prints the tokens and tokens/s, and checks the logits against the same model running the
eager reference ops (exit status 1 on FAIL).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from dots1_ext import ops
from dots1_ext.config import dots1_real_config, parse_dtype
from dots1_ext.loader import check_device_memory, load_model, model_bytes, parse_device
from dots1_ext.model import Dots1ForCausalLM, build_random_model
from dots1_ext.parity import ParityResult, logits_parity
from dots1_ext.modules import quantize_experts_
from dots1_ext.quant import EXPERT_FORMATS



class UsageError(Exception):
    """A bad flag value or combination found after parsing: one ``error: ...`` line, exit status 2."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 = greedy), got {text}")
    return value


def _top_p(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text}")
    return value


def _device(text: str) -> torch.device:
    try:
        return parse_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _dtype(text: str) -> torch.dtype:
    try:
        return parse_dtype(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dots1-ext", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="DIR", help="HF Dots1 checkpoint directory (default: the cached tiny model)")
    p.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu | cuda | cuda:N (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--dtype", type=_dtype, help="float32 | bfloat16 | float16 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, help="tokens generated per prompt (default 32)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (token ids separated by spaces when there is no tokenizer)")
    prompt.add_argument("--prompt-len", type=_positive_int, default=32,
                        help="length of the random prompt when --prompt is not given (default 32; with "
                             "--batch-size B, prompt b is 3 b tokens shorter: a left-padded batch)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="prompts generated together (default 1; --prompt repeats the one prompt)")
    p.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=_top_p, default=1.0, help="nucleus sampling mass in (0, 1] (default 1: off)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random prompt, the --real-shape weights and sampling (default 0)")
    p.add_argument("--real-shape", action="store_true",
                   help="random weights at real Dots1 dimensions, built on the device (timing only)")
    p.add_argument("--layers", type=_positive_int, help="layers of the --real-shape model (layer 0 dense; default 3)")
    p.add_argument("--experts", choices=EXPERT_FORMATS, default=None,
                   help="routed experts' format: bf16 (unquantized, in --dtype) or int4 (W4A16, group 128, "
                        "quantized while loading / building; its own decode kernels and, on sm90 with bf16, the "
                        "int4 grouped GEMM for prefill). Default: the checkpoint's (bf16 for --real-shape)")
    p.add_argument("--no-parity", action="store_true", help="skip the check against the reference ops")
    args = p.parse_args(argv)
    if args.layers is not None and not args.real_shape:
        p.error("--layers applies to --real-shape only (a checkpoint has its own layer count)")
    args.layers = 3 if args.layers is None else args.layers
    return args


def load_tokenizer(directory: str | None):
    """(encode, decode) from the checkpoint directory's tokenizer, or None when there is none."""
    if not directory or not any(os.path.exists(os.path.join(directory, f))
                                for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(directory)
        return tok.encode, lambda ids: tok.decode(ids, skip_special_tokens=True)
    except Exception:  # noqa: BLE001 - transformers missing or unable: try the bare tokenizers library
        pass
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        return (lambda text: tok.encode(text).ids), tok.decode
    except Exception:  # noqa: BLE001
        return None


def make_prompts(args, vocab_size: int, encode) -> list[list[int]]:
    """One prompt per sequence. Random prompts get different lengths, so batches are left-padded."""
    if args.prompt is not None:
        if encode is not None:
            ids = encode(args.prompt)
        elif args.prompt.split() and all(part.isdigit() for part in args.prompt.split()):
            ids = [int(part) for part in args.prompt.split()]
        else:
            raise UsageError(f"--prompt {args.prompt!r}: the checkpoint has no tokenizer, so the prompt must be token "
                             f"ids (integers separated by spaces)")
        if not ids or max(ids) >= vocab_size:
            raise UsageError(f"--prompt must give non-empty token ids below the vocabulary size {vocab_size}")
        return [ids] * args.batch_size
    gen = torch.Generator().manual_seed(args.seed)
    lengths = [max(1, args.prompt_len - 3 * b) for b in range(args.batch_size)]
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def build_model(args, device: torch.device, dtype: torch.dtype, info=None) -> tuple[Dots1ForCausalLM, str | None]:
    """The job's model and its checkpoint directory (None for --real-shape). ``info``: the
    dots1_ext.distributed.DistInfo of a torchrun launch; with a world size > 1 the model is this rank's
    expert-parallel shard (its routed experts only) and rank 0 alone prints."""
    sharded = info is not None and info.world_size > 1
    experts = getattr(args, "experts", None)
    if sharded and experts == "int4":
        raise UsageError("--experts int4 is not supported with several ranks yet")
    if sharded:
        from dots1_ext import distributed
    say = print if info is None or info.is_main else (lambda *a, **k: None)
    if args.real_shape:
        config = dots1_real_config(args.layers)
        if sharded:
            say(f"building a random-weight Dots1 at real shape with {args.layers} layers, experts sharded "
                f"over {info.world_size} ranks ...", flush=True)
            return distributed.build_random_model_distributed(config, info, dtype, args.seed), None
        meta = Dots1ForCausalLM(config, device="meta", dtype=dtype)
        if experts == "int4":
            quantize_experts_(meta)
        check_device_memory(model_bytes(meta), device)
        kind = " with int4 experts" if experts == "int4" else ""
        print(f"building a random-weight Dots1 at real shape with {args.layers} layers{kind} on {device} ...", flush=True)
        return build_random_model(config, device=device, dtype=dtype, seed=args.seed, experts=experts or "bf16"), None
    path = args.model
    if path is None:
        from dots1_ext.tiny import cache_dir, make_tiny_checkpoint, tiny_checkpoint_exists

        if not tiny_checkpoint_exists():
            say(f"making the small default checkpoint (once): {cache_dir()} ...", flush=True)
        if sharded:  # rank 0 writes the tiny checkpoint once; the others wait for it
            if info.is_main:
                path = make_tiny_checkpoint()
            distributed.barrier(info)
        path = path or make_tiny_checkpoint()
    if sharded:
        say(f"loading {path} onto {info.world_size} x {device.type} as {dtype} (experts sharded) ...", flush=True)
        return distributed.load_model_distributed(path, info, dtype), path
    kind = " (routed experts quantized to int4)" if experts == "int4" else ""
    print(f"loading {path} onto {device} as {dtype}{kind} ...", flush=True)
    return load_model(path, device=device, dtype=dtype, experts=experts), path


def parity_check(model: Dots1ForCausalLM, prompts: list[list[int]]) -> ParityResult:
    """Prompt logits with the dots1_ext ops vs the reference ops, both judged against the reference ops
    in higher precision, token by token (``dots1_ext.parity``)."""
    return logits_parity(model, prompts)


def run_job(model: Dots1ForCausalLM, args, path: str | None, say=print, label: str = "") -> int:
    """Generates from the prompts, prints tokens, tokens/s and the parity verdict through ``say``.
    Returns the exit status (1 when parity FAILs). Shared by ``main`` and the torchrun entry point."""
    device, dtype = model.device, model.dtype
    tokenizer = load_tokenizer(path) if args.model else None
    encode, decode = tokenizer if tokenizer else (None, None)
    backed = {name: keys for name, keys in ops.reference_backed_ops().items() if device.type.upper() in keys}
    if backed:
        say(f"ops running the eager reference on {device.type} (no compiled kernel): {', '.join(sorted(backed))}")

    prompts = make_prompts(args, model.config.vocab_size, encode)
    # Seeded sampling from bitwise-identical logits: every rank of a distributed run picks the same tokens.
    gen = torch.Generator(device=device).manual_seed(args.seed)
    kwargs = dict(temperature=args.temperature, top_p=args.top_p, generator=gen)
    # The warm-up is the timed call itself, run once before: it allocates the KV cache the timed call
    # reuses and captures every CUDA graph the timed call replays (the timed call must capture none).
    model.generate(prompts, max_new_tokens=args.max_new_tokens, **kwargs)
    timings: dict = {}
    new_tokens = model.generate(prompts, max_new_tokens=args.max_new_tokens, timings=timings, **kwargs)

    for b, (prompt, row) in enumerate(zip(prompts, new_tokens.tolist())):
        say(f"[{b}] prompt ({len(prompt)} tokens): {prompt if decode is None else decode(prompt)!r}")
        say(f"[{b}] generated: {row if decode is None else decode(row)!r}")
    prompt_tokens = sum(len(p) for p in prompts)
    decode_tokens = timings["decode_steps"] * len(prompts)
    say(f"prefill: {prompt_tokens} tokens in {timings['prefill_s'] * 1e3:.1f} ms = "
        f"{prompt_tokens / timings['prefill_s']:.1f} tokens/s")
    if timings["decode_steps"]:
        step_ms = timings["decode_s"] / timings["decode_steps"] * 1e3
        say(f"decode: {timings['decode_steps']} steps x batch {len(prompts)} in {timings['decode_s'] * 1e3:.1f} ms = "
            f"{decode_tokens / timings['decode_s']:.1f} tokens/s ({step_ms:.2f} ms/step)")
        graphs = getattr(model, "_decode_graphs", None)
        if graphs is not None and graphs.last_key is not None and timings.get("graph_captures") == 0:
            replay = graphs.replay_ms()
            say(f"decode step from its CUDA graph alone: {replay:.3f} ms (generate's step: {step_ms / replay:.2f}x; "
                "the rest is sampling and the host loop)")

    if args.no_parity:
        return 0
    check = parity_check(model, prompts)
    say(f"parity of prompt logits, dots1_ext ops vs reference ops ({dtype}{label}): {check.summary()}")
    status = 0 if check.passed else 1
    graphs = getattr(model, "_decode_graphs", None)
    if args.temperature == 0 and graphs is not None and graphs.last_key is not None:
        # The timed generate replayed CUDA graphs captured by the call before it; the same kernels run
        # step by step must give the same tokens, bit for bit (a graph that kept a freed tensor once
        # stopped this job's greedy run early with a PASS above).
        eager = model.generate(prompts, max_new_tokens=args.max_new_tokens, cuda_graphs=False)
        if eager.shape == new_tokens.shape and torch.equal(eager, new_tokens):
            say(f"greedy tokens, CUDA-graph decode vs eager decode: identical ({new_tokens.numel()} tokens); PASS")
        else:
            status = 1
            say(f"greedy tokens, CUDA-graph decode vs eager decode: differ (graphs {new_tokens.tolist()}, eager "
                f"{eager.tolist()}); FAIL")
    return status


def _run_job_or_usage_error(model, args, path, say, info, label: str = "") -> int:
    try:
        return run_job(model, args, path, say, label=label)
    except UsageError as e:  # a --prompt the model cannot take
        if info is None or info.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


def main(argv=None) -> int:
    """Runs the job; returns the exit status: 0, 1 when parity FAILs, 2 for bad flags or a checkpoint
    that cannot be loaded (one ``error: ...`` line on stderr). Under torchrun (WORLD_SIZE > 1) the routed experts are
    sharded over the ranks (dots1_ext.distributed) and rank 0 prints."""
    from dots1_ext.loader import CheckpointError

    args = parse_args(argv)
    info = None
    world_size = os.environ.get("WORLD_SIZE", "1")
    if not world_size.strip().isdigit():
        print(f"error: WORLD_SIZE must be a whole number, got {world_size!r}", file=sys.stderr, flush=True)
        return 2
    if int(world_size) > 1:  # launched by torchrun
        from dots1_ext import distributed

        info = distributed.init_from_env(args.device)
        device = info.device
    else:
        device = args.device
    say = print if info is None or info.is_main else (lambda *a, **k: None)
    model = None
    try:
        dtype = parse_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        torch.manual_seed(args.seed)
        try:
            model, path = build_model(args, device, dtype, info)
        except (CheckpointError, UsageError, ValueError) as e:  # the flags or the checkpoint: not a bug
            if info is None or info.is_main:
                print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        c = model.config
        if info is None or info.world_size == 1:
            n_params = sum(p.numel() for p in model.parameters())
            from dots1_ext.modules import is_int4

            kind = ", int4 routed experts" if is_int4(model) else ""
            say(f"model: {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.n_routed_experts} experts top-"
                f"{c.num_experts_per_tok}, {n_params / 1e6:.1f}M parameters, {model_bytes(model) / 2**30:.3f} GiB of "
                f"weights, {device}, {dtype}{kind}")
            return _run_job_or_usage_error(model, args, path, say, info)
        say(f"model: {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.n_routed_experts} experts top-"
            f"{c.num_experts_per_tok}, {info.world_size} rank(s) x {(c.n_routed_experts or 0) // info.world_size} experts, "
            f"{model_bytes(model) / 2**30:.2f} GiB of weights per rank, {device}, {dtype}")
        return _run_job_or_usage_error(model, args, path, say, info, label=f", {info.world_size} ranks")
    finally:
        if info is not None:
            distributed.shutdown(info, model)


if __name__ == "__main__":
    sys.exit(main())
