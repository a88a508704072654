"""Timing, ceilings and reporting shared by every benchmark in bench/.

Each benchmark prints one line per case — median time, achieved rate, the floor (bytes over the
measured copy bandwidth, or FLOPs over the measured dense GEMM rate), our fraction of the floor and
the speedup over each peer timed in the same run — and appends its rows to a JSON report.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

ROOT = Path(__file__).resolve().parent.parent


def on_gpu() -> bool:
    """Whether the benchmarks run on the GPU: when one is present, unless DOTS1_EXT_BENCH_DEVICE=cpu
    (the harness's own tests run the quick CPU cases on a GPU machine too)."""
    return os.environ.get("DOTS1_EXT_BENCH_DEVICE", "").lower() != "cpu" and torch.cuda.is_available()


def default_device() -> str:
    return "cuda" if on_gpu() else "cpu"


def time_fn(fn: Callable[[], object], warmup: int = 10, iters: int = 50, setup: Callable[[], object] | None = None) -> float:
    """Median milliseconds of fn(). CUDA: one pair of CUDA events per call after `warmup` calls.
    CPU: perf_counter (labelled as CPU timing by the callers). `setup` runs before each call, untimed
    (e.g. to draw fresh inputs or restore in-place arguments)."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    if on_gpu():
        torch.cuda.synchronize()
        for _ in range(iters):
            if setup:
                setup()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            if setup:
                setup()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_steps(fn: Callable[[], object], steps: int = 20, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds per call of ``steps`` calls issued back to back, one pair of CUDA events
    around them (CPU: perf_counter): the steady state of a generation loop, where the host queues step
    n + 1 while the GPU runs step n. time_fn's per-call figure also holds the host's launch latency of
    the call, which the GPU waits for after each synchronisation."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if on_gpu():
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / steps)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / steps)
    return statistics.median(times)


def time_fns(fns: dict[str, Callable[[], object]], warmup: int = 5, rounds: int = 10, iters: int = 5) -> dict[str, float]:
    """Median milliseconds of each fn, measured round-robin: ``rounds`` rounds, each timing ``iters``
    calls of every fn in turn (the order rotating per round), so that clock and power drift over the
    run falls on every implementation alike. Per call as in time_fn (one pair of CUDA events)."""
    labels = list(fns)
    for label in labels:
        for _ in range(warmup):
            fns[label]()
    samples: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            for _ in range(iters):
                if on_gpu():
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fns[label]()
                    end.record()
                    end.synchronize()
                    samples[label].append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    fns[label]()
                    samples[label].append((time.perf_counter() - t0) * 1e3)
    return {label: statistics.median(v) for label, v in samples.items()}


_CEILINGS: dict[str, float | str] = {}


def capture_graph(fn: Callable[..., object], calls: list[tuple]) -> "torch.cuda.CUDAGraph":
    """One CUDA graph holding ``fn(*args)`` for every ``args`` in ``calls``, each warmed up once on a side
    stream first (lazy inits, workspaces, Triton compiles), replayed once before it is returned."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in calls:
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in calls:
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    return graph


def replay_ms(graph: "torch.cuda.CUDAGraph", before: Callable[[], object] | None = None) -> float:
    """GPU ms of one replay between CUDA events; ``before()`` (e.g. fresh inputs) runs untimed first."""
    if before is not None:
        before()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def graph_us(fn: Callable[[], object], reps: int = 32, iters: int = 20) -> float | None:
    """GPU microseconds per call of fn with the launch path taken away: ``reps`` calls captured in one
    CUDA graph, the graph replayed ``iters`` times between CUDA events, median / reps. For kernels of a
    few microseconds, whose per-call time in ``time_fn`` is the host's launch path. None on CPU."""
    if not on_gpu():
        return None
    graph = capture_graph(fn, [()] * reps)
    times = [replay_ms(graph) for _ in range(iters)]
    return round(statistics.median(times) * 1e3 / reps, 2)


def copy_bandwidth_gbs() -> float:
    """Measured device copy bandwidth in GB/s, counting bytes read plus written (1 GiB copy on GPU)."""
    if "copy" not in _CEILINGS:
        n = (1 << 30) if on_gpu() else (1 << 26)
        src = torch.empty(n, dtype=torch.uint8, device=default_device())
        dst = torch.empty_like(src)
        ms = time_fn(lambda: dst.copy_(src), warmup=3, iters=10)
        _CEILINGS["copy"] = 2 * n / (ms * 1e-3) / 1e9
    return _CEILINGS["copy"]


def parse_knobs(args: list[str], defaults: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """The probes' switches from their command line: each ``NAME=v1,v2`` word -> {NAME: [v1, v2]} (over
    ``defaults``)."""
    knobs = dict(defaults or {})
    for a in args:
        if "=" in a:
            name, values = a.split("=", 1)
            knobs[name] = values.split(",")
    return knobs


def pop_layers(knobs: dict[str, list[str]], default: int = 8) -> int:
    """The probes' model depth: the ``layers=N`` word of their command line (taken out of ``knobs``, where
    it is not a switch), ``default`` without it. One positive integer, else SystemExit naming it."""
    values = knobs.pop("layers", [str(default)])
    if len(values) != 1 or not values[0].isdigit() or int(values[0]) < 1:
        raise SystemExit(f"layers= takes one positive integer (the model's layers), got {','.join(values)!r}")
    return int(values[0])


def knob_settings(knobs: dict[str, list[str]]) -> Iterator[tuple[dict[str, str], str]]:
    """Every combination of the switches' values, in order, with a label ("NAME=v ..." without the
    DOTS1_EXT_ prefix; "defaults" for the one empty setting when there are no switches)."""
    for combo in itertools.product(*knobs.values()):
        env = dict(zip(knobs, combo))
        yield env, " ".join(f"{n.replace('DOTS1_EXT_', '')}={v}" for n, v in env.items()) or "defaults"


@contextlib.contextmanager
def env_vars(settings: dict[str, str]) -> Iterator[None]:
    """The environment variables in ``settings`` set for the ``with`` block, then each put back as it
    was (unset again where it was unset). The ops read their DOTS1_EXT_* switches at launch, also while
    a CUDA graph is captured, so a graph keeps the kernels chosen under these settings."""
    old = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def with_env(settings: dict[str, str], fn: Callable[..., object]) -> Callable[..., object]:
    """fn, each call of it run under ``env_vars(settings)`` (fn itself where there are no settings)."""
    if not settings:
        return fn

    def call(*args, **kwargs):
        with env_vars(settings):
            return fn(*args, **kwargs)

    return call


def read_ceiling_gbs() -> tuple[float, str]:
    """(GB/s, which kernel) of the fastest read-only stream measured over ~1.5 GB, weights read once: what
    a weight-streaming kernel can reach (the copy bandwidth counts a write per read and sits below it).
    The best of torch.sum (a reduction), a cuBLAS GEMV (F.linear at M=1, lm_head's row length) and, when
    the extension has CUDA kernels, our skinny_gemm at M=1 (both weight-load mappings) over the same
    weight, each as 4 calls in one CUDA graph (median of 10 replays). Cached per process. Not the
    hardware's read limit: the probe bench/probes/read_patterns.cu reads ~10% faster when every warp
    load covers >= 256 B of a row."""
    if "read" not in _CEILINGS:
        gpu = on_gpu()
        device, dtype = default_device(), (torch.bfloat16 if gpu else torch.float32)
        K = 4096 if gpu else 1024
        N = (int(1.5e9) // (2 * K)) // 256 * 256 if gpu else 16384
        w = torch.randn(N, K, device=device, dtype=dtype)
        x = torch.randn(1, K, device=device, dtype=dtype)
        nbytes = w.numel() * w.element_size()
        candidates = {"torch.sum": lambda: w.sum(),
                      ("cuBLAS GEMV" if gpu else "F.linear"): lambda: torch.nn.functional.linear(x, w)}
        if gpu:
            from dots1_ext import ops
            from dots1_ext.ops._lib import has_kernel

            if has_kernel("skinny_gemm", "CUDA"):
                candidates["skinny_gemm M=1"] = lambda: ops.skinny_gemm(x, w, "none")
                candidates["skinny_gemm frag M=1"] = with_env({"DOTS1_EXT_SKINNY_KERNEL": "frag"},
                                                               lambda: ops.skinny_gemm(x, w, "none"))

        def ms_per_call(fn) -> float:
            # Back to back in one graph (as the kernels it bounds run): per-call events around an idle
            # GPU read 5-10% lower and moved between processes (measured on the H200, 2026-11-29).
            if not gpu:
                return time_fn(fn, warmup=3, iters=10)
            graph = capture_graph(lambda: fn(), [()] * 4)
            ms = statistics.median(replay_ms(graph) for _ in range(10)) / 4
            del graph
            return ms

        rates = {name: nbytes / (ms_per_call(fn) * 1e-3) / 1e9 for name, fn in candidates.items()}
        del w
        best = max(rates, key=rates.get)
        _CEILINGS["read"] = rates[best]
        _CEILINGS["read_detail"] = (f"best of {', '.join(f'{k} {v:.0f}' for k, v in rates.items())} GB/s "
                                    f"over a {nbytes / 1e9:.2f} GB weight: {best}")
    return _CEILINGS["read"], _CEILINGS["read_detail"]


def gemm_tflops() -> float:
    """Measured dense bf16 GEMM rate (8192^3 on GPU, 1024^3 fp32 on CPU) in TFLOP/s, random data."""
    if "gemm" not in _CEILINGS:
        n = 8192 if on_gpu() else 1024
        dtype = torch.bfloat16 if on_gpu() else torch.float32
        a = torch.randn(n, n, device=default_device(), dtype=dtype)
        b = torch.randn(n, n, device=default_device(), dtype=dtype)
        ms = time_fn(lambda: a @ b, warmup=3, iters=10)
        _CEILINGS["gemm"] = 2 * n**3 / (ms * 1e-3) / 1e12
    return _CEILINGS["gemm"]


def bytes_floor_ms(nbytes: float) -> float:
    return nbytes / (copy_bandwidth_gbs() * 1e9) * 1e3


def flops_floor_ms(flops: float) -> float:
    return flops / (gemm_tflops() * 1e12) * 1e3


@dataclass
class Row:
    bench: str
    case: str
    impl: str
    ms: float
    floor_ms: float | None = None
    gbs: float | None = None
    tflops: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def frac_floor(self) -> float | None:
        return self.floor_ms / self.ms if self.floor_ms else None


class Report:
    """Collects rows, prints them as an aligned table, writes JSON."""

    def __init__(self, title: str):
        self.title = title
        self.rows: list[Row] = []
        self.notes: list[str] = []  # e.g. peers skipped, printed under the table

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def table(self) -> str:
        lines = [f"## {self.title}", ""]
        lines.append("| case | impl | time (ms) | GB/s | TFLOP/s | floor (ms) | floor / time | speedup vs | notes |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        by_case: dict[str, list[Row]] = {}
        for r in self.rows:
            by_case.setdefault(r.case, []).append(r)
        for case, rows in by_case.items():
            ours = [r for r in rows if r.impl.startswith("dots1_ext")]
            for r in rows:
                speed = ""
                if ours and r in ours:
                    peers = [p for p in rows if p not in ours]
                    speed = ", ".join(f"{p.impl} {p.ms / r.ms:.2f}x" for p in peers)
                lines.append(
                    f"| {case} | {r.impl} | {r.ms:.4f} | {fmt(r.gbs, 0)} | {fmt(r.tflops, 0)} | "
                    f"{fmt(r.floor_ms, 4)} | {fmt(r.frac_floor, 2)} | {speed} | "
                    f"{', '.join(f'{k} {v}' for k, v in r.extra.items())} |"
                )
        lines += [""] + [f"note: {n}" for n in self.notes] if self.notes else []
        return "\n".join(lines)

    def to_json(self) -> list[dict]:
        return [asdict(r) | {"frac_floor": r.frac_floor} for r in self.rows]


def fmt(v: float | None, digits: int) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def commit_id(root: Path | str = ROOT) -> str:
    """HEAD's short id, with "+N changed" when N tracked files differ from it (a run of an uncommitted
    tree, or a checkout whose .git is older than its files, must not pass for HEAD); "" without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                 capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return ""
    return f"{head}+{len(changed)} changed" if head and changed else head


def environment() -> dict:
    commit = os.environ.get("DOTS1_EXT_COMMIT", "") or commit_id()
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or "unknown",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if on_gpu() else f"CPU ({platform.processor() or platform.machine()})",
        "timing": "CUDA events, median" if on_gpu() else "CPU perf_counter, median (CPU timings, not GPU)",
    }
    if on_gpu():
        env["copy_GBs"] = round(copy_bandwidth_gbs(), 1)
        env["gemm_TFLOPs"] = round(gemm_tflops(), 1)
    return env


def header(env: dict) -> str:
    return " | ".join(f"{k}: {v}" for k, v in env.items())


def write_json(path: str | os.PathLike, reports: list[Report], env: dict | None = None) -> None:
    payload = {"env": env or environment(), "reports": {r.title: r.to_json() for r in reports}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1))


def bench_main(run: Callable[..., list[Report]], description: str | None = None, argv: list[str] | None = None) -> None:
    """``python -m bench.bench_<name> [--quick] [--json PATH]``: one benchmark module on its own."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer cases and iterations")
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    env = environment()
    print(header(env), flush=True)
    reports = run(quick=args.quick)
    for report in reports:
        print()
        print(report.table())
    if args.json:
        write_json(args.json, reports, env)


def make_routing(kind: str, T: int, k: int, E: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ids [T, k] (distinct per token) and fp32 softmax weights [T, k], on CPU. Balanced: a
    uniform random k-subset per token; Zipf: popularity 1/rank^1.2 over a random expert order (as
    tests/test_grouped_gemm.py routing_counts and the peer's make_routing)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 2 * T + (kind == "zipf"))
    if kind == "balanced":
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]
    elif kind == "zipf":
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
        p = p[torch.randperm(E, generator=g)]
        ids = torch.multinomial(p.expand(T, E).contiguous(), k, replacement=False, generator=g)
    else:
        raise ValueError(kind)
    weights = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
    return ids.to(torch.int32).contiguous(), weights.float().contiguous()
