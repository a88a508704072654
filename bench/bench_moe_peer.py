"""The routed experts of a MoE layer (no shared experts, no router) at real Dots1 shape (H=4096,
E=128 top-6, I=1408, bf16), ours against vLLM's tuned Triton fused-MoE kernel (issue 15):

    out[t] = sum_j w[t, j] * down[ids[t, j]] @ (silu(gate[ids[t, j]] @ x[t]) * up[ids[t, j]] @ x[t])

- ours: permute -> grouped_gemm(gate_up, "swiglu_interleaved") -> grouped_gemm(down) -> unpermute, and
  for T <= 64 also moe_decode_gate_up + moe_decode_down (what decode runs up to
  modules.MOE_DECODE_MAX_TOKENS = 32; one launch each up to 64 tokens), on the GPU also with the fragment
  weight-load mapping (DOTS1_EXT_MOE_DECODE_LOADS=frag; the default, wide_all, reads 256 / 128 B row
  segments). Ours
  reads the interleaved copy of gate_up (SwiGLU fused in the epilogue), as the model does.
- peer: vLLM's ``fused_experts`` (../shared/peers/vllm_fused_moe.py, never part of the project) in the
  HF layout, with per (T, routing) the best config of a time-boxed sweep over the peer's own candidates
  (``DOTS1_EXT_PEER_SWEEP_S`` seconds per T, default 20, quick 5), and with vLLM's default config (what
  an untuned user gets). The align (moe_align_block_size, a torch stand-in in the peer file) is computed
  once and excluded; its own time is in the notes. The peer is looked up in $DOTS1_EXT_PEERS_DIR, then
  in the ignored folder .peers/ at the repository root, then on sys.path; on CPU it is skipped.

Same x, weights and ids on both sides; balanced (distinct random top-6) and Zipf (s=1.2) routing. The
peer's output is checked against ours (and both against an fp32 reference) before timing.

Timing: each implementation is captured in one CUDA graph of several calls cycling over WEIGHT_SETS
copies of the weights (so L2 does not serve the experts the previous call read), the graphs replayed
round-robin (bench.common.time_fns), median replay / calls. Floor: max(touched experts' bytes / the read
ceiling, FLOPs / the dense GEMM rate), the read ceiling measured in the same run (bench.common.
read_ceiling_gbs: the best of torch.sum, a cuBLAS GEMV and our skinny_gemm at M=1 over ~1.5 GB).
Issue 15's bar: the lower speed of 1.15x the tuned peer and 0.95 of the floor, and never slower than
the tuned peer.

    python -m bench.bench_moe_peer [--quick]        (DOTS1_BENCH_MOE_PEER_TS=8,32,64: only those T)
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import (ROOT, Report, Row, bench_main, capture_graph, gemm_tflops, make_routing, on_gpu,
                          read_ceiling_gbs, time_fn, time_fns, with_env)
from dots1_ext import ops

REAL = dict(E=128, k=6, H=4096, I=1408)
TINY = dict(E=8, k=2, H=256, I=128)
PEER_MODULE = "vllm_fused_moe"
PEERS_DIR_ENV = "DOTS1_EXT_PEERS_DIR"
SWEEP_ENV = "DOTS1_EXT_PEER_SWEEP_S"
TS_ENV = "DOTS1_BENCH_MOE_PEER_TS"  # comma-separated token counts instead of the default list
DECODE_MAX_T = 64  # the moe_decode ops read each touched expert once per launch of up to 64 tokens
WEIGHT_SETS = 2  # x 7.4 GB at real shape (HF gate_up for the peer, interleaved gate_up for ours, down)
PEER_TOL = 2e-2  # the peer's own tolerance: max |out - ref| / max |ref|
ROUTINGS = ("balanced", "zipf")


# ---------------------------------------------------------------------------------------------------
# the peer
# ---------------------------------------------------------------------------------------------------
def peer_search_dirs() -> list[Path]:
    dirs = [Path(d) for d in os.environ.get(PEERS_DIR_ENV, "").split(os.pathsep) if d]
    return dirs + [ROOT / ".peers"]


def find_peer():
    """(module, where) for vLLM's fused-MoE peer, or (None, why not). Looks in $DOTS1_EXT_PEERS_DIR,
    then .peers/ at the repository root, then on sys.path."""
    for d in peer_search_dirs():
        path = d / f"{PEER_MODULE}.py"
        if not path.is_file():
            continue
        if PEER_MODULE in sys.modules and getattr(sys.modules[PEER_MODULE], "__file__", None) == str(path):
            return sys.modules[PEER_MODULE], str(path)
        spec = importlib.util.spec_from_file_location(PEER_MODULE, path)
        module = importlib.util.module_from_spec(spec)
        # Registered before running it: Triton's JIT looks its kernels' module up by name.
        sys.modules[PEER_MODULE] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # e.g. no triton: the bench still runs ours
            sys.modules.pop(PEER_MODULE, None)
            return None, f"{path} found but not importable ({type(exc).__name__}: {exc})"
        return module, str(path)
    try:
        module = importlib.import_module(PEER_MODULE)
    except ImportError:
        env = os.environ.get(PEERS_DIR_ENV)
        return None, (f"vLLM fused-MoE peer not found ({PEER_MODULE}.py not in ${PEERS_DIR_ENV} "
                      f"({env or 'unset'}), nor in {ROOT / '.peers'}, nor importable): ours timed alone. To time it: "
                      f"mkdir -p .peers && cp ../shared/peers/{PEER_MODULE}.py .peers/ (on the GPU machine also "
                      f"carry=['.peers']), or set {PEERS_DIR_ENV} to the folder holding it")
    except Exception as exc:
        return None, f"{PEER_MODULE} not importable ({type(exc).__name__}: {exc})"
    return module, getattr(module, "__file__", PEER_MODULE)


def config_str(cfg: dict) -> str:
    return (f"M{cfg['BLOCK_SIZE_M']}/N{cfg['BLOCK_SIZE_N']}/K{cfg['BLOCK_SIZE_K']}/G{cfg['GROUP_SIZE_M']}"
            f"/w{cfg.get('num_warps', '4*')}/s{cfg.get('num_stages', '3*')}")


def peer_fn(peer, cfg: dict, ids: torch.Tensor, E: int):
    """The peer's forward on fixed ids with the align (expert assignment) precomputed, so it is not
    timed; (x, w, ids, weights) like ours."""
    assignment = peer.prepare_expert_assignment(ids, cfg["BLOCK_SIZE_M"], E)

    def fn(x, w, ids, weights):
        return peer.fused_experts(x, w["gate_up"], w["down"], weights, ids, cfg, assignment=assignment)

    return fn


def sweep_budget_s(quick: bool) -> float:
    return float(os.environ.get(SWEEP_ENV, 5.0 if quick else 20.0))


def sweep_peer(peer, T: int, cases: dict, E: int, budget_s: float) -> tuple[dict, dict]:
    """Best config per routing among the peer's candidates for T (its pruning rules, in its prior
    order), each timed on both routings as the peer's own sweep does, until ``budget_s`` runs out.
    A config whose output is off ours by more than PEER_TOL is dropped. Returns ({routing: (ms, cfg)},
    info)."""
    candidates, pruned = peer.candidate_configs(T, peer.FULL_SPACE)
    candidates.sort(key=lambda c: peer.prior_key(c, T))
    deadline = time.time() + budget_s
    best: dict = {}
    tried, failed = 0, 0
    for cfg in candidates:
        if time.time() >= deadline:
            break
        tried += 1
        try:
            timings = {}
            for routing, case in cases.items():
                fn = peer_fn(peer, cfg, case["ids"], E)
                err = rel_err(fn(*case["calls"][0]), case["ours_out"])  # the first call compiles
                if not err <= PEER_TOL:
                    raise RuntimeError(f"off ours by {err:.3g}")
                timings[routing] = graph_ms(fn, case["calls"], iters=5)
        except Exception as exc:  # compile failure, out of resources, wrong result
            msg = str(exc)
            if "CUDA error" in msg or "illegal" in msg.lower():
                raise  # the context is unusable
            failed += 1
            continue
        for routing, ms in timings.items():
            if routing not in best or ms < best[routing][0]:
                best[routing] = (ms, cfg)
    info = dict(candidates=len(candidates), pruned=sum(pruned.values()), tried=tried, failed=failed,
                exhausted=tried < len(candidates))
    return best, info


# ---------------------------------------------------------------------------------------------------
# ours, data, reference
# ---------------------------------------------------------------------------------------------------
def ours_decode(x, w, ids, weights):
    act = ops.moe_decode_gate_up(x, w["gate_up_interleaved"], ids, None, "swiglu_interleaved")
    return ops.moe_decode_down(act, w["down"], ids, weights, None, None)


# ours_decode with DOTS1_EXT_MOE_DECODE_LOADS=frag (read at launch: a captured graph keeps it).
ours_decode_frag = with_env({"DOTS1_EXT_MOE_DECODE_LOADS": "frag"}, ours_decode)


def ours_permute(x, w, ids, weights):
    permuted, offsets, row_map = ops.permute(x, ids, w["down"].shape[0])
    act = ops.grouped_gemm(permuted, w["gate_up_interleaved"], offsets, "swiglu_interleaved")
    return ops.unpermute(ops.grouped_gemm(act, w["down"], offsets, "none"), row_map, weights)


def make_weights(s: dict, device: str, dtype: torch.dtype, seed: int) -> dict:
    E, H, I = s["E"], s["H"], s["I"]
    g = torch.Generator(device=device).manual_seed(seed)
    gate_up = torch.randn(E, 2 * I, H, device=device, dtype=dtype, generator=g).mul_(H**-0.5)
    down = torch.randn(E, H, I, device=device, dtype=dtype, generator=g).mul_(I**-0.5)
    return dict(gate_up=gate_up, gate_up_interleaved=ops.interleave_gate_up(gate_up), down=down)


def reference(x, w, ids, weights) -> torch.Tensor:
    """fp32 routed experts, HF layout, expert by expert."""
    T, k = ids.shape
    I = w["down"].shape[2]
    out = torch.zeros(T, w["down"].shape[1], device=x.device, dtype=torch.float32)
    flat = ids.reshape(-1).long()
    token = torch.arange(T, device=x.device).repeat_interleave(k)
    flat_w = weights.reshape(-1).float()
    for e in flat.unique().tolist():
        sel = (flat == e).nonzero().squeeze(1)
        h = x[token[sel]].float() @ w["gate_up"][e].float().t()
        y = (F.silu(h[:, :I]) * h[:, I:]) @ w["down"][e].float().t()
        out.index_add_(0, token[sel], y * flat_w[sel, None])
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------------------------------------------
# timing and ceilings
# ---------------------------------------------------------------------------------------------------
def graph_ms(fn, calls: list[tuple], iters: int) -> float:
    graph = capture_graph(fn, calls)
    ms = time_fn(graph.replay, warmup=1, iters=iters) / len(calls)
    del graph
    return ms


def calls_per_graph(T: int) -> int:
    return 8 if T <= 64 else 4 if T <= 512 else 2


# ---------------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------------
def run(quick: bool = False) -> list[Report]:
    gpu = on_gpu()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    s = REAL if gpu else TINY
    E, k, H, I = s["E"], s["k"], s["H"], s["I"]
    if gpu:
        Ts = [8, 4096] if quick else [1, 8, 32, 64, 512, 4096, 16384]
    else:
        Ts = [8, 64] if quick else [1, 8, 64]
    if os.environ.get(TS_ENV):
        Ts = [int(t) for t in os.environ[TS_ENV].split(",")]
    elt = torch.finfo(dtype).bits // 8
    expert_bytes = 3 * I * H * elt

    notes = []
    peer, where = (None, "peer skipped on CPU (Triton needs a GPU)") if not gpu else find_peer()
    if peer is None:
        print(f"[bench moe_peer] {where}", flush=True)
    notes.append(f"peer: {where}" if peer is not None else where)
    budget = sweep_budget_s(quick)

    read_gbs, read_detail = read_ceiling_gbs()
    gemm_rate = gemm_tflops()
    report = Report(f"MoE routed experts vs vLLM fused_moe (H={H}, E={E}, top-{k}, I={I}, "
                    f"{str(dtype).replace('torch.', '')}, {device}, read ceiling {read_gbs:.0f} GB/s, "
                    f"dense GEMM {gemm_rate:.0f} TFLOP/s)")
    notes.append(f"read ceiling: {read_detail}; "
                 f"floor = max(touched experts' bytes / read ceiling, FLOPs / dense GEMM rate)")

    sets = [make_weights(s, device, dtype, seed=i) for i in range(WEIGHT_SETS if gpu else 1)]
    for T in Ts:
        n_calls = calls_per_graph(T) if gpu else 2
        cases = {}
        for routing in ROUTINGS:
            ids_cpu, weights_cpu = make_routing(routing, T, k, E, seed=0)
            ids, weights = ids_cpu.to(device), weights_cpu.to(device)
            x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(device, dtype)
            calls = [(x, sets[i % len(sets)], ids, weights) for i in range(n_calls)]
            ref = reference(x, sets[0], ids, weights)
            ours_out = ours_permute(*calls[0])
            cases[routing] = dict(ids=ids, calls=calls, ref=ref, ours_out=ours_out,
                                  active=int(torch.bincount(ids_cpu.reshape(-1).long(), minlength=E).gt(0).sum()))

        sweep_best, sweep_info = {}, {}
        if peer is not None:
            try:
                sweep_best, sweep_info = sweep_peer(peer, T, cases, E, budget)
            except Exception as exc:
                notes.append(f"T={T}: peer sweep failed ({type(exc).__name__}: {str(exc)[:200]})")

        for routing, case in cases.items():
            ids, calls, ref = case["ids"], case["calls"], case["ref"]
            touched = case["active"] * expert_bytes
            flops = 2.0 * T * k * 3 * I * H
            floor = max(touched / (read_gbs * 1e9) * 1e3, flops / (gemm_rate * 1e12) * 1e3)
            label = f"T={T} {routing} ({case['active']} experts, {touched / 1e9:.2f} GB)"

            impls: dict = {}
            extras: dict = {}
            if T <= DECODE_MAX_T:
                impls["dots1_ext moe_decode"] = ours_decode
                if gpu:
                    impls["dots1_ext moe_decode frag loads"] = ours_decode_frag
            impls["dots1_ext permute+grouped_gemm"] = ours_permute
            for name, fn in impls.items():
                extras[name] = {"rel_err vs fp32": f"{rel_err(fn(*calls[0]), ref):.1e}"}

            tuned_label = None
            if peer is not None:
                default_cfg = peer.vllm_default_config(T)
                configs = {"default": (default_cfg, "default config")}
                if routing in sweep_best:
                    configs["tuned"] = (sweep_best[routing][1], f"tried {sweep_info['tried']}/"
                                        f"{sweep_info['candidates']}" + (" (budget out)" if sweep_info["exhausted"] else ""))
                for which, (cfg, how) in configs.items():
                    try:
                        fn = peer_fn(peer, cfg, ids, E)
                        out = fn(*calls[0])
                        err = rel_err(out, case["ours_out"])
                        if not err <= PEER_TOL:
                            notes.append(f"{label}: peer {which} {config_str(cfg)} off ours by {err:.3g}: not timed")
                            continue
                        name = f"vllm fused_moe {which}"
                        impls[name] = fn
                        extras[name] = {"config": config_str(cfg), "rel_err vs ours": f"{err:.1e}",
                                        "rel_err vs fp32": f"{rel_err(out, ref):.1e}", "sweep": how}
                    except Exception as exc:
                        notes.append(f"{label}: peer {which} failed ({type(exc).__name__}: {str(exc)[:200]})")
                if "vllm fused_moe tuned" in impls:
                    tuned_label = "vllm fused_moe tuned"
                    cfg = configs["tuned"][0]
                    align_ms = time_fn(lambda: peer.prepare_expert_assignment(ids, cfg["BLOCK_SIZE_M"], E),
                                       warmup=3, iters=20)
                    naive = peer.uses_naive_assignment(T, k, E)
                    extras[tuned_label]["align ms (excluded)"] = (
                        f"{align_ms:.4f}" + (" (naive: no align)" if naive else " (torch stand-in)"))

            if gpu:
                graphs = {}
                for name, fn in impls.items():
                    try:
                        graphs[name] = capture_graph(fn, calls)
                    except Exception as exc:
                        torch.cuda.synchronize()
                        notes.append(f"{label}: {name} not capturable ({type(exc).__name__}: {str(exc)[:200]})")
                times = time_fns({n: g.replay for n, g in graphs.items()}, warmup=3, rounds=10 if not quick else 5,
                                 iters=3)
                times = {n: ms / len(calls) for n, ms in times.items()}
                del graphs
            else:
                times = time_fns({n: (lambda fn=fn: [fn(*a) for a in calls]) for n, fn in impls.items()},
                                 warmup=1, rounds=2, iters=2)
                times = {n: ms / len(calls) for n, ms in times.items()}
            if tuned_label in times and "vllm fused_moe default" in times:
                # What a tuned user runs: the faster of the sweep's winner and the default.
                if times["vllm fused_moe default"] < times[tuned_label]:
                    extras[tuned_label]["note"] = "default config faster than the sweep's winner"

            peer_ms = min((times[n] for n in times if n.startswith("vllm")), default=None)
            bar_ms = None
            if peer_ms is not None:
                bar_ms = min(max(peer_ms / 1.15, floor / 0.95), peer_ms)
            for name, ms in times.items():
                extra = extras.get(name, {})
                if name.startswith("dots1_ext"):
                    if bar_ms is None:
                        extra["bar"] = "n/a (no peer)"
                    else:
                        extra["bar ms"] = f"{bar_ms:.4f}"
                        extra["bar"] = "met" if ms <= bar_ms else "MISSED"
                report.add(Row("moe_peer", label, name, ms, floor, gbs=touched / ms / 1e6,
                               tflops=flops / ms / 1e9, extra=extra))
        del cases
    notes.append("bar (issue 15) = max(best peer time / 1.15, floor / 0.95), and never above the best peer "
                 "time (best peer = the faster of the tuned and the default config); the issue's targets are "
                 "T in {8, 64, 512, 4096, 16384}")
    if gpu:
        notes.append(f"timing: each impl in one CUDA graph of {', '.join(f'T={T}: {calls_per_graph(T)}' for T in Ts)} "
                     f"calls cycling over {WEIGHT_SETS} weight sets, graphs replayed round-robin, median / calls; "
                     f"peer sweep budget {budget:.0f} s per T (${SWEEP_ENV}), candidates and order from the peer's "
                     f"candidate_configs/prior_key, each timed on both routings")
    else:
        notes.append("CPU stand-in (tiny shapes, fp32, CPU perf_counter timings)")
    report.notes.extend(notes)
    del sets
    return [report]


if __name__ == "__main__":
    bench_main(run, __doc__)
