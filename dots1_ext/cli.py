"""``python -m dots1_ext`` / ``dots1-ext``: load a Dots1 model, generate, time it, check it.

With no arguments it makes (once, cached under $DOTS1_EXT_CACHE or ~/.cache/dots1_ext) a small
random-weight checkpoint in the hub layout, loads it through the real loader, runs prefill and
generation, prints the tokens and tokens/s, and checks the logits against the same model running the
eager reference ops (exit status 1 on FAIL).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from dots1_ext import ops
from dots1_ext.config import dots1_real_config, parse_dtype
from dots1_ext.loader import check_device_memory, load_model, model_bytes
from dots1_ext.model import Dots1ForCausalLM, build_random_model, left_pad, reference_ops

# Relative error norm of the logits allowed between the compiled ops and the reference ops, in the
# same dtype: fp32 differs only by summation order; bf16/fp16 round intermediate tensors differently.
PARITY_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dots1-ext", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="DIR", help="HF Dots1 checkpoint directory (default: the cached tiny model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompt", help="prompt text (token ids separated by spaces when there is no tokenizer)")
    p.add_argument("--prompt-len", type=int, default=32, help="length of the random prompt when --prompt is not given")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real-shape", action="store_true",
                   help="random weights at real Dots1 dimensions, built on the device (timing only)")
    p.add_argument("--layers", type=int, default=3, help="layers of the --real-shape model (layer 0 dense)")
    p.add_argument("--no-parity", action="store_true", help="skip the check against the reference ops")
    return p.parse_args(argv)


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
        elif all(part.isdigit() for part in args.prompt.split()):
            ids = [int(part) for part in args.prompt.split()]
        else:
            ids = [b % vocab_size for b in args.prompt.encode()]
        if not ids or max(ids) >= vocab_size:
            raise SystemExit(f"error: the prompt must be non-empty token ids below the vocabulary size {vocab_size}")
        return [ids] * args.batch_size
    gen = torch.Generator().manual_seed(args.seed)
    lengths = [max(1, args.prompt_len - 3 * b) for b in range(args.batch_size)]
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def build_model(args, device: torch.device, dtype: torch.dtype, info=None) -> tuple[Dots1ForCausalLM, str | None]:
    """The job's model and its checkpoint directory (None for --real-shape). ``info``: the
    dots1_ext.distributed.DistInfo of a torchrun launch; with a world size > 1 the model is this rank's
    expert-parallel shard (its routed experts only) and rank 0 alone prints."""
    sharded = info is not None and info.world_size > 1
    if sharded:
        from dots1_ext import distributed
    say = print if info is None or info.is_main else (lambda *a, **k: None)
    if args.real_shape:
        config = dots1_real_config(args.layers)
        if sharded:
            say(f"building a random-weight Dots1 at real shape with {args.layers} layers, experts sharded "
                f"over {info.world_size} ranks ...", flush=True)
            return distributed.build_random_model_distributed(config, info, dtype, args.seed), None
        check_device_memory(model_bytes(Dots1ForCausalLM(config, device="meta", dtype=dtype)), device)
        print(f"building a random-weight Dots1 at real shape with {args.layers} layers on {device} ...", flush=True)
        return build_random_model(config, device=device, dtype=dtype, seed=args.seed), None
    path = args.model
    if path is None:
        from dots1_ext.tiny import make_tiny_checkpoint

        if sharded:  # rank 0 writes the tiny checkpoint once; the others wait for it
            if info.is_main:
                path = make_tiny_checkpoint()
            distributed.barrier(info)
        path = path or make_tiny_checkpoint()
    if sharded:
        say(f"loading {path} onto {info.world_size} x {device.type} as {dtype} (experts sharded) ...", flush=True)
        return distributed.load_model_distributed(path, info, dtype), path
    print(f"loading {path} onto {device} as {dtype} ...", flush=True)
    return load_model(path, device=device, dtype=dtype), path


def parity_check(model: Dots1ForCausalLM, prompts: list[list[int]]) -> dict:
    """Prompt logits (real tokens only) with the dots1_ext ops vs with the reference ops, same dtype.

    PASS when the relative error norm of all logits is below the dtype's tolerance, or when at most
    10% of the tokens (at least one) exceed it and the whole stays below 5x the tolerance: rounding
    can flip a near-tied routing decision, which moves that one token's logits, never all of them."""
    ids, mask = left_pad(prompts, device=model.device)
    logits = model(ids, mask)
    with reference_ops():
        expected = model(ids, mask)
    real = mask.bool()
    out, ref = logits[real].double(), expected[real].double()  # [N, V]
    tol = PARITY_TOL[model.dtype]

    def rel(a, b):
        return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)) if a.dim() > 1 else rel(a[None], b[None])[0]

    finite = bool(torch.isfinite(out).all())
    err = rel(out.flatten(), ref.flatten()).item() if finite else float("inf")
    tokens_off = int((rel(out, ref) >= tol).sum()) if finite else out.shape[0]
    allowed = max(1, out.shape[0] // 10)
    passed = finite and (err < tol or (tokens_off <= allowed and err < 5 * tol))
    return dict(rel_err=err, tol=tol, tokens_off=tokens_off, tokens=out.shape[0], passed=passed)


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
    model.generate(prompts, max_new_tokens=min(2, args.max_new_tokens), **kwargs)  # warm-up (and graph capture)
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
        say(f"decode: {timings['decode_steps']} steps x batch {len(prompts)} in {timings['decode_s'] * 1e3:.1f} ms = "
            f"{decode_tokens / timings['decode_s']:.1f} tokens/s "
            f"({timings['decode_s'] / timings['decode_steps'] * 1e3:.2f} ms/step)")

    if args.no_parity:
        return 0
    check = parity_check(model, prompts)
    verdict = "PASS" if check["passed"] else "FAIL"
    say(f"parity of prompt logits, dots1_ext ops vs reference ops ({dtype}{label}): rel err {check['rel_err']:.3e} "
        f"(tol {check['tol']:.0e}; tokens beyond tol: {check['tokens_off']}/{check['tokens']}) {verdict}")
    return 0 if check["passed"] else 1


def main(argv=None) -> int:
    """Runs the job; returns the exit status: 0, 1 when parity FAILs, 2 for a checkpoint that cannot be
    loaded (one ``error: ...`` line on stderr). Under torchrun (WORLD_SIZE > 1) the routed experts are
    sharded over the ranks (dots1_ext.distributed) and rank 0 prints."""
    from dots1_ext.loader import CheckpointError

    args = parse_args(argv)
    info = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        from dots1_ext import distributed

        info = distributed.init_from_env(args.device)
        device = info.device
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda requested but no CUDA device is available")
    say = print if info is None or info.is_main else (lambda *a, **k: None)
    try:
        dtype = parse_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        torch.manual_seed(args.seed)
        try:
            model, path = build_model(args, device, dtype, info)
        except CheckpointError as e:
            if info is None or info.is_main:
                print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        c = model.config
        if info is None or info.world_size == 1:
            n_params = sum(p.numel() for p in model.parameters())
            say(f"model: {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.n_routed_experts} experts top-"
                f"{c.num_experts_per_tok}, {n_params / 1e6:.1f}M parameters, {device}, {dtype}")
            return run_job(model, args, path, say)
        say(f"model: {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.n_routed_experts} experts top-"
            f"{c.num_experts_per_tok}, {info.world_size} rank(s) x {(c.n_routed_experts or 0) // info.world_size} experts, "
            f"{model_bytes(model) / 2**30:.2f} GiB of weights per rank, {device}, {dtype}")
        return run_job(model, args, path, say, label=f", {info.world_size} ranks")
    finally:
        if info is not None:
            distributed.shutdown(info)


if __name__ == "__main__":
    sys.exit(main())
