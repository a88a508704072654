"""Probe: where each CTA of the decode step's MoE kernels spends its time (issue 14). The fast MoE decode
kernels of a probe build (``DOTS1_EXT_PHASE_STAMPS=1`` at build time: setup.py then compiles
csrc/moe_decode/moe_decode_kernels.cu's phase stamps in) record, in thread 0 of every CTA, %globaltimer
at their phase edges; each launch overwrites the last one's, so after a graph replay of the decode step
the stamps are the last MoE layer's. The grid router (csrc/gating) stamps its phases too in such a build
(partial sums, arrival, the last block's routing); they print beside the MoE kernels'. For the 8-layer
(``layers=N``) real-shape model (int4 experts, or bf16 with the word bf16), B=1, context 2048, with the
MoE ops' hidden_settled as the model sets it (``settled=0``: off), over REPLAYS replays of its decode
graph: per phase edge, the earliest, median and latest CTA, µs from the first gate_up CTA's residency
(medians over the replays); gate_up's CTAs apart by how many shared-expert tiles they hold (at T=1, 352
tiles over 264 CTAs: 2 or 1).

    DOTS1_EXT_PHASE_STAMPS=1 python setup.py build_ext --inplace   # a probe build (not for timing others)
    PYTHONPATH=. python bench/probes/moe_phase_stamps.py [bf16] [layers=N] [settled=0|1]
"""

from __future__ import annotations

import ctypes
import statistics
import sys

import numpy as np
import torch

from bench.bench_decode import real_decode_setup
from bench.common import parse_knobs, pop_layers

REPLAYS = 20
BLOCKS, SLOTS = 512, 16  # csrc kStampBlocks, kStampSlots
GATE_UP = {0: "resident", 1: "first shared tile computed (pre-wait)", 2: "wait returned", 3: "shared tiles done",
           4: "schedule built", **{5 + n: f"routed tile {n + 1} done" for n in range(9)}, 15: "exit"}
DOWN = {0: "resident", 1: "wait returned", 2: "shared stream done (warp 0)", 3: "routed stream done (warp 0)",
        15: "exit"}
ROUTER_BLOCKS, ROUTER_SLOTS = 512, 8  # csrc/gating kRouterStampBlocks, kRouterStampSlots
ROUTER = {0: "resident", 1: "wait returned", 2: "hidden staged", 3: "partial sums stored", 4: "fenced",
          5: "arrived", 6: "last block: logits summed", 7: "last block: routed"}


def _reader(symbol: str, shape: tuple[int, ...]):
    """read(clear) -> the stamps of the extension's extern "C" reader `symbol` (csrc/phase_stamps.cuh
    copy_phase_stamps) as a uint64 array of `shape`, zeroed on the device after the copy when clear;
    None in a build without that reader."""
    import dots1_ext._C as ext
    lib = ctypes.CDLL(ext.__file__)
    if not hasattr(lib, symbol):
        return None
    fn = getattr(lib, symbol)
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_int

    def read(clear: bool) -> np.ndarray:
        buf = np.zeros(shape, dtype=np.uint64)
        err = fn(buf.ctypes.data, int(clear))
        if err != 0:
            raise RuntimeError(f"{symbol}: cudaError {err}")
        return buf
    return read


def stamps_reader():
    """The MoE decode kernels' stamps [2][BLOCKS][SLOTS]; exits with how to make a stamps build."""
    read = _reader("dots1_phase_stamps_copy", (2, BLOCKS, SLOTS))
    if read is None:
        sys.exit("moe_phase_stamps: the extension was built without the stamps; rebuild with "
                 "DOTS1_EXT_PHASE_STAMPS=1 (see this file's docstring)")
    return read


def router_stamps_reader():
    """The grid router's stamps [1][ROUTER_BLOCKS][ROUTER_SLOTS] (csrc/gating), or None without them."""
    return _reader("dots1_router_stamps_copy", (1, ROUTER_BLOCKS, ROUTER_SLOTS))


def edges(stamps: np.ndarray, kernel: int, slots: dict[int, str], ref: int, ctas) -> dict[str, tuple]:
    """Per slot: (first, median, last) CTA, µs from ref, over the CTAs in ctas that wrote it."""
    out = {}
    for slot, name in slots.items():
        v = [int(stamps[kernel, b, slot]) for b in ctas if stamps[kernel, b, slot]]
        if v:
            us = sorted((t - ref) / 1e3 for t in v)
            out[name] = (us[0], statistics.median(us), us[-1], len(us))
    return out


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("moe_phase_stamps: needs a CUDA GPU")
    from dots1_ext.cuda_graph import DecodeGraphs

    from dots1_ext import modules

    experts = "bf16" if "bf16" in sys.argv[1:] else "int4"
    knobs = parse_knobs(sys.argv[1:])
    layers = pop_layers(knobs)
    settled = knobs.pop("settled", ["1"])
    if settled not in (["0"], ["1"]) or knobs:
        sys.exit(f"moe_phase_stamps: takes bf16, layers=N and settled=0|1, got {sys.argv[1:]}")
    modules.MOE_DECODE_HIDDEN_SETTLED = settled == ["1"]
    read = stamps_reader()
    read_router = router_stamps_reader()
    ctx = 2048
    model, cfg, tok = real_decode_setup(layers, experts, ctx)
    tiles_shared = cfg.moe_intermediate_size * cfg.n_shared_experts // 8  # T=1: one column group
    rows: dict[tuple[str, str], list[tuple]] = {}
    with torch.inference_mode():
        graphs = DecodeGraphs(model)
        graphs(tok, ctx)
        for _ in range(5):
            graphs(tok, ctx)
        torch.cuda.synchronize()
        for _ in range(REPLAYS):
            read(True)
            if read_router is not None:
                read_router(True)
            graphs(tok, ctx)
            torch.cuda.synchronize()
            st = read(False)
            rt = read_router(False) if read_router is not None else None
            gu = [b for b in range(BLOCKS) if st[0, b, 0]]
            dn = [b for b in range(BLOCKS) if st[1, b, 0]]
            if not gu:
                sys.exit("moe_phase_stamps: no gate_up stamps (the fast kernels did not run?)")
            ref = min(int(st[0, b, 0]) for b in gu)
            grid = len(gu)
            heavy = [b for b in gu if b + grid < tiles_shared]
            light = [b for b in gu if b + grid >= tiles_shared]
            for label, ctas in ((f"gate_up, 2 shared tiles ({len(heavy)} CTAs)", heavy),
                                (f"gate_up, 1 shared tile ({len(light)} CTAs)", light)):
                for name, e in edges(st, 0, GATE_UP, ref, ctas).items():
                    rows.setdefault((label, name), []).append(e)
            for name, e in edges(st, 1, DOWN, ref, dn).items():
                rows.setdefault((f"down ({len(dn)} CTAs)", name), []).append(e)
            if rt is not None:
                rb = [b for b in range(ROUTER_BLOCKS) if rt[0, b, 0]]
                for b in rb:  # the last-block slots of a CTA that was last in an earlier layer's launch
                    if rt[0, b, 6] < rt[0, b, 5]:
                        rt[0, b, 6:8] = 0
                for name, e in edges(rt, 0, ROUTER, ref, rb).items():
                    rows.setdefault((f"router ({len(rb)} CTAs)", name), []).append(e)
    print(f"moe_phase_stamps: {experts} experts, {layers}-layer real-shape model, B=1, context {ctx}, "
          f"hidden_settled {settled[0]}; the last MoE "
          f"layer of each of {REPLAYS} graph replays; µs from the first gate_up CTA's residency: first / "
          f"median / last CTA (medians over the replays)")
    for (label, name), es in rows.items():
        f, m, l = (statistics.median(e[i] for e in es) for i in range(3))
        print(f"  {label:34s} {name:40s} {f:+8.2f} {m:+8.2f} {l:+8.2f}   ({es[0][3]} CTAs)")


if __name__ == "__main__":
    main()
