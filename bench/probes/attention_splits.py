"""Probe: decode attention at batch 1 over split counts, both K/V pipeline depths and both split
combines (clusters; a workspace and a second kernel), against SDPA.

    PYTHONPATH=. python bench/probes/attention_splits.py [out.md]

Real Dots1 attention (32 q and kv heads, head_dim 128, bf16), one sequence at contexts 2048, 8192
and 32768. Each configuration is timed as a CUDA graph of 32 calls cycling through enough cache copies
that the calls read HBM, not L2 (median of 15 replays, per call); the floor is K + V bytes over the
copy bandwidth measured in the same process. The sweep runs twice, each pass on newly allocated caches,
to see how much the figures move with where the cache lies in memory.
"""

from __future__ import annotations

import math
import statistics
import sys

import torch
import torch.nn.functional as F

from bench.common import capture_graph, copy_bandwidth_gbs, env_vars, replay_ms
from dots1_ext.ops import attention as A

HQ = HK = 32
D = 128
ROTATE_BYTES = 256 * 2**20


def time_call(fn, copies: int) -> float:
    calls = [(i % copies,) for i in range(32)]
    graph = capture_graph(fn, calls)
    return statistics.median(replay_ms(graph) for _ in range(15)) / len(calls)


def main() -> int:
    out_path = sys.argv[1] if len(sys.argv) > 1 else None
    bw = copy_bandwidth_gbs()
    lines = [f"# decode attention, B=1, {HQ} heads, D={D}, bf16 — {torch.cuda.get_device_name()}, copy {bw:.0f} GB/s",
             "", "| pass | context | impl | us | floor / time |", "| --- | --- | --- | --- | --- |"]
    scale = 1.0 / math.sqrt(D)
    for rep in range(2):
        for ctx in (2048, 8192, 32768):
            nbytes = 2 * ctx * HK * D * 2
            copies = max(1, -(-ROTATE_BYTES // nbytes))
            kc = [torch.randn(1, ctx, HK, D, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            vc = [torch.randn(1, ctx, HK, D, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            q = torch.randn(1, HQ, D, device="cuda", dtype=torch.bfloat16)
            start = torch.zeros(1, dtype=torch.int64, device="cuda")
            end = torch.full((1,), ctx, dtype=torch.int64, device="cuda")
            floor_us = nbytes / (bw * 1e9) * 1e6
            rows = []
            for combine in ("cluster", "workspace"):
                for splits in ("auto", "1", "2", "4", "8", "16"):
                    for stages in ("auto", "3", "6"):
                        env = {"DOTS1_EXT_ATTENTION_SPLITS": splits, "DOTS1_EXT_ATTENTION_STAGES": stages,
                               "DOTS1_EXT_ATTENTION_COMBINE": combine}
                        with env_vars(env):
                            ms = time_call(lambda i: A.decode_attention(q, kc[i], vc[i], start, end, 0, scale),
                                           copies)
                        rows.append((f"{combine} splits={splits} stages={stages}", ms))
            q4 = q.view(1, HQ, 1, D)
            ms = time_call(lambda i: F.scaled_dot_product_attention(q4, kc[i].transpose(1, 2), vc[i].transpose(1, 2),
                                                                    scale=scale), copies)
            rows.append(("SDPA, no mask", ms))
            for impl, ms in rows:
                lines.append(f"| {rep} | {ctx} | {impl} | {ms * 1e3:.1f} | {floor_us / (ms * 1e3):.2f} |")
            del kc, vc
            torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    print(text)
    if out_path:
        with open(out_path, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
