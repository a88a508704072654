"""Probe: the MoE block of a decode step (router, gate_up, down; real shape, int4 or bf16 routed experts)
with the shared experts' gate_up on a second stream, beside the router and the routed gate_up, against
the one-stream block the model runs: does the overlap hide the router's latency?

Variants, each a CUDA graph of CALLS blocks over WEIGHT_SETS weight copies (fresh ids per replay is not
needed: the router draws them from fresh hidden rows), median replay / calls, run in alternating rounds:
  serial          router -> gate_up (routed + shared tiles) -> down (routed + shared + residual)
  serial_norouter the same with the ids and weights given (what the router costs the block)
  overlap_cat     side stream: skinny_gemm(x, shared_gate_up, "swiglu"); main: router -> routed gate_up;
                  join; torch.cat into act; down. The output is checked against serial's.
  overlap         overlap_cat without the cat: down takes the shared act apart (shared_act). (A model switch
                  running this in the decode step measured slower there and was not landed: results.)
Measured and dropped before shared_act existed (2026-11-30, results folder): the router on the side
stream beside the shared gate_up, and one stream with the shared gate_up first.

    PYTHONPATH=. python bench/probes/shared_overlap.py [T,T,...] [bf16]
"""

from __future__ import annotations

import statistics
import sys

import torch

from bench.bench_moe_decode import CALLS, REAL, WEIGHT_SETS, make_weights
from bench.common import capture_graph, replay_ms
from dots1_ext.ops.gating import router_topk_gating
from dots1_ext.ops.moe_decode import moe_decode_down, moe_decode_gate_up
from dots1_ext.ops.moe_decode_int4 import moe_decode_int4_down, moe_decode_int4_gate_up
from dots1_ext.ops.skinny_gemm import skinny_gemm

SCALE = 2.5


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("shared_overlap: needs a CUDA GPU and the extension built with CUDA")
    args = sys.argv[1:]
    Ts = [int(t) for t in args[0].split(",")] if args and args[0][0].isdigit() else [1, 4, 8]
    int4 = "bf16" not in args
    torch.manual_seed(0)
    s = REAL
    E, k, H, I, Is = s["E"], s["k"], s["H"], s["I"], s["Is"]
    sets = [make_weights(s, "cuda", torch.bfloat16) for _ in range(WEIGHT_SETS)]
    for w in sets:
        w["router"] = (torch.randn(E, H, device="cuda") / H**0.5).to(torch.bfloat16)
        w["bias"] = torch.randn(E, device="cuda") * 0.05
        if int4:
            del w["gate_up"], w["down"]
    side = torch.cuda.Stream()

    def gate_up(x, w, ids, shared):
        if int4:
            return moe_decode_int4_gate_up(x, *w["int4_gate_up"], ids, shared, "swiglu_interleaved")
        return moe_decode_gate_up(x, w["gate_up"], ids, shared, "swiglu_interleaved")

    def down(act, w, ids, weights, residual):
        if int4:
            return moe_decode_int4_down(act, *w["int4_down"], ids, weights, w["shared_down"], residual)
        return moe_decode_down(act, w["down"], ids, weights, w["shared_down"], residual)

    def route(x, w):
        return router_topk_gating(x, w["router"], w["bias"], k, 1, 1, True, SCALE)

    def serial(x, w, residual, ids0, weights0):
        weights, ids = route(x, w)
        return down(gate_up(x, w, ids, w["shared_gate_up"]), w, ids, weights, residual)

    def serial_norouter(x, w, residual, ids0, weights0):
        return down(gate_up(x, w, ids0, w["shared_gate_up"]), w, ids0, weights0, residual)

    def forked(x, w):
        # side stream: the shared experts' gate_up; main: the router and the routed gate_up; joined
        main_stream = torch.cuda.current_stream()
        side.wait_stream(main_stream)
        with torch.cuda.stream(side):
            shared_act = skinny_gemm(x, w["shared_gate_up"], "swiglu")
        weights, ids = route(x, w)
        routed_act = gate_up(x, w, ids, None)
        main_stream.wait_stream(side)
        return routed_act, shared_act, weights, ids

    def overlap_cat(x, w, residual, ids0, weights0):
        routed_act, shared_act, weights, ids = forked(x, w)
        return down(torch.cat([routed_act, shared_act], dim=1), w, ids, weights, residual)

    def overlap(x, w, residual, ids0, weights0):
        # down takes the shared act apart (shared_act): no cat
        routed_act, shared_act, weights, ids = forked(x, w)
        if int4:
            return moe_decode_int4_down(routed_act, *w["int4_down"], ids, weights, w["shared_down"], residual,
                                        shared_act=shared_act)
        return moe_decode_down(routed_act, w["down"], ids, weights, w["shared_down"], residual,
                               shared_act=shared_act)

    variants = dict(serial=serial, serial_norouter=serial_norouter, overlap_cat=overlap_cat, overlap=overlap)
    for T in Ts:
        calls = []
        for i in range(CALLS):
            ids0 = torch.rand(T, E).argsort(dim=1)[:, :k].to(torch.int32).cuda()
            calls.append((torch.randn(T, H, device="cuda").to(torch.bfloat16), sets[i % len(sets)],
                          torch.randn(T, H, device="cuda").to(torch.bfloat16), ids0,
                          torch.rand(T, k, device="cuda") + 0.1))
        with torch.inference_mode():
            ref = serial(*calls[0]).float()
            err = max(((fn(*calls[0]).float() - ref).abs().max() / ref.abs().max()).item()
                      for fn in (overlap_cat, overlap))
            graphs = {name: capture_graph(fn, calls) for name, fn in variants.items()}
            times = {name: [] for name in variants}
            for _ in range(3):  # rounds: every variant once per round, alternating
                for name, g in graphs.items():
                    t = [replay_ms(g) for _ in range(12)]
                    times[name].append(statistics.median(t[2:]) / CALLS * 1e3)
            del graphs
        line = "  ".join(f"{name} {' / '.join(f'{v:6.1f}' for v in vals)} us" for name, vals in times.items())
        print(f"{'int4' if int4 else 'bf16'} T={T}: {line}  (overlap variants vs serial max rel diff {err:.2e})", flush=True)


if __name__ == "__main__":
    main()
