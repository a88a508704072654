"""Greedy generation agreement with transformers, same random-weight checkpoint.

The CLI's default tiny checkpoint (hub layout, loaded through dots1_ext's loader and through
transformers' from_pretrained), 8 prompts, 32 greedy tokens each. Reports, per dtype/device, the
share of positions generated before the first divergence (100% = identical continuations). fp32 on
the CPU must be identical; bf16 on the GPU differs by rounding (a near-tie can flip a token, after
which the continuations legitimately part ways).
"""

from __future__ import annotations

import torch

from bench.common import bench_main, on_gpu, Report, Row

PROMPTS, NEW_TOKENS = 8, 32


def agreement(device: str, dtype: torch.dtype) -> tuple[float, list[int]]:
    from transformers import AutoModelForCausalLM

    from dots1_ext.loader import load_model
    from dots1_ext.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint()
    ours = load_model(path, device=device, dtype=dtype, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    prefix = []
    for p in range(PROMPTS):
        prompt = torch.randint(3, ours.config.vocab_size, (1, 8 + 3 * p), generator=gen).to(device)
        mine = ours.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=[])[0].tolist()
        with torch.no_grad():
            theirs = hf.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=0)[0, prompt.shape[1]:].tolist()
        same = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        prefix.append(same)
    return sum(prefix) / (PROMPTS * NEW_TOKENS), prefix


def run(quick: bool = False) -> list[Report]:
    report = Report(f"greedy generation agreement with transformers ({PROMPTS} prompts x {NEW_TOKENS} tokens, "
                    "share of positions before the first divergence)")
    cases = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if on_gpu() else [])
    for device, dtype in cases:
        share, prefix = agreement(device, dtype)
        report.add(Row("generation", f"{device} {str(dtype)[6:]}", "dots1_ext vs transformers", ms=float("nan"),
                       extra={"agreement": round(share, 4), "first_divergence": prefix}))
        print(f"[generation] {device} {dtype}: {share:.1%} of positions before the first divergence; per prompt {prefix}")
    return [report]


if __name__ == "__main__":
    bench_main(run, __doc__)
