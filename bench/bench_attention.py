"""Decode attention benchmark: one query per sequence over a static KV cache, real Dots1 attention shape.

    python -m bench.bench_attention            # GPU: B in {1, 8, 32} x context in {256, 2048, 16384, 32768}
    python -m bench.bench_attention --quick    # fewer cases

Shape: MHA, 32 query and 32 kv heads, head_dim 128, bf16; q is the first 32 heads of a fused qkv
activation (the model's layout); every sequence attends to its whole context [0, ctx). Cases whose
cache (K + V) would exceed 8 GiB are skipped; one extra case puts a 2048-key context in a 32768-slot
cache (the capacity must not cost anything). Peers, timed in the same run: SDPA with the equivalent
boolean mask over the whole cache (what a static-cache decoder does), SDPA without a mask over exactly
the attended keys (the unmasked ideal, is_causal=False), and flex_attention (compiled, with a block
mask from the device lengths) where it compiles. Times are GPU time per call inside a CUDA graph (32
calls per graph, median of 20 replays): these kernels take microseconds, less than a launch. The calls
of a graph cycle through enough copies of the cache that the K and V they attend to (at least
ROTATE_BYTES, 5x the H200's 50 MB L2) come from HBM, as in a model step, where the other layers' weights
evict the cache between two visits. The floor is the bytes of K and V actually attended over the
measured device copy bandwidth; floor / time is the fraction of it reached. For B <= 8 the full run also times each forced split count
(DOTS1_EXT_ATTENTION_SPLITS) beside the automatic choice.

The decode step's whole attention, from the raw qkv activation: qk_norm_rope_kv_cache_ + decode_attention
(two launches, what Dots1Attention runs with DOTS1_EXT_ATTENTION_FUSED_QK=0) against
qk_norm_rope_decode_attention (one launch, =1), same inputs, same graph timing.
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from bench.common import Report, Row, bench_main, bytes_floor_ms, capture_graph, env_vars, on_gpu, replay_ms, time_fn
from dots1_ext import ops
from dots1_ext.ops import attention as A
from dots1_ext.rope import build_cos_sin_cache

HQ = HK = 32
D = 128
MAX_CACHE_BYTES = 8 << 30
ROTATE_BYTES = 256 << 20  # attended K + V bytes one graph cycles through (beyond L2)
MAX_ROTATED_BYTES = 16 << 30  # allocated cache bytes of all the copies together


def _flex():
    """(flex_attention compiled, create_block_mask) or a reason string."""
    if not on_gpu():
        return "flex_attention is Triton (GPU only)"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"flex_attention not importable ({type(exc).__name__}: {exc})"
    return torch.compile(flex_attention, dynamic=False), create_block_mask


class Bench:
    def __init__(self, quick: bool):
        self.quick = quick
        self.device = "cuda" if on_gpu() else "cpu"
        self.dtype = torch.bfloat16 if on_gpu() else torch.float32
        self.heads = (HQ, HK) if on_gpu() else (4, 4)
        self.flex = _flex()
        self.notes: list[str] = []
        if isinstance(self.flex, str):
            self.notes.append(f"flex_attention rows skipped: {self.flex}")

    def time_ms(self, fn: Callable[[int], object], copies: int) -> tuple[float, str]:
        """GPU: per-call time inside a CUDA graph whose calls cycle through the ``copies`` caches (falls
        back to per-call CUDA events if the capture fails); CPU: perf_counter."""
        if on_gpu():
            try:
                calls = [(i % copies,) for i in range(max(32, copies))]
                graph = capture_graph(fn, calls)
                times = [replay_ms(graph) for _ in range(20)]
                return statistics.median(times) / len(calls), "graph"
            except Exception as exc:  # noqa: BLE001 - e.g. a peer that cannot be captured
                torch.cuda.synchronize()
                self.notes.append(f"graph capture failed ({type(exc).__name__}), per-call timing used")
        return time_fn(lambda: fn(0), warmup=3 if self.quick else 10, iters=10 if self.quick else 50), "per call"

    def add(self, report: Report, case: str, impl: str, fn: Callable[[int], object], nbytes: float,
            copies: int = 1) -> None:
        try:
            with torch.no_grad():
                fn(0)
                ms, how = self.time_ms(fn, copies)
        except Exception as exc:  # noqa: BLE001 - a peer failing must not hide the others
            self.notes.append(f"{impl} failed for {case}: {type(exc).__name__}: {str(exc)[:160]}")
            return
        report.add(Row("attention", case, impl, ms, floor_ms=bytes_floor_ms(nbytes), gbs=nbytes / (ms * 1e-3) / 1e9,
                       extra={"timing": how}))

    def case(self, report: Report, B: int, ctx: int, capacity: int) -> None:
        dev, dt = self.device, self.dtype
        Hq, Hk = self.heads
        qkv = torch.randn(B, (Hq + 2 * Hk) * D, device=dev, dtype=dt)
        q = qkv.view(B, Hq + 2 * Hk, D)[:, :Hq]
        elem = torch.finfo(dt).bits // 8
        nbytes = 2 * B * ctx * Hk * D * elem
        copies = 1
        if on_gpu():  # enough caches that a graph's calls read HBM, not L2
            copies = max(1, min(-(-ROTATE_BYTES // nbytes), MAX_ROTATED_BYTES // (2 * B * capacity * Hk * D * elem)))
        k_caches = [torch.randn(B, capacity, Hk, D, device=dev, dtype=dt) for _ in range(copies)]
        v_caches = [torch.randn(B, capacity, Hk, D, device=dev, dtype=dt) for _ in range(copies)]
        kv_start = torch.zeros(B, dtype=torch.int64, device=dev)
        kv_end = torch.full((B,), ctx, dtype=torch.int64, device=dev)
        scale = 1.0 / math.sqrt(D)
        case = f"B={B} ctx={ctx}" + (f" (cache {capacity})" if capacity != ctx else "")
        add = lambda impl, fn: self.add(report, case, impl, fn, nbytes, copies)  # noqa: E731

        ours = lambda i: A.decode_attention(q, k_caches[i], v_caches[i], kv_start, kv_end, 0, scale)  # noqa: E731
        add("dots1_ext", ours)
        if on_gpu() and not self.quick and B <= 8:
            # The automatic split count against each forced one (captured into the graph at its count).
            for splits in ("1", "2", "4", "8", "16"):
                with env_vars({"DOTS1_EXT_ATTENTION_SPLITS": splits}):
                    add(f"dots1_ext (splits={splits})", ours)
            # Both K/V pipeline depths forced (the automatic choice: 3 stages in the default
            # workspace mode).
            for stages in ("3", "6"):
                with env_vars({"DOTS1_EXT_ATTENTION_STAGES": stages}):
                    add(f"dots1_ext ({stages} stages)", ours)
            # The cluster combine (the splits of a head in one thread-block cluster, no second kernel)
            # at each split count; the rows above are the default workspace combine.
            for splits in ("auto", "2", "4", "8", "16"):
                with env_vars({"DOTS1_EXT_ATTENTION_COMBINE": "cluster", "DOTS1_EXT_ATTENTION_SPLITS": splits}):
                    add(f"dots1_ext (cluster combine, splits={splits})", ours)

        # The whole decode-step attention from the raw qkv (q, k rotated in place by the two-op path on
        # every call: the times, not the values, matter here; the norm keeps them bounded).
        k_new, v_new = qkv.view(B, Hq + 2 * Hk, D)[:, Hq:Hq + Hk], qkv.view(B, Hq + 2 * Hk, D)[:, Hq + Hk:]
        q_weight = torch.ones(D, device=dev, dtype=dt)
        k_weight = torch.ones(D, device=dev, dtype=dt)
        cos_sin = build_cos_sin_cache(D, capacity, 10000.0, None, torch.device(dev))
        positions = kv_end - 1
        cache_rows = torch.arange(B, device=dev) * capacity + kv_end - 1

        def two_ops(i):
            ops.qk_norm_rope_kv_cache_(q, k_new, v_new, q_weight, k_weight, positions, cos_sin, 1e-6, k_caches[i],
                                       v_caches[i], cache_rows)
            return A.decode_attention(q, k_caches[i], v_caches[i], kv_start, kv_end, 0, scale)

        add("qk_norm_rope_kv_cache_ + decode_attention (raw qkv)", two_ops)
        add("qk_norm_rope_decode_attention (raw qkv, one launch)",
            lambda i: A.qk_norm_rope_decode_attention(q, k_new, v_new, q_weight, k_weight, positions, cos_sin, 1e-6,
                                                      k_caches[i], v_caches[i], cache_rows, kv_start, kv_end, 0,
                                                      scale))

        # SDPA views of the cache as [B, H, S, D] (no copies); q as [B, H, 1, D].
        q4 = q[:, :, None]
        k4 = [k.transpose(1, 2) for k in k_caches]
        v4 = [v.transpose(1, 2) for v in v_caches]
        mask = (torch.arange(capacity, device=dev)[None] < kv_end[:, None])[:, None, None, :]  # [B, 1, 1, S]
        add("SDPA, boolean mask over the cache",
            lambda i: F.scaled_dot_product_attention(q4, k4[i], v4[i], attn_mask=mask, scale=scale))
        add("SDPA, no mask, exactly the attended keys",
            lambda i: F.scaled_dot_product_attention(q4, k4[i][:, :, :ctx], v4[i][:, :, :ctx], is_causal=False,
                                                     scale=scale))

        if not isinstance(self.flex, str):
            flex_attention, create_block_mask = self.flex
            try:
                block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < kv_end[b], B, None, 1, capacity,
                                               device=dev)
            except Exception as exc:  # noqa: BLE001
                self.notes.append(f"flex_attention block mask failed for {case}: {type(exc).__name__}: {str(exc)[:160]}")
                return
            add("flex_attention (compiled, block mask)",
                lambda i: flex_attention(q4, k4[i], v4[i], block_mask=block_mask, scale=scale))


def run(quick: bool = False) -> list[Report]:
    b = Bench(quick)
    report = Report(f"decode attention ({'bf16, 32 heads, D=128' if on_gpu() else 'fp32 CPU, 4 heads, D=128'})")
    if on_gpu():
        batches = [1, 32] if quick else [1, 8, 32]
        contexts = [2048, 16384] if quick else [256, 2048, 16384, 32768]
        # A subset for a short run: DOTS1_BENCH_ATTENTION_BATCHES=1 DOTS1_BENCH_ATTENTION_CONTEXTS=2048,32768
        if os.environ.get("DOTS1_BENCH_ATTENTION_BATCHES"):
            batches = [int(v) for v in os.environ["DOTS1_BENCH_ATTENTION_BATCHES"].split(",")]
        if os.environ.get("DOTS1_BENCH_ATTENTION_CONTEXTS"):
            contexts = [int(v) for v in os.environ["DOTS1_BENCH_ATTENTION_CONTEXTS"].split(",")]
        cases = [(B, ctx, ctx) for B in batches for ctx in contexts
                 if 2 * B * ctx * HK * D * 2 <= MAX_CACHE_BYTES]
        cases.append((1, 2048, 32768))
    else:
        cases = [(1, 256, 256), (2, 64, 256)]
    for B, ctx, capacity in cases:
        b.case(report, B, ctx, capacity)
        if on_gpu():
            torch.cuda.empty_cache()
    report.notes = list(dict.fromkeys(b.notes))
    return [report]


if __name__ == "__main__":
    bench_main(run, __doc__)
