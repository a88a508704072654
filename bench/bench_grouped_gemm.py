"""Grouped expert GEMMs at Dots1 shapes: gate_up + SwiGLU ([S, 4096] x [128, 2816, 4096]) and down
([S, 1408] x [128, 4096, 1408]), S = T * 6, balanced and Zipf routing, against torch._grouped_mm
(+ a separate SiLU * mul) timed in the same run. "dots1_ext" runs gate_up on the interleaved weight
(fused SwiGLU epilogue), as the model does; "dots1_ext (HF layout)" the same weight unpacked (GEMM,
then SiLU * mul). Floors: FLOPs over the measured dense GEMM rate and
the active experts' weight bytes over the measured copy bandwidth (whichever is larger).

W4A16 rows (prefill sizes, T = 4096 and 16384; --quick: 4096): grouped_gemm_int4 on the int4 weights
(the same random weights quantized, asymmetric) against our bf16 grouped_gemm, same routing, timed
round-robin in the same run; each with its own floor (int4: packed codes + scales + zeros bytes).

    python -m bench.bench_grouped_gemm [--quick]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import (Report, Row, bench_main, bytes_floor_ms, copy_bandwidth_gbs, flops_floor_ms, gemm_tflops,
                          graph_us, on_gpu, time_fns, with_env)
from dots1_ext import quant
from dots1_ext.ops.grouped_gemm import grouped_gemm, interleave_gate_up
from dots1_ext.ops.grouped_gemm_int4 import grouped_gemm_int4


def routing_offsets(kind: str, T: int, k: int, E: int, device: str) -> torch.Tensor:
    if kind == "balanced":
        ids = torch.rand(T, E).argsort(dim=1)[:, :k]
    else:  # Zipf(1.2) popularity over a random expert order
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
        ids = torch.multinomial(p[torch.randperm(E)].expand(T, E), k)
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    off = torch.zeros(E + 1, dtype=torch.int64)
    off[1:] = counts.cumsum(0)
    return off.to(torch.int32).to(device)


def torch_grouped_mm():
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None or not on_gpu() or torch.cuda.get_device_capability() < (9, 0):
        return None
    return fn


def with_backend(name: str | None, fn):
    """fn run with DOTS1_EXT_GEMM_BACKEND = name (None: as the environment has it)."""
    return with_env({} if name is None else {"DOTS1_EXT_GEMM_BACKEND": name}, fn)


def _graph_us(fn) -> float | None:
    try:
        return graph_us(fn, reps=8, iters=10)
    except RuntimeError:  # not capturable in a CUDA graph
        torch.cuda.synchronize()
        return None


def add_rows(report: Report, case: str, fns: dict, floor: float, wbytes: float, flops: float, gpu: bool,
             graph: bool = False) -> None:
    """Times the implementations of one case round-robin (time_fns) and adds a row for each. With
    ``graph`` (decode sizes, where a model step runs in a CUDA graph) also the GPU time per call with
    the launch path taken away (graph_us, in the notes)."""
    times = time_fns(fns, warmup=10 if gpu else 2, rounds=10 if gpu else 2, iters=5 if gpu else 3)
    for label, ms in times.items():
        extra = {"graph_us": _graph_us(fns[label])} if graph and gpu else {}
        report.add(Row("grouped_gemm", case, label, ms, floor, gbs=wbytes / ms / 1e6, tflops=flops / ms / 1e9,
                       extra=extra))


def run(quick: bool = False) -> list[Report]:
    gpu = on_gpu()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    if gpu:
        E, k, H, I = 128, 6, 4096, 1408
        Ts = [1, 8, 64, 512, 4096] if quick else [1, 8, 64, 512, 4096, 16384]
    else:
        E, k, H, I = 8, 2, 256, 128
        Ts = [1, 8, 64]
    w_gate_up = torch.randn(E, 2 * I, H, device=device, dtype=dtype) / H**0.5
    w_gate_up_packed = interleave_gate_up(w_gate_up)
    w_down = torch.randn(E, H, I, device=device, dtype=dtype) / I**0.5
    gmm = torch_grouped_mm()
    backends = [("dots1_ext", None)]
    if gpu:
        backends += [("dots1_ext[decode]", "decode")]
        if torch.cuda.get_device_capability() == (9, 0):
            backends += [("dots1_ext[cutlass]", "cutlass")]
    elt = torch.finfo(dtype).bits // 8

    report = Report(f"grouped_gemm (E={E}, k={k}, H={H}, I={I}, {dtype}, copy {copy_bandwidth_gbs():.0f} GB/s, "
                    f"dense GEMM {gemm_tflops():.0f} TFLOP/s)")
    for T in Ts:
        for routing in ("balanced", "zipf"):
            if quick and routing == "zipf" and T not in (1, 4096):
                continue
            S = T * k
            off = routing_offsets(routing, T, k, E, device)
            active = int((off[1:] > off[:-1]).sum())
            x = torch.randn(S, H, device=device, dtype=dtype)
            h = torch.randn(S, I, device=device, dtype=dtype)
            for stage, w, xin, epi in (
                ("gate_up+swiglu", w_gate_up_packed, x, "swiglu_interleaved"),
                ("down", w_down, h, "none"),
            ):
                N, K = w.shape[1], w.shape[2]
                flops = 2.0 * S * N * K
                wbytes = active * N * K * elt
                io_bytes = wbytes + S * K * elt + S * (N // 2 if epi != "none" else N) * elt
                floor = max(flops_floor_ms(flops), bytes_floor_ms(io_bytes))
                case = f"{stage} T={T} {routing} ({active} experts)"
                fns = {}
                for label, be in backends:
                    if label.endswith("[decode]") and S > 4096:
                        continue  # the decode kernel re-reads weights per 8 rows: minutes at large S
                    fns[label] = with_backend(be, lambda xin=xin, w=w, epi=epi: grouped_gemm(xin, w, off, epi))
                if epi != "none":
                    fns["dots1_ext (HF layout)"] = lambda xin=xin: grouped_gemm(xin, w_gate_up, off, "swiglu")
                if gmm is not None:
                    offs = off[1:]
                    if epi != "none":
                        def peer(xin=xin, offs=offs):
                            y = gmm(xin, w_gate_up.transpose(-2, -1), offs=offs)
                            return F.silu(y[:, :I]) * y[:, I:]
                        fns["torch._grouped_mm + silu*mul"] = peer
                    else:
                        fns["torch._grouped_mm"] = lambda xin=xin, w=w, offs=offs: gmm(xin, w.transpose(-2, -1), offs=offs)
                add_rows(report, case, fns, floor, wbytes, flops, gpu, graph=S <= 512)
            # The MoE expert pair end to end (gate_up + SwiGLU, then down on its output).
            case = f"gate_up+down T={T} {routing} ({active} experts)"
            flops = 2.0 * S * (2 * I * H + H * I)
            wbytes = active * 3 * I * H * elt
            floor = max(flops_floor_ms(flops), bytes_floor_ms(wbytes))
            fns = {"dots1_ext": lambda: grouped_gemm(grouped_gemm(x, w_gate_up_packed, off, "swiglu_interleaved"),
                                                     w_down, off, "none")}
            if gmm is not None:
                offs = off[1:]

                def peer_pair(offs=offs):
                    y = gmm(x, w_gate_up.transpose(-2, -1), offs=offs)
                    a = F.silu(y[:, :I]) * y[:, I:]
                    return gmm(a, w_down.transpose(-2, -1), offs=offs)

                fns["torch._grouped_mm + silu*mul"] = peer_pair
            add_rows(report, case, fns, floor, wbytes, flops, gpu, graph=S <= 512)
    add_int4_rows(report, w_gate_up_packed, w_down, [T for T in Ts if T >= 4096] if gpu else [64], k, gpu)
    return [report]


def quantize_by_expert(w: torch.Tensor) -> quant.Int4Weight:
    """quantize_int4 a few experts at a time (bounded fp32 temporaries at the real shape)."""
    parts = [quant.quantize_int4(w[e:e + 16]) for e in range(0, w.shape[0], 16)]
    return quant.Int4Weight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                            torch.cat([p.zeros for p in parts]))


def add_int4_rows(report: Report, w_gate_up_packed: torch.Tensor, w_down: torch.Tensor, Ts: list[int], k: int,
                  gpu: bool) -> None:
    """The W4A16 grouped GEMM against the bf16 one (balanced routing, same offsets, same run): gate_up +
    SwiGLU, down, and the pair. Floors per implementation: FLOPs over the dense GEMM rate or the
    active experts' weight bytes (bf16: 2 per weight; int4: 0.5 + 3/128 per weight) over copy bandwidth."""
    device = w_down.device
    E, H, I = w_down.shape
    bf16 = {"gate_up": w_gate_up_packed.to(torch.bfloat16), "down": w_down.to(torch.bfloat16)}
    int4 = {"gate_up": quantize_by_expert(w_gate_up_packed), "down": quantize_by_expert(w_down)}
    int4_per_weight = 0.5 + 3 / quant.GROUP_SIZE
    # The int4 rows: the default (auto) tile, and on sm90 each of the CUTLASS kernel's tiles forced
    # (DOTS1_EXT_GEMM_INT4_TILE).
    int4_tiles = {"dots1_ext int4 (W4A16)": {}}
    if gpu and torch.cuda.get_device_capability(device) == (9, 0):
        for tile in ("128x32", "128x64", "128x128", "128x192", "128x256"):
            int4_tiles[f"dots1_ext int4 (W4A16) tile {tile}"] = {"DOTS1_EXT_GEMM_INT4_TILE": tile}
    per_weight = {"dots1_ext bf16": 2.0} | {label: int4_per_weight for label in int4_tiles}
    for T in Ts:
        S = T * k
        off = routing_offsets("balanced", T, k, E, device)
        active = int((off[1:] > off[:-1]).sum())
        x = torch.randn(S, H, device=device, dtype=torch.bfloat16)
        h = torch.randn(S, I, device=device, dtype=torch.bfloat16)

        def gemm_bf16(xin, name, epi):
            return grouped_gemm(xin, bf16[name], off, epi)

        def gemm_int4(xin, name, epi):
            q = int4[name]
            return grouped_gemm_int4(xin, q.qweight, q.scales, q.zeros, off, epi)

        for stage, name, xin, epi in (("gate_up+swiglu", "gate_up", x, "swiglu_interleaved"),
                                      ("down", "down", h, "none"), ("gate_up+down", None, x, None)):
            if name is None:
                weights = 3 * I * H
                fns = {"dots1_ext bf16":
                       lambda: gemm_bf16(gemm_bf16(x, "gate_up", "swiglu_interleaved"), "down", "none")}
                fns |= {label: with_env(env, lambda: gemm_int4(gemm_int4(x, "gate_up", "swiglu_interleaved"),
                                                               "down", "none"))
                        for label, env in int4_tiles.items()}
            else:
                weights = bf16[name].shape[1] * bf16[name].shape[2]
                fns = {"dots1_ext bf16": lambda xin=xin, name=name, epi=epi: gemm_bf16(xin, name, epi)}
                fns |= {label: with_env(env, lambda xin=xin, name=name, epi=epi: gemm_int4(xin, name, epi))
                        for label, env in int4_tiles.items()}
            flops = 2.0 * S * weights
            times = time_fns(fns, warmup=5 if gpu else 1, rounds=10 if gpu else 2, iters=5 if gpu else 2)
            case = f"W4A16 {stage} T={T} balanced ({active} experts)"
            for label, ms in times.items():
                wbytes = active * weights * per_weight[label]
                floor = max(flops_floor_ms(flops), bytes_floor_ms(wbytes))
                extra = {"vs_bf16": round(times["dots1_ext bf16"] / ms, 3)}
                report.add(Row("grouped_gemm", case, label, ms, floor, gbs=wbytes / ms / 1e6,
                               tflops=flops / ms / 1e9, extra=extra))


if __name__ == "__main__":
    bench_main(run, __doc__)
