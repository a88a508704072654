"""Probe helper: a kernel's instructions executed and warp-stall samples per source line and per region of
lines, from Nsight Compute's SASS page and a line-annotated disassembly of the same build.

ncu's CSV of the CUDA source view (`--print-source cuda`) held only the source text for the MoE decode
kernels (nvcc 13.0, ncu of CUDA 13.0), so this maps the SASS page's per-instruction counters to source
lines itself: the disassembly (`nvdisasm -c -gi` of a cubin built with -lineinfo and the same flags)
gives each instruction offset its line and inlining chain; an instruction counts for the outermost line
of `--file` inside `--lines` (the kernel body), e.g. the call site of an inlined weight stream.

    ncu --section SourceCounters --section WarpStateStats -k regex:moe_down --launch-skip 7 --launch-count 1 \\
        -o rep python bench/probes/moe_decode_ncu.py 1
    ncu -i rep.ncu-rep --page source --csv --print-source sass > rep_sass.csv
    nvcc -cubin -lineinfo -O3 -gencode=arch=compute_90a,code=sm_90a ... -o k.cubin csrc/moe_decode/moe_decode_kernels.cu
    nvdisasm -c -gi k.cubin > k.sass
    python bench/probes/ncu_sass_regions.py rep_sass.csv k.sass --file moe_decode_kernels.cu --lines 1062-1262 \\
        --warps 2048 --regions shared:1102-1153,routed:1157-1219,tail:1220-1262

The disassembly holds every kernel of the cubin; the one whose instructions match the SASS page (same
offsets, same opcodes) is used, and a mismatch is an error (a different build).
"""

from __future__ import annotations

import argparse
import collections
import csv
import re
import sys

LINE = re.compile(r'\s*//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
FUNC = re.compile(r"^\.text\.(\S+):")


def opcode(text: str) -> str:
    return next(w for w in text.split() if not w.startswith("@"))


def read_page(path: str):
    rows = [r for r in csv.reader(open(path, newline="")) if r]
    at = next(i for i, r in enumerate(rows) if "Address" in r and "Source" in r)
    header, body = rows[at], rows[at + 1:]
    col = {name: header.index(name) for name in ("Address", "Source", "Instructions Executed")}
    sampled = "Warp Stall Sampling (All Samples)"
    samples = header.index(sampled) if sampled in header else None
    reasons = [(i, c[len("stall_"):]) for i, c in enumerate(header) if c.startswith("stall_")]
    base = int(body[0][col["Address"]], 16)
    page = {}
    for r in body:
        off = int(r[col["Address"]], 16) - base
        def n(i):
            return float(r[i].replace(",", "") or 0) if i is not None else 0.0

        page[off] = (r[col["Source"]].strip(), n(col["Instructions Executed"]), n(samples),
                     {name: n(i) for i, name in reasons})
    return page


def read_listing(path: str):
    """{function: {offset: (instruction text, [(file, line, inlined_at_file, inlined_at_line), ...])}}"""
    funcs, cur, chain, pending = {}, None, [], []
    for text in open(path):
        m = FUNC.match(text)
        if m:
            cur = funcs.setdefault(m.group(1), {})
            chain, pending = [], []
            continue
        m = LINE.match(text)
        if m:
            pending.append(m.groups())
            continue
        m = INSTR.match(text)
        if m and cur is not None:
            if pending:
                chain, pending = pending, []
            cur[int(m.group(1), 16)] = (m.group(2), chain)
    return funcs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page", help="ncu --page source --csv --print-source sass output")
    ap.add_argument("listing", help="nvdisasm -c -gi output of the same build")
    ap.add_argument("--file", required=True, help="the kernel's source file name (its end)")
    ap.add_argument("--lines", required=True, help="the kernel body's lines, FIRST-LAST")
    ap.add_argument("--warps", type=float, default=1.0, help="divide instruction counts by this (warps launched)")
    ap.add_argument("--regions", default="", help="NAME:FIRST-LAST,... of kernel-body lines")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    lo, hi = map(int, a.lines.split("-"))
    regions = [(n, *map(int, span.split("-"))) for n, span in (r.split(":") for r in a.regions.split(",") if r)]
    page = read_page(a.page)
    funcs = read_listing(a.listing)
    def same_code(ins) -> bool:
        return len(ins) == len(page) and all(off in ins and opcode(ins[off][0]) == opcode(page[off][0]) for off in page)

    match = [f for f, ins in funcs.items() if same_code(ins)]
    if len(match) != 1:
        sys.exit(f"ncu_sass_regions: {len(match)} functions of the listing match the SASS page (need 1: same build?)")
    listing = funcs[match[0]]
    by_line = collections.defaultdict(lambda: [0.0, 0.0])
    by_region = collections.defaultdict(lambda: [0.0, 0.0, collections.Counter()])
    for off, (_, executed, samples, reasons) in page.items():
        outer = None
        for f, line, at_file, _ in listing[off][1]:
            if at_file is None and f.endswith(a.file) and lo <= int(line) <= hi:
                outer = int(line)
        by_line[outer][0] += executed
        by_line[outer][1] += samples
        name = next((n for n, r0, r1 in regions if outer is not None and r0 <= outer <= r1), "other")
        reg = by_region[name]
        reg[0] += executed
        reg[1] += samples
        reg[2].update(reasons)
    total_x = sum(v[0] for v in by_line.values())
    total_s = sum(v[1] for v in by_line.values()) or 1.0
    print(f"kernel: {match[0]}")
    print(f"instructions executed: {total_x:.0f} ({total_x / a.warps:.1f} per warp); stall samples {total_s:.0f}\n")
    if regions:
        print("| region | instructions per warp | stall samples | share | top stall reasons |")
        print("| --- | --- | --- | --- | --- |")
        for name, (x, s, reasons) in sorted(by_region.items(), key=lambda kv: -kv[1][0]):
            top = ", ".join(f"{r} {v / max(s, 1) * 100:.0f}%" for r, v in reasons.most_common(3) if v)
            print(f"| {name} | {x / a.warps:.1f} | {s:.0f} | {s / total_s * 100:.1f}% | {top} |")
        print()
    print("| line | instructions per warp | stall samples |")
    print("| --- | --- | --- |")
    for line, (x, s) in sorted(by_line.items(), key=lambda kv: -kv[1][0])[: a.top]:
        print(f"| {line} | {x / a.warps:.1f} | {s:.0f} |")


if __name__ == "__main__":
    main()
