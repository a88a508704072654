"""Probe: the CUDA permute's index (expert_offsets, row_map) in its two forms, the single block and the
multi-block launches (DOTS1_EXT_PERMUTE_INDEX=single / multi), across token counts at real shape (E=128,
k=6, balanced random routing): the index alone (hidden of width 0: no rows to copy) and the whole op at
H=4096 bf16, each as GPU microseconds per call from graph replays (bench.common.graph_us), and the
whole op's floor (x read once, 6 rows written, over the measured copy bandwidth). Picks where auto
should switch (csrc/dispatch/dispatch.cpp kPermuteMultiMinIds).

    PYTHONPATH=. python bench/probes/permute_index_forms.py [T ...]   (CUDA only)
"""

from __future__ import annotations

import sys

import torch

from bench.common import bytes_floor_ms, env_vars, graph_us, make_routing
from dots1_ext import ops

E, K, H = 128, 6, 4096


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("permute_index_forms: needs a CUDA GPU")
    Ts = [int(a) for a in sys.argv[1:]] or [16, 64, 256, 512, 1024, 1365, 1366, 2048, 4096, 8192, 16384]
    print(f"GPU {torch.cuda.get_device_name()}, E={E} top-{K}, H={H} bf16, balanced random routing; us per call (graph replay)")
    print(f"{'T':>6} {'ids':>7} | {'index single':>12} {'index multi':>11} | {'op single':>9} {'op multi':>8} {'op auto':>8} | {'floor':>7}")
    for T in Ts:
        ids, _ = make_routing("balanced", T, K, E, seed=T)
        ids = ids.cuda()
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        empty = torch.empty(T, 0, device="cuda", dtype=torch.bfloat16)
        ref = ops.permute(x, ids, E)
        row = {}
        for form in ("single", "multi", "auto"):
            with env_vars({"DOTS1_EXT_PERMUTE_INDEX": form}):
                got = ops.permute(x, ids, E)
                assert all(torch.equal(a, b) for a, b in zip(got, ref)), form
                if form != "auto":
                    row[f"index {form}"] = graph_us(lambda: ops.permute(empty, ids, E))
                row[f"op {form}"] = graph_us(lambda: ops.permute(x, ids, E))
        floor = bytes_floor_ms((T + K * T) * H * 2) * 1e3
        print(f"{T:>6} {T * K:>7} | {row['index single']:>12.1f} {row['index multi']:>11.1f} | {row['op single']:>9.1f} "
              f"{row['op multi']:>8.1f} {row['op auto']:>8.1f} | {floor:>7.1f}")
    T = 16384
    ids, _ = make_routing("balanced", T, K, E, seed=1)
    ids = ids.cuda()
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    from torch.profiler import ProfilerActivity, profile
    for form in ("single", "multi"):
        with env_vars({"DOTS1_EXT_PERMUTE_INDEX": form}):
            for _ in range(3):
                ops.permute(x, ids, E)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    ops.permute(x, ids, E)
                torch.cuda.synchronize()
        print(f"T={T} {form}: GPU time per call by kernel")
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
            if e.device_time_total > 0:
                print(f"  {e.device_time_total / 10:9.1f} us  {e.key[:110]}")


if __name__ == "__main__":
    main()
