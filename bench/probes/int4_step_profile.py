"""Probe: where the real-shape decode step's GPU time goes (int4 routed experts, or bf16 with the word
bf16), under kernel switches given as NAME=a,b on the command line (e.g.
DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS=1,4): per setting, the CUDA-graph replay time (PDL on and off) and
the eager step's GPU time by kernel (torch.profiler, PDL off so that kernel times add up), top kernels
by name.

    PYTHONPATH=. python bench/probes/int4_step_profile.py [LAYERS] [bf16] [NAME=v1,v2 ...]
"""

from __future__ import annotations

import sys
from collections import defaultdict

import torch

from bench.bench_decode import real_decode_setup
from bench.common import env_vars, knob_settings, parse_knobs


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("int4_step_profile: needs a CUDA GPU and the extension built with CUDA")
    from torch.profiler import ProfilerActivity, profile

    from dots1_ext.cuda_graph import DecodeGraphs

    args = sys.argv[1:]
    layers = next((int(a) for a in args if a.isdigit()), 8)
    experts = "bf16" if "bf16" in args else "int4"
    ctx = 2048
    model, cfg, tok = real_decode_setup(layers, experts, ctx)
    with torch.inference_mode():
        for env, label in knob_settings(parse_knobs(args)):
            replay = {}
            for pdl in ("1", "0"):
                with env_vars({**env, "DOTS1_EXT_PDL": pdl}):
                    graphs = DecodeGraphs(model)
                    graphs(tok, ctx)
                    replay[pdl] = graphs.replay_ms()
                    del graphs
            with env_vars({**env, "DOTS1_EXT_PDL": "0"}):
                model.decode(tok, ctx)
                torch.cuda.synchronize()
                iters = 5
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(iters):
                        model.decode(tok, ctx)
                    torch.cuda.synchronize()
            by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
            for evt in prof.key_averages():
                us = getattr(evt, "self_device_time_total", 0)
                if us:
                    by_name[evt.key][0] += us / iters
                    by_name[evt.key][1] += evt.count // iters
            total = sum(v[0] for v in by_name.values())
            print(f"== {label}: {layers} layers, {experts} experts, B=1 context {ctx}: graph replay "
                  f"{replay['1']:.3f} ms (PDL on), {replay['0']:.3f} ms (PDL off); eager GPU time "
                  f"{total / 1e3:.3f} ms", flush=True)
            for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:14]:
                print(f"  {us:8.1f} us  x{n:<4d} {us / max(n, 1):7.1f} us each  {name[:110]}", flush=True)


if __name__ == "__main__":
    main()
