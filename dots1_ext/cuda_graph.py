"""CUDA-graph capture and replay of the decode step.

A decode step is ~10 launches per layer whose CPU launch cost exceeds their GPU time at batch 1;
replaying a captured graph removes it. One graph is captured per (batch size, kind) on first use and
replayed afterwards; its inputs live in static buffers updated in place, and the cache slot is a device
tensor: decode attention reads each sequence's [cache_start, slot + 1) from the device, so the same
graph serves every length at the cost of that length. Two kinds:

- ``graphs(tokens, slot) -> logits``: one decode step; the logits come back in a static buffer (valid
  until the next replay). ``generate`` samples from them (temperature > 0) outside the graph.
- ``graphs.greedy_decode(...)``: greedy decoding with the whole step inside the graph: decode, argmax,
  the finished/pad bookkeeping, the token written to a history buffer and the slot advanced, all on the
  device. The host only replays (and every few steps reads whether all sequences finished), so a step
  costs what its graph costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from dots1_ext.sampling import sample

if TYPE_CHECKING:  # model.py imports this module lazily; a runtime import back would be a cycle
    from dots1_ext.model import Dots1ForCausalLM

class DecodeGraphs:
    """Decode steps of ``model`` through captured CUDA graphs (see the module docstring).

    The model's cache must be allocated (setup_cache) before the first call; a reallocated cache is
    noticed (its address changes) and the graphs are captured anew. ``captures`` counts every capture.
    """

    def __init__(self, model: Dots1ForCausalLM):
        if model.device.type != "cuda":
            raise ValueError(f"DecodeGraphs needs a model on a CUDA device, got {model.device}")
        self.model = model
        # Layer 0's attention, whose k_cache buffer tells a new cache (_sync_with_cache): held here
        # because each nn.Module attribute lookup on the way to it costs ~1.5 µs of Python per call.
        layers = model.model.layers
        self._attn0 = layers[0].self_attn if len(layers) else None
        self.captures = 0  # graphs captured so far (over resets): generate reports the ones it caused
        self.cache_key = None
        self.graphs: dict = {}
        self.last_key: tuple | None = None

    def reset(self) -> None:
        # A fresh memory pool too: the old one dies with the graphs dropped here, and capturing into a
        # dead pool's handle trips the caching allocator.
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.last_key: tuple | None = None
        B, S = self.model.model.cache_shape
        device = self.model.device
        self.tokens = torch.zeros(B, dtype=torch.long, device=device)  # [B] this step's input tokens
        self.slot = torch.zeros((), dtype=torch.long, device=device)  # the cache slot they are written at
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)  # greedy: sequences past their eos
        self.history = torch.zeros(B, S, dtype=torch.long, device=device)  # greedy: token picked at each slot
        # greedy: the eos ids a graph compares against, per eos tuple (part of the graph's key). A graph
        # reads the tensor it captured at every replay, so the tensor must live as long as the graph: one
        # made per call was freed after the capturing call, and the next call's graph read whatever the
        # allocator put there (on the H200 the README job stopped at a non-eos token).
        self.eos_ids: dict[tuple[int, ...], torch.Tensor] = {}

    def release(self) -> None:
        """Destroys every captured graph (CUDAGraph.reset) after the GPU has finished with them; the next
        step captures anew into a fresh pool. Under NCCL, graphs that captured collectives must be gone
        before destroy_process_group, which otherwise never returns (pytorch/pytorch#115388; seen with
        two ranks on two H200s): dots1_ext.distributed.shutdown calls this through the model."""
        if self.graphs:
            torch.cuda.synchronize(self.model.device)
        for graph, _ in self.graphs.values():
            graph.reset()
        self.graphs = {}
        self.last_key = None
        self.cache_key = None  # the next step resets the static state and the pool, then captures

    def _sync_with_cache(self) -> tuple[int, int]:
        # Once per decode call, so from the buffer dict directly (setup_cache and .to() put a new tensor
        # there); the same test as model.model.cache_shape plus the cache's address, at ~1/10 the cost.
        k = self._attn0._buffers.get("k_cache") if self._attn0 is not None else None
        if k is None:
            raise ValueError("DecodeGraphs: call model.setup_cache(...) before decoding")
        shape = (k.shape[0], k.shape[1])
        key = (shape, k.data_ptr())
        if key != self.cache_key:  # a new cache: the captured addresses are stale
            self.reset()
            self.cache_key = key
        return shape

    def _state(self) -> list[torch.Tensor]:
        return [self.tokens, self.slot, self.finished]

    def _capture(self, step) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Captures ``step()`` (its warm-up runs leave the static state as they found it)."""
        saved = [t.clone() for t in self._state()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph: lazy inits, autotuning, allocations
            for _ in range(2):
                step()
                for t, s in zip(self._state(), saved):
                    t.copy_(s)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = step()
        self.captures += 1
        return graph, out

    def _replay(self, key: tuple, step) -> torch.Tensor:
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(step)
        self.last_key = key
        graph, out = entry
        graph.replay()
        return out

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        """One decode step: tokens [B] written at cache ``slot`` (an int) -> logits [B, V] (static buffer)."""
        B, S = self._sync_with_cache()
        if not 0 <= slot < S:
            raise IndexError(f"decode slot {slot} is outside the KV cache of {S} slots")
        self.model.model.check_decode_slot(slot)
        self.tokens.copy_(tokens.reshape(B))
        self.slot.fill_(slot)
        known = self.model.model.cache_filled_host is not None
        out = self._replay((B, "logits"), lambda: self.model.decode(self.tokens, self.slot))
        self.model.model.cache_filled_host = slot + 1 if known else None  # what the step did on the device
        return out

    @torch.no_grad()
    def greedy_decode(self, tokens: torch.Tensor, finished: torch.Tensor, first_slot: int, steps: int,
                      pad_token_id: int, eos_token_ids: Sequence[int], eos_check_every: int = 8) -> torch.Tensor:
        """``steps`` greedy steps, the first feeding ``tokens`` [B] at ``first_slot``; ``finished`` [B] bool
        marks sequences that emit ``pad_token_id`` from now on (a sequence finishes when it emits an eos).
        Every ``eos_check_every`` steps the host reads whether all have finished and stops early.
        Returns the picked tokens [B, n], n <= steps."""
        B, S = self._sync_with_cache()
        if not (0 <= first_slot and first_slot + steps <= S):
            raise IndexError(f"greedy_decode of {steps} steps from slot {first_slot} overruns the KV cache of {S} slots")
        self.model.model.check_decode_slot(first_slot)
        known = self.model.model.cache_filled_host is not None
        eos = tuple(int(e) for e in eos_token_ids)
        eos_ids = self.eos_ids.get(eos)
        if eos_ids is None:
            eos_ids = self.eos_ids[eos] = torch.tensor(eos, dtype=torch.long, device=self.model.device)
        self.tokens.copy_(tokens.reshape(B))
        self.finished.copy_(finished.reshape(B))
        self.slot.fill_(first_slot)

        def step() -> torch.Tensor:
            logits = self.model.decode(self.tokens, self.slot)  # [B, V]
            tok = sample(logits)  # generate's greedy pick: -1 for a poisoned row
            tok = torch.where(self.finished, pad_token_id, tok)
            if eos:
                self.finished |= torch.isin(tok, eos_ids)
            self.history.index_copy_(1, self.slot.view(1), tok.view(B, 1))
            self.tokens.copy_(tok)
            self.slot += 1
            return tok

        done = steps
        for n in range(steps):
            if eos and eos_check_every and n and (n + 1) % eos_check_every == 0 and bool(self.finished.all()):
                done = n
                break
            self._replay((B, "greedy", pad_token_id, eos), step)
        self.model.model.cache_filled_host = first_slot + done if known else None
        return self.history[:, first_slot:first_slot + done].clone()

    @torch.no_grad()
    def replay_ms(self, iters: int = 50, warmup: int = 5) -> float:
        """Median GPU time of one replay of the graph used last (CUDA events around each replay, the
        static state restored between replays, outside the events): the steady-state decode step that
        ``generate``'s per-step figure should match. The replays rewrite that step's cache slot, which
        holds nothing a later request reads before writing it (every request starts with a prefill)."""
        if self.last_key is None:
            raise ValueError("DecodeGraphs.replay_ms: no graph has been replayed yet")
        graph, _ = self.graphs[self.last_key]
        saved = [t.clone() for t in self._state()]
        if self.last_key[1] == "greedy":  # the greedy graph advanced the state: replay its last step
            saved[1] -= 1
        times = []
        for i in range(warmup + iters):
            for t, s in zip(self._state(), saved):
                t.copy_(s)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]
