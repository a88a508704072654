"""Runs the benchmarks and writes their tables (Markdown) and rows (JSON).

    python -m bench.run                       # every benchmark, real Dots1 shapes on a GPU
    python -m bench.run --only norm gating    # a subset
    python -m bench.run --quick               # fewer cases (smoke run)
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

from bench.common import environment, header, write_json

BENCHES = ["gating", "dispatch", "norm", "grouped_gemm", "skinny_gemm", "moe_decode", "moe_peer", "attention", "moe", "model",
           "decode", "long_prompt", "generation", "quant", "int4_model"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=BENCHES, help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer cases and iterations")
    parser.add_argument("--json", default="bench/out/bench.json", help="where to write the rows")
    parser.add_argument("--md", default="bench/out/bench.md", help="where to write the tables")
    args = parser.parse_args(argv)

    env = environment()
    print(header(env), flush=True)
    reports, failed = [], []
    for name in args.only or BENCHES:
        try:
            module = importlib.import_module(f"bench.bench_{name}")
        except ModuleNotFoundError as exc:
            print(f"[bench] {name}: not available ({exc})", flush=True)
            continue
        try:
            for report in module.run(quick=args.quick):
                print(report.table() + "\n", flush=True)
                reports.append(report)
        except Exception:  # one broken benchmark must not hide the others' numbers
            failed.append(name)
            traceback.print_exc()
    write_json(args.json, reports, env)
    if any(r.title.startswith("MoE block") for r in reports):
        try:
            from bench.plot import plot

            plot(args.json, str(Path(args.json).with_name("moe_speedup.png")))
        except ImportError:
            print("[bench] matplotlib not installed: no PNG (python -m bench.plot JSON PNG later)", flush=True)
    md = [f"# dots1_ext benchmarks", "", header(env), ""] + [r.table() + "\n" for r in reports]
    if failed:
        md.append(f"Benchmarks that failed: {', '.join(failed)}")
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text("\n".join(md))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
