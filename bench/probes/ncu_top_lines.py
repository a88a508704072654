"""Probe helper: the SASS instructions of an Nsight Compute source page (CSV) with the most warp-stall
samples (with their main stall reasons), and the samples summed per opcode and per reason: where a
kernel's warps wait.

    ncu --section SourceCounters --section WarpStateStats -k regex:moe_gate_up --launch-skip 7 \\
        --launch-count 1 -o rep python bench/probes/moe_decode_ncu.py 1
    ncu -i rep.ncu-rep --page source --csv --print-source sass > rep.csv
    python bench/probes/ncu_top_lines.py rep.csv [N] [executed]

With `executed` the lines are ranked by instructions executed instead of stall samples. (Per source
line: bench/probes/ncu_sass_regions.py; ncu's CSV of the CUDA source view held only the source text for
the MoE decode kernels.)
"""

from __future__ import annotations

import collections
import csv
import sys


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> None:
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    by_executed = len(sys.argv) > 3 and sys.argv[3] == "executed"
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    header_at = next(i for i, r in enumerate(rows) if any("Source" == c.strip() for c in r))
    header, body = rows[header_at], rows[header_at + 1:]
    print("columns:", " | ".join(header))
    src = header.index("Source")
    sample_cols = [i for i, c in enumerate(header) if "Warp Stall Sampling" in c]
    key = sample_cols[0] if sample_cols else None
    if key is None:
        print("no warp stall sampling column")
        return
    total = sum(number(r[key]) for r in body if len(r) > key)
    by_op: collections.Counter = collections.Counter()
    executed_col = next((i for i, c in enumerate(header) if c.startswith("Instructions Executed")), None)
    executed: collections.Counter = collections.Counter()
    for r in body:
        if len(r) <= key:
            continue
        words = r[src].split() or ["?"]
        op = (words[1] if words[0].startswith("@") and len(words) > 1 else words[0]).split(".")[0]
        by_op[op] += number(r[key])
        if executed_col is not None:
            executed[op] += number(r[executed_col])
    print(f"samples ({header[key]}): {total:.0f}")
    reasons = [i for i, c in enumerate(header) if c.startswith("stall_") and "Not Issued" not in c]
    by_reason = {header[i][6:]: sum(number(r[i]) for r in body if len(r) > i) for i in reasons}
    print("by stall reason: " + ", ".join(f"{k} {v / max(total, 1):.1%}" for k, v in
                                         sorted(by_reason.items(), key=lambda kv: -kv[1])[:8]))
    for op, n in by_op.most_common(20):
        print(f"  {op:12s} {n / max(total, 1):6.1%}  executed {executed.get(op, 0):.0f}")
    rank_col = executed_col if by_executed and executed_col is not None else key
    rank_total = sum(number(r[rank_col]) for r in body if len(r) > rank_col)
    print(f"lines ranked by {header[rank_col]} (total {rank_total:.0f}):")
    ranked = sorted((r for r in body if len(r) > rank_col), key=lambda r: -number(r[rank_col]))[:top]
    for r in ranked:
        worst = sorted(((number(r[i]), header[i][6:]) for i in reasons), reverse=True)[:2]
        extra = ", ".join(f"{name} {n:.0f}" for n, name in worst if n > 0)
        print(f"{number(r[rank_col]) / max(rank_total, 1):6.1%} {r[src].strip()[:64]:64s} {extra}")


if __name__ == "__main__":
    main()
