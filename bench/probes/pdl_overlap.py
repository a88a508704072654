"""Probe: whether the decode step's MoE kernels overlap under PDL in graph replay. The 8-layer (or
``layers=N``) real-shape int4 model (or bf16 with the word bf16), B=1 context 2048, its decode graph
replayed under torch.profiler (CUPTI kernel records: each kernel's first-CTA start and last-CTA end), per
setting of the switches given as NAME=a,b: for each MoE layer, the gap from the router's end to the
gate_up's start (negative: gate_up was running before the router ended) and from gate_up's end to down's
start, medians over the layers and replays, and the kernels' own spans; and the graph's replay time
(DecodeGraphs.replay_ms). The name ``settled`` sets dots1_ext.modules.MOE_DECODE_HIDDEN_SETTLED (1 / 0)
instead of an environment variable, ``kv_settled`` dots1_ext.modules.ATTENTION_KV_SETTLED. Per setting
also the attention block of each layer, from the qkv GEMM's end: the attention kernel's start and end,
the combine's end (medians). With the word ``all``: the whole step's timeline by kernel
(kernel_timeline): per kernel name, launches per step, median span, median gap from the previous kernel's
end (negative: it started before that ended), and the step's sum of spans.

    PYTHONPATH=. python bench/probes/pdl_overlap.py [bf16] [all] [layers=N] [NAME=v1,v2 ...]

The replay column: when each setting's replay was timed right after the previous setting's profiler
session, the first setting (timed before any) read ~2.5% faster than identical later ones (four
identical settings: 1.1325, 1.1603, 1.1605, 1.1606 ms int4; bf16 1.2768, 1.3068, 1.3076; block spans
within 1 µs; bench/results/2026-11-30-h200-e83e44e-phase-mixing-ep-two-gpus). A one-time change fits
(the later three agree to 0.0003 ms), e.g. the profiler's first session. So every setting's replay is
now timed in a pass of its own before any profiling (not yet re-measured: run four identical settings,
NAME=a,b,c,d, to see whether the first still differs). Compare settings by the spans first.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile

import torch

from bench.bench_decode import real_decode_setup
from bench.common import env_vars, knob_settings, parse_knobs, pop_layers


REPLAYS = 10  # profiled graph replays per setting


def kernel_events(prof) -> list[tuple[str, float, float]]:
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        trace = json.load(f)
    events = [(e["name"], float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
              for e in trace.get("traceEvents", []) if e.get("cat") == "kernel"]
    return sorted(events, key=lambda e: e[1])


def short_kernel_name(name: str) -> str:
    """A kernel's name without return type, namespaces, template arguments or parameters:
    ``void dots1::(anonymous namespace)::moe_gate_up_kernel<...>(...)`` -> ``moe_gate_up_kernel``."""
    name = re.sub(r"^void ", "", name)
    depth, out = 0, []
    for ch in name:  # drop everything inside <...> and (...), nested
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return "".join(out).replace("(anonymous namespace)::", "").split("::")[-1].strip()


def kernel_timeline(events: list[tuple[str, float, float]], steps: int) -> list[tuple[str, float, float, float, float]]:
    """events: (name, start, end) in µs, sorted by start, of `steps` replays of a step. Returns per short
    kernel name (kernel_timeline rows, by total span, largest first): (name, launches per step, median
    span, median gap from the previous kernel's end, total span per step)."""
    spans: dict[str, list[float]] = {}
    gaps: dict[str, list[float]] = {}
    for i, (name, ts, end) in enumerate(events):
        key = short_kernel_name(name)
        spans.setdefault(key, []).append(end - ts)
        if i > 0:
            gaps.setdefault(key, []).append(ts - events[i - 1][2])
    rows = [(k, len(v) / steps, statistics.median(v), statistics.median(gaps[k]) if k in gaps else float("nan"),
             sum(v) / steps) for k, v in spans.items()]
    return sorted(rows, key=lambda r: -r[4])


def attention_block(events: list[tuple[str, float, float]]) -> dict[str, list[float]]:
    """Per decode attention launch (events sorted by start): from the end of the qkv GEMM before it (the
    last skinny GEMM at most two launches back: qk_norm_rope_kv_cache_ may sit in between), its start
    and end and the end of the split combine right after it (its own end where there is none); and its
    span."""
    out: dict[str, list[float]] = {"attention start": [], "attention end": [], "combine end": [],
                                   "attention span": []}
    for i, (name, ts, end) in enumerate(events):
        if "decode_attention_kernel" not in name:
            continue
        qkv = next((events[j] for j in (i - 1, i - 2) if j >= 0 and "skinny_gemm" in events[j][0]), None)
        if qkv is None:
            continue
        nxt = events[i + 1] if i + 1 < len(events) else None
        combine_end = nxt[2] if nxt is not None and "combine" in nxt[0] else end
        out["attention start"].append(ts - qkv[2])
        out["attention end"].append(end - qkv[2])
        out["combine end"].append(combine_end - qkv[2])
        out["attention span"].append(end - ts)
    return out


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("pdl_overlap: needs a CUDA GPU and the extension built with CUDA")
    from torch.profiler import ProfilerActivity, profile

    from dots1_ext import modules
    from dots1_ext.cuda_graph import DecodeGraphs

    args = sys.argv[1:]
    experts = "bf16" if "bf16" in args else "int4"
    timeline = "all" in args
    knobs = parse_knobs(args)
    layers = pop_layers(knobs)
    ctx = 2048
    model, cfg, tok = real_decode_setup(layers, experts, ctx)

    def apply(env: dict[str, str]) -> dict[str, str]:
        env = dict(env)
        modules.MOE_DECODE_HIDDEN_SETTLED = env.pop("settled", "1") == "1"
        modules.ATTENTION_KV_SETTLED = env.pop("kv_settled", "1") == "1"
        return env

    with torch.inference_mode():
        # Every setting's replay time first, before any profiler session (see the docstring).
        replays = []
        for env, _ in knob_settings(knobs):
            with env_vars(apply(env)):
                graphs = DecodeGraphs(model)
                graphs(tok, ctx)
                replays.append(graphs.replay_ms())
                del graphs
        for (env, label), replay in zip(knob_settings(knobs), replays):
            with env_vars(apply(env)):
                graphs = DecodeGraphs(model)
                graphs(tok, ctx)
                for _ in range(5):
                    graphs(tok, ctx)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(REPLAYS):
                        graphs(tok, ctx)
                    torch.cuda.synchronize()
                del graphs
            events = kernel_events(prof)
            first = next((i for i, e in enumerate(events) if "router_gating" in e[0]), None)
            if first is not None:
                for name, ts, end in events[max(0, first - 2):first + 4]:
                    print(f"   {ts - events[first][1]:+8.1f} .. {end - events[first][1]:+8.1f} us  {name[:90]}")
            gaps: dict[str, list[float]] = {"norm->router": [], "router->gate_up": [], "gate_up->down": []}
            spans: dict[str, list[float]] = {"router": [], "gate_up": [], "down": []}
            for i, (name, ts, end) in enumerate(events):
                if "router_gating" not in name or i + 2 >= len(events) or i == 0:
                    continue
                prev, gu, dn = events[i - 1], events[i + 1], events[i + 2]
                if "moe_gate_up" not in gu[0] or "moe_down" not in dn[0]:
                    continue
                gaps["norm->router"].append(ts - prev[2])
                gaps["router->gate_up"].append(gu[1] - end)
                gaps["gate_up->down"].append(dn[1] - gu[2])
                spans["router"].append(end - ts)
                spans["gate_up"].append(gu[2] - gu[1])
                spans["down"].append(dn[2] - dn[1])
            med = {k: statistics.median(v) if v else float("nan") for k, v in {**gaps, **spans}.items()}
            n = len(spans["router"])
            print(f"== {label} ({experts}, {n} MoE blocks): start gaps, us (negative: overlap) "
                  + "  ".join(f"{k} {med[k]:+.1f}" for k in gaps)
                  + " | spans " + "  ".join(f"{k} {med[k]:.1f}" for k in spans)
                  + f" | block router start -> down end {med['router'] + med['router->gate_up'] + med['gate_up'] + med['gate_up->down'] + med['down']:.1f}"
                  + f" | replay {replay:.4f} ms",
                  flush=True)
            att = attention_block(events)
            print(f"   attention ({len(att['attention span'])} layers), us from the qkv GEMM's end: "
                  + "  ".join(f"{k} {statistics.median(v) if v else float('nan'):+.2f}" for k, v in att.items()),
                  flush=True)
            if timeline:
                for name, per_step, span, gap, total in kernel_timeline(events, REPLAYS):
                    print(f"   {total:8.1f} us/step  x{per_step:5.1f}  span {span:7.2f} us  gap {gap:+7.2f} us  {name}")


if __name__ == "__main__":
    main()
