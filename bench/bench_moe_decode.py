"""The MoE experts of a decode step at real Dots1 shape (H=4096, 128 experts top-6, I=1408, shared
Is=2816, bf16): ours = moe_decode_gate_up + moe_decode_down (two launches, up to 64 tokens each),
against the current path timed in the same run on the same weights and ids = permute + grouped_gemm
gate_up (SwiGLU fused) + grouped_gemm down + the shared experts as an F.linear MLP + unpermute
(combine + residual). Above 16 tokens also ours in 16-token launches (what the op did before it took
64 tokens per launch: every chunk re-reads the experts it touches) and ours with four n-tiles per MMA
(DOTS1_EXT_MOE_DECODE_NT=4: 32-column items, so fewer hot-expert re-reads, but a quarter of the bytes
in flight per lane), to choose the default. At every T also ours with the fragment weight-load mapping
(DOTS1_EXT_MOE_DECODE_LOADS=frag: each warp load reads 8 rows x 64 B; the default, wide_all, reads 2
rows x 256 B up to 2 tokens and 4 rows x 128 B above), and above 8 tokens with LOADS=wide (wide up to 8
tokens, frag above: the default before wide_all), captured and replayed like the others. The int4 rows:
the default (gate_up's routed tiles staged through shared memory above 8 tokens), and staged / register
stream at every T; up to 8 tokens also gate_up's routed tiles of 1 and 2 row groups
(DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS: 8 / 16 features per tile, each warp an eighth / a quarter of H;
the default there is 4: 32 features, each warp half of H).

Each implementation is captured in one CUDA graph holding ``CALLS`` calls that cycle over
``WEIGHT_SETS`` full copies of the layer's expert weights and fresh random distinct top-6 ids per call,
so that L2 (50 MB) never serves a weight the previous call read; ids are redrawn between replays.
Median replay time / CALLS. Floor: the bytes of the experts the calls touch (distinct routed experts x
3*I*H*2 + the shared experts' 3*Is*H*2; the expected distinct count E*(1 - (1 - k/E)^T), for Zipf
routing the mean over 64 draws) over the measured copy bandwidth. At T = 16, 32 and 64 also Zipf
routing (popularity 1/rank^1.2, bench.common.make_routing): the defaults, the fragment loads, the grouped
path and int4.

int4 routed experts (W4A16, issue 14): moe_decode_int4_gate_up + moe_decode_int4_down on the same layer
quantized (asymmetric, groups of 128; the shared experts stay bf16), its own rows with its own floor: the
touched experts' packed bytes 3*I*H/2 plus their scales and zero points 3*I*H*3/128, plus the shared
experts' bf16 bytes. The weight sets hold both formats, so the bf16 rows of the same run compare.

    python -m bench.bench_moe_decode [--quick]
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from bench.common import (Report, Row, bench_main, capture_graph, replay_ms, bytes_floor_ms, copy_bandwidth_gbs,
                          make_routing, on_gpu, time_fn, with_env)
from dots1_ext import ops
from dots1_ext.ops.moe_decode import moe_decode_down, moe_decode_gate_up
from dots1_ext.ops.moe_decode_int4 import moe_decode_int4_down, moe_decode_int4_gate_up
from dots1_ext.quant import GROUP_SIZE, quantize_int4

REAL = dict(E=128, k=6, H=4096, I=1408, Is=2816)
TINY = dict(E=16, k=4, H=256, I=128, Is=256)
WEIGHT_SETS = 2  # x 4.4 GB at real shape
CALLS = 8  # calls per graph, cycling over the weight sets with their own ids
ZIPF_TOKENS = (16, 32, 64)  # where Zipf routing runs too (hot experts: several items each)


def make_weights(s: dict, device: str, dtype: torch.dtype) -> dict:
    E, H, I, Is = s["E"], s["H"], s["I"], s["Is"]
    # Interleaved gate_up (what load_model ships, SwiGLU fused in grouped_gemm's epilogue); filled in
    # place per expert to keep the peak at one set.
    gate_up = torch.empty(E, 2 * I, H, device=device, dtype=dtype)
    for e in range(E):
        gate_up[e] = ops.interleave_gate_up((torch.randn(1, 2 * I, H, device=device) / H**0.5).to(dtype))[0]
    down = torch.empty(E, H, I, device=device, dtype=dtype)
    for e in range(E):
        down[e] = (torch.randn(H, I, device=device) / I**0.5).to(dtype)
    # The same experts in int4 (interleaved rows like the bf16 gate_up: a row permutation commutes with
    # the quantization along K), quantized one expert at a time.
    q_gate_up = [quantize_int4(gate_up[e]) for e in range(E)]
    q_down = [quantize_int4(down[e]) for e in range(E)]
    int4 = {name: [torch.stack([getattr(q, field) for q in qs]) for field in ("qweight", "scales", "zeros")]
            for name, qs in (("gate_up", q_gate_up), ("down", q_down))}
    del q_gate_up, q_down
    return dict(gate_up=gate_up, down=down, shared_gate_up=(torch.randn(2 * Is, H, device=device) / H**0.5).to(dtype),
                shared_down=(torch.randn(H, Is, device=device) / Is**0.5).to(dtype), int4_gate_up=int4["gate_up"],
                int4_down=int4["down"])


def draw_ids(T: int, k: int, E: int) -> torch.Tensor:
    return torch.rand(T, E).argsort(dim=1)[:, :k].to(torch.int32)


def ours(x, w, ids, weights, residual):
    act = moe_decode_gate_up(x, w["gate_up"], ids, w["shared_gate_up"], "swiglu_interleaved")
    return moe_decode_down(act, w["down"], ids, weights, w["shared_down"], residual)


def ours_int4(x, w, ids, weights, residual):
    """The int4 decode ops (issue 14) on the same layer quantized; the shared experts bf16."""
    act = moe_decode_int4_gate_up(x, *w["int4_gate_up"], ids, w["shared_gate_up"], "swiglu_interleaved")
    return moe_decode_int4_down(act, *w["int4_down"], ids, weights, w["shared_down"], residual)


CHUNK_T = 16  # the tokens per launch before 64-token launches


def ours_16_token_launches(x, w, ids, weights, residual):
    """The op as it ran before (16 tokens per launch, each touched expert re-read per chunk)."""
    T = x.shape[0]
    return torch.cat([ours(x[t0:t0 + CHUNK_T], w, ids[t0:t0 + CHUNK_T], weights[t0:t0 + CHUNK_T],
                           residual[t0:t0 + CHUNK_T]) for t0 in range(0, T, CHUNK_T)])


# Ours with a kernel switch set (read at launch: a captured graph keeps those kernels).
ours_nt4 = with_env({"DOTS1_EXT_MOE_DECODE_NT": "4", "DOTS1_EXT_MOE_DECODE_LOADS": "frag"}, ours)
ours_frag = with_env({"DOTS1_EXT_MOE_DECODE_LOADS": "frag"}, ours)
# The default loads are wide at every T (wide_all: items of 8 pairs above 8 tokens); wide = frag above 8.
ours_wide_to_8 = with_env({"DOTS1_EXT_MOE_DECODE_LOADS": "wide"}, ours)


# The default stages gate_up's routed int4 tiles through shared memory above 8 tokens; both choices at every T.
ours_int4_registers = with_env({"DOTS1_EXT_MOE_DECODE_INT4_STAGED": "0"}, ours_int4)
ours_int4_staged = with_env({"DOTS1_EXT_MOE_DECODE_INT4_STAGED": "1"}, ours_int4)
# gate_up's routed tiles of 8 R features up to 8 tokens (the default R = 4: 32 features, each warp half of H).
ours_int4_rg1 = with_env({"DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS": "1"}, ours_int4)
ours_int4_rg2 = with_env({"DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS": "2"}, ours_int4)


def current_path(x, w, ids, weights, residual):
    permuted, offsets, row_map = ops.permute(x, ids, w["gate_up"].shape[0])
    act = ops.grouped_gemm(permuted, w["gate_up"], offsets, "swiglu_interleaved")
    expert_out = ops.grouped_gemm(act, w["down"], offsets, "none")
    gate, up = F.linear(x, w["shared_gate_up"]).chunk(2, dim=-1)
    shared = F.linear(F.silu(gate) * up, w["shared_down"])
    return ops.unpermute(expert_out, row_map, weights, shared_out=shared, residual=residual)


def graph_ms(fn, calls: list[tuple], redraw, iters: int) -> float:
    """Median ms per call of fn over ``calls`` (argument tuples), all captured in one CUDA graph;
    ``redraw()`` refreshes the ids in place before each replay (untimed)."""
    graph = capture_graph(fn, calls)
    times = [replay_ms(graph, redraw) for _ in range(iters + 2)]
    del graph
    return statistics.median(times[2:]) / len(calls)


INT4_IMPLS = (ours_int4, ours_int4_registers, ours_int4_staged, ours_int4_rg1, ours_int4_rg2)


def run_impls(report: Report, case: str, impls: dict, calls: list[tuple], redraw, touched: float, expert_bytes: int,
              int4_expert_bytes: int, shared_bytes: int, gpu: bool, quick: bool) -> None:
    """Times each of ``impls`` on ``calls`` (fresh ids per replay) and adds its row: ms, floor, GB/s."""
    for label, fn in impls.items():
        per_expert = int4_expert_bytes if fn in INT4_IMPLS else expert_bytes
        nbytes = touched * per_expert + shared_bytes
        if gpu:
            ms = graph_ms(fn, calls, redraw, iters=5 if quick else 20)
        else:
            ms = time_fn(lambda fn=fn: [fn(*a) for a in calls], warmup=1, iters=3) / len(calls)
        report.add(Row("moe_decode", case, label, ms, bytes_floor_ms(nbytes), gbs=nbytes / ms / 1e6))


def run(quick: bool = False) -> list[Report]:
    gpu = on_gpu()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    s = REAL if gpu else TINY
    E, k, H, I, Is = s["E"], s["k"], s["H"], s["I"], s["Is"]
    tokens = [1, 2, 4, 8, 16, 32, 64] if gpu else [1, 4]
    sets = [make_weights(s, device, dtype) for _ in range(WEIGHT_SETS if gpu else 1)]
    elt = torch.finfo(dtype).bits // 8
    expert_bytes, shared_bytes = 3 * I * H * elt, 3 * Is * H * elt
    # int4: packed codes (half a byte) plus a bf16 scale and a uint8 zero point per group of 128.
    int4_expert_bytes = 3 * I * H // 2 + 3 * I * H // GROUP_SIZE * 3
    report = Report(f"MoE decode experts (H={H}, E={E}, top-{k}, I={I}, shared Is={Is}, "
                    f"{str(dtype).replace('torch.', '')}, {device}, copy {copy_bandwidth_gbs():.0f} GB/s)")
    # Balanced routing at every T; Zipf routing (a few hot experts, as real routers) where the decode ops'
    # hot-expert items matter, with the kernels that the defaults choose between.
    cases = [(T, "balanced") for T in tokens] + [(T, "zipf") for T in (ZIPF_TOKENS if gpu else [4])]
    draws = iter(range(1, 1 << 30))  # a fresh seed per Zipf draw
    for T, routing in cases:
        zipf = routing == "zipf"

        def draw(T=T, zipf=zipf):
            return make_routing("zipf", T, k, E, seed=next(draws))[0] if zipf else draw_ids(T, k, E)

        n_calls = CALLS if gpu else 2
        calls, id_bufs = [], []
        for i in range(n_calls):
            ids = draw().to(device)
            id_bufs.append(ids)
            calls.append((torch.randn(T, H, device=device).to(dtype), sets[i % len(sets)], ids,
                          (torch.rand(T, k, device=device) + 0.1), torch.randn(T, H, device=device).to(dtype)))
        # Ids are redrawn per replay: the expected number of distinct experts of T tokens' top-k (Zipf:
        # the mean over 64 draws).
        if zipf:
            touched = statistics.fmean(float(draw().unique().numel()) for _ in range(64))
        else:
            touched = E * (1 - (1 - k / E) ** T)
        case = f"T={T}{' zipf' if zipf else ''} ({touched:.1f} experts)"

        def redraw(id_bufs=id_bufs, draw=draw):
            for ids in id_bufs:
                ids.copy_(draw())

        impls = {"dots1_ext moe_decode (2 launches)": ours, "dots1_ext moe_decode frag loads": ours_frag}
        if zipf:
            impls["permute + grouped_gemm x2 + shared MLP + unpermute"] = current_path
            impls["dots1_ext moe_decode_int4 (2 launches, int4 experts)"] = ours_int4
            run_impls(report, case, impls, calls, redraw, touched, expert_bytes, int4_expert_bytes, shared_bytes,
                      gpu, quick)
            continue
        if T > 8 and gpu:
            impls["dots1_ext moe_decode LOADS=wide (frag above 8 tokens)"] = ours_wide_to_8
        if T > CHUNK_T:
            impls[f"dots1_ext moe_decode, {CHUNK_T}-token launches (before)"] = ours_16_token_launches
            if gpu:
                impls["dots1_ext moe_decode frag loads NT=4"] = ours_nt4
        impls["permute + grouped_gemm x2 + shared MLP + unpermute"] = current_path
        impls["dots1_ext moe_decode_int4 (2 launches, int4 experts)"] = ours_int4
        impls["dots1_ext moe_decode_int4, register stream (STAGED=0)"] = ours_int4_registers
        impls["dots1_ext moe_decode_int4, staged stream (STAGED=1)"] = ours_int4_staged
        if T <= 8:
            impls["dots1_ext moe_decode_int4, gate_up tiles of 1 row group (ROW_GROUPS=1)"] = ours_int4_rg1
            impls["dots1_ext moe_decode_int4, gate_up tiles of 2 row groups (ROW_GROUPS=2)"] = ours_int4_rg2
        run_impls(report, case, impls, calls, redraw, touched, expert_bytes, int4_expert_bytes, shared_bytes, gpu,
                  quick)
    if gpu:
        report.notes.append(f"floor = touched expert bytes / copy bandwidth; {CALLS} calls per CUDA graph over "
                            f"{WEIGHT_SETS} weight sets, fresh ids per replay; median of replays")
        report.notes.append("default = wide loads, (P k-parts, n-tiles) = (4, 1) at T <= 2, (2, 1) at T <= 4, "
                            "(2, 2) above (items of 8 pairs); frag loads: DOTS1_EXT_MOE_DECODE_LOADS=frag; int4 "
                            "default: gate_up's routed tiles staged through shared memory above 8 tokens")
        report.notes.append("int4 rows: bytes = touched experts' packed codes + scales + zero points (0.523 B per "
                            "weight) + the shared experts' bf16; their own floor")
        report.notes.append("zipf: each token's 6 distinct experts drawn with popularity 1/rank^1.2 over a random "
                            "expert order (bench.common.make_routing), fresh per replay")
    del sets
    return [report]


if __name__ == "__main__":
    bench_main(run, __doc__)
