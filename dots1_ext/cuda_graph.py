"""CUDA-graph capture and replay of the decode step.

A decode step is ~10 launches per layer whose CPU launch cost exceeds their GPU time at batch 1;
replaying a captured graph removes it. One graph is captured per (batch size, attended-slots bucket)
on first use and replayed afterwards; the inputs (tokens, cache slot) live in static buffers that are
updated in place, and the logits come back in a static buffer (valid until the next replay).

Buckets of attended slots (kv_len) keep a short context from paying for attention over the whole
cache: a step at slot s replays the graph of the smallest bucket > s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # model.py imports this module lazily; a runtime import back would be a cycle
    from dots1_ext.model import Dots1ForCausalLM

MIN_BUCKET = 256


def kv_buckets(max_slots: int) -> list[int]:
    """Powers of two from MIN_BUCKET up to, and ending with, the cache size."""
    buckets, b = [], MIN_BUCKET
    while b < max_slots:
        buckets.append(b)
        b *= 2
    return buckets + [max_slots]


class DecodeGraphs:
    """``graphs(tokens, slot) -> logits``: ``model.decode(tokens, slot)`` through captured CUDA graphs.

    tokens [B] int64 on the model's device; slot: the cache slot the tokens are written at (an int).
    The model's cache must be allocated (setup_cache) before the first call; reallocating it
    invalidates the graphs (call ``reset()``).
    """

    def __init__(self, model: Dots1ForCausalLM):
        if model.device.type != "cuda":
            raise ValueError(f"DecodeGraphs needs a model on a CUDA device, got {model.device}")
        self.model = model
        self.captures = 0  # graphs captured so far (over resets): generate reports the ones it caused
        self.reset()

    def reset(self) -> None:
        # A fresh memory pool too: the old one dies with the graphs dropped here, and capturing into a
        # dead pool's handle trips the caching allocator.
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.cache_key = None
        self.last_key: tuple[int, int] | None = None
        B, S = self.model.model.cache_shape
        self.tokens = torch.zeros(B, dtype=torch.long, device=self.model.device)
        self.slot = torch.zeros((), dtype=torch.long, device=self.model.device)

    def _capture(self, kv_len: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        model = self.model
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph: lazy inits, autotuning, allocations
            for _ in range(2):
                model.decode(self.tokens, self.slot, kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = model.decode(self.tokens, self.slot, kv_len)
        self.captures += 1
        return graph, logits

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        shape = self.model.model.cache_shape
        if shape is None:
            raise ValueError("DecodeGraphs: call model.setup_cache(...) before decoding")
        key = (shape, self.model.model.layers[0].self_attn.k_cache.data_ptr() if len(self.model.model.layers) else 0)
        if key != self.cache_key:  # the cache was reallocated: the captured addresses are stale
            self.reset()
            self.cache_key = key
        B, S = shape
        if not 0 <= slot < S:
            raise IndexError(f"decode slot {slot} is outside the KV cache of {S} slots")
        kv_len = next(b for b in kv_buckets(S) if b > slot)
        self.tokens.copy_(tokens.reshape(B))
        self.slot.fill_(slot)
        entry = self.graphs.get((B, kv_len))
        if entry is None:
            entry = self.graphs[(B, kv_len)] = self._capture(kv_len)
        self.last_key = (B, kv_len)
        graph, logits = entry
        graph.replay()
        return logits

    @torch.no_grad()
    def replay_ms(self, iters: int = 50, warmup: int = 5) -> float:
        """Median GPU time of one replay of the graph used last (CUDA events around each replay,
        nothing else in between): the steady-state decode step that ``generate``'s figure should match.
        It rewrites the last step's cache slot with the same token, so the cache is left as it was."""
        if self.last_key is None:
            raise ValueError("DecodeGraphs.replay_ms: no graph has been replayed yet")
        graph, _ = self.graphs[self.last_key]
        for _ in range(warmup):
            graph.replay()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]
