"""Probe: the int4 MoE decode ops at small T, each kernel alone and the pair, under kernel switches
(DOTS1_EXT_MOE_DECODE_INT4_STAGED 0 / 1, and any given as NAME=a,b on the command line):
which of them moves batch-1 int4 decode, measured as bench/bench_moe_decode.py measures (CUDA graphs
of CALLS calls over WEIGHT_SETS weight copies, fresh ids per replay, median replay / calls).
With the word ``routed``: the routed experts only (no shared experts; the floors without their bytes),
what the kernels' int4 streams cost alone. With the word ``bf16``: the same for the bf16 decode ops
(moe_decode_gate_up / moe_decode_down) on the layer's unquantized rows, their floors from bf16 bytes
(issue 15's batched-decode range: T = 8 .. 64).

    PYTHONPATH=. python bench/probes/int4_decode_ab.py [T,T,...] [routed] [bf16] [NAME=v1,v2 ...]
"""

from __future__ import annotations

import sys

import torch

from bench.bench_moe_decode import CALLS, REAL, WEIGHT_SETS, draw_ids, graph_ms, make_weights, ours, ours_int4
from bench.common import bytes_floor_ms, knob_settings, parse_knobs, with_env
from dots1_ext.ops.moe_decode import moe_decode_down, moe_decode_gate_up
from dots1_ext.ops.moe_decode_int4 import moe_decode_int4_down, moe_decode_int4_gate_up


def gate_up(x, w, ids, weights, residual):
    return moe_decode_int4_gate_up(x, *w["int4_gate_up"], ids, w["shared_gate_up"], "swiglu_interleaved")


def down_of(act):
    def down(x, w, ids, weights, residual):
        return moe_decode_int4_down(act[x.shape[0]], *w["int4_down"], ids, weights, w["shared_down"], residual)
    return down


def gate_up_bf16(x, w, ids, weights, residual):
    return moe_decode_gate_up(x, w["gate_up"], ids, w["shared_gate_up"], "swiglu_interleaved")


def down_bf16_of(act):
    def down(x, w, ids, weights, residual):
        return moe_decode_down(act[x.shape[0]], w["down"], ids, weights, w["shared_down"], residual)
    return down


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("int4_decode_ab: needs a CUDA GPU and the extension built with CUDA")
    args = sys.argv[1:]
    Ts = [int(t) for t in args[0].split(",")] if args and args[0][0].isdigit() else [1, 4, 8, 16]
    routed_only = "routed" in args
    bf16 = "bf16" in args
    knobs = parse_knobs(args, {"DOTS1_EXT_MOE_DECODE_INT4_STAGED": ["0", "1"]})
    torch.manual_seed(0)
    s = REAL
    E, k, H, I, Is = s["E"], s["k"], s["H"], s["I"], s["Is"]
    sets = [make_weights(s, "cuda", torch.bfloat16) for _ in range(WEIGHT_SETS)]
    if routed_only:
        Is = 0
        for w in sets:
            w["shared_gate_up"] = w["shared_down"] = None
    act = {T: torch.randn(T, k * I + Is, device="cuda").to(torch.bfloat16) for T in Ts}
    # An expert's bytes as the ops read them: int4 codes + bf16 scales + uint8 zero points, or bf16 rows.
    expert_bytes = 3 * I * H * 2 if bf16 else 3 * I * H // 2 + 3 * I * H // 128 * 3
    pair_fn, gate_up_fn = (ours, gate_up_bf16) if bf16 else (ours_int4, gate_up)
    for T in Ts:
        calls, id_bufs = [], []
        for i in range(CALLS):
            ids = draw_ids(T, k, E).cuda()
            id_bufs.append(ids)
            calls.append((torch.randn(T, H, device="cuda").to(torch.bfloat16), sets[i % len(sets)], ids,
                          torch.rand(T, k, device="cuda") + 0.1, torch.randn(T, H, device="cuda").to(torch.bfloat16)))

        def redraw():
            for ids in id_bufs:
                ids.copy_(draw_ids(T, k, E))

        touched = E * (1 - (1 - k / E) ** T)
        floor_gu = bytes_floor_ms(touched * expert_bytes * 2 / 3 + 2 * Is * H * 2)
        floor_dn = bytes_floor_ms(touched * expert_bytes / 3 + Is * H * 2)
        down = down_bf16_of(act) if bf16 else down_of(act)
        for env, label in knob_settings(knobs):
            label = f"routed only {label}" if routed_only else label
            label = f"bf16 {label}" if bf16 else label
            t_gu = graph_ms(with_env(env, gate_up_fn), calls, redraw, 20)
            t_dn = graph_ms(with_env(env, down), calls, redraw, 20)
            t_pair = graph_ms(with_env(env, pair_fn), calls, redraw, 20)
            print(f"T={T:3d} {label:44s} gate_up {t_gu * 1e3:7.1f} us (floor/time {floor_gu / t_gu:.2f})  "
                  f"down {t_dn * 1e3:7.1f} us ({floor_dn / t_dn:.2f})  pair {t_pair * 1e3:7.1f} us "
                  f"({(floor_gu + floor_dn) / t_pair:.2f})", flush=True)


if __name__ == "__main__":
    main()
