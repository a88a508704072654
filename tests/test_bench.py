"""The benchmark harness runs (CPU, quick cases) and writes what the README and results files rely on:
JSON rows with times and floors, Markdown tables, and the PNG from a MoE report."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from bench import run as bench_run
from bench.common import Report, Row, env_vars, graph_us, time_fn, time_steps, with_env, write_json


@pytest.fixture(autouse=True)
def _bench_on_cpu(monkeypatch):
    # These tests check the harness on its quick CPU cases, also on a machine with a GPU (where the
    # benchmarks would otherwise run at real shapes, with GPU timings).
    monkeypatch.setenv("DOTS1_EXT_BENCH_DEVICE", "cpu")


def test_quick_cpu_run_writes_rows_with_floors(tmp_path):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    status = bench_run.main(["--only", "gating", "dispatch", "grouped_gemm", "--quick",
                             "--json", str(out_json), "--md", str(out_md)])
    assert status == 0
    payload = json.loads(out_json.read_text())
    assert {"date", "commit", "torch", "device", "timing"} <= set(payload["env"])
    titles = list(payload["reports"])
    for prefix in ("gating after logits", "router incl. projection", "permute", "unpermute", "grouped_gemm"):
        assert any(t.startswith(prefix) for t in titles), (prefix, titles)
    for rows in payload["reports"].values():
        assert rows
        for r in rows:
            assert r["ms"] > 0 and math.isfinite(r["ms"]), r
            if r["impl"].startswith("dots1_ext"):
                assert r["floor_ms"] is not None and r["floor_ms"] >= 0, r
    md = out_md.read_text()
    assert "| case | impl | time (ms)" in md and "CPU perf_counter" in md  # CPU timings are labelled


def test_timing_helpers_on_cpu():
    assert time_fn(lambda: sum(range(100)), warmup=1, iters=3) > 0
    assert graph_us(lambda: None) is None  # GPU-only measurement
    calls = []
    assert time_steps(lambda: calls.append(sum(range(100))), steps=4, warmup=2, repeats=3) > 0
    assert len(calls) == 2 + 4 * 3  # warm-up, then `repeats` runs of `steps` calls


def test_env_vars_set_then_restore(monkeypatch):
    # The kernel switches the benchmarks set around a call (the ops read them at launch): each variable
    # put back as it was, unset again where it was unset, also when the call raises.
    monkeypatch.setenv("DOTS1_TEST_SET", "before")
    monkeypatch.delenv("DOTS1_TEST_UNSET", raising=False)
    settings = {"DOTS1_TEST_SET": "during", "DOTS1_TEST_UNSET": "during"}
    with pytest.raises(KeyError):
        with env_vars(settings):
            assert os.environ["DOTS1_TEST_SET"] == os.environ["DOTS1_TEST_UNSET"] == "during"
            raise KeyError
    assert os.environ["DOTS1_TEST_SET"] == "before" and "DOTS1_TEST_UNSET" not in os.environ
    seen = with_env(settings, lambda a, b=0: (a, b, os.environ.get("DOTS1_TEST_UNSET")))
    assert seen(1, b=2) == (1, 2, "during") and "DOTS1_TEST_UNSET" not in os.environ
    fn = lambda: None  # noqa: E731
    assert with_env({}, fn) is fn


def test_plot_writes_png_from_a_moe_report(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.plot import plot

    report = Report("MoE block (test)")
    for T, ours, peer in ((1, 0.2, 0.6), (64, 1.7, 2.1), (4096, 2.9, 3.8)):
        report.add(Row("moe", f"T={T}", "dots1_ext", ours, floor_ms=0.1))
        report.add(Row("moe", f"T={T}", "hf grouped_mm", peer, floor_ms=0.1))
    path = tmp_path / "bench.json"
    write_json(path, [report], {"device": "test", "date": "today", "commit": "abc"})
    png = tmp_path / "moe.png"
    plot(str(path), str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_moe_bench_times_the_layout_load_model_ships():
    pytest.importorskip("transformers")
    from bench.bench_moe import TINY, make_blocks

    ours, hf, _ = make_blocks(TINY, "cpu", torch.float32)
    assert ours.experts.gate_up_interleaved and ours.experts.gate_up_epilogue == "swiglu_interleaved"
    x = torch.randn(5, TINY["hidden"])
    with torch.no_grad():
        assert (ours(x) - hf(x[None])[0]).abs().max() < 1e-4  # the same block, only repacked


def test_long_prompt_bench_rows_on_cpu():
    pytest.importorskip("transformers")
    from bench import bench_long_prompt

    (report,) = bench_long_prompt.run(quick=True)
    impls = {(r.case, r.impl) for r in report.rows}
    cases = {case for case, _ in impls}
    assert any(c.startswith("left-padded B=4") for c in cases) and any(c.startswith("B=1 T=") for c in cases)
    for case in cases:  # ours and the transformers peer on every case, with the FLOPs floor
        assert {(case, "dots1_ext"), (case, "hf sdpa + grouped_mm")} <= impls, case
    assert all(r.ms > 0 and r.floor_ms > 0 for r in report.rows)


def test_moe_peer_bench_rows_on_cpu():
    from bench import bench_moe_peer

    (report,) = bench_moe_peer.run(quick=True)
    impls = {(r.case.split(" (")[0], r.impl) for r in report.rows}
    for T in (8, 64):
        for routing in ("balanced", "zipf"):
            assert (f"T={T} {routing}", "dots1_ext permute+grouped_gemm") in impls
    for T in (8, 64):  # the decode ops up to 64 tokens (one launch each)
        for routing in ("balanced", "zipf"):
            assert (f"T={T} {routing}", "dots1_ext moe_decode") in impls
    assert all(r.ms > 0 and r.floor_ms > 0 and float(r.extra["rel_err vs fp32"]) < 1e-4 for r in report.rows)
    assert any("peer skipped on CPU" in n for n in report.notes)


def test_moe_peer_is_found_in_the_peers_dir_or_reported_missing(tmp_path, monkeypatch):
    import sys

    from bench import bench_moe_peer

    monkeypatch.delitem(sys.modules, bench_moe_peer.PEER_MODULE, raising=False)
    monkeypatch.setattr(bench_moe_peer, "ROOT", tmp_path)  # no .peers/ there
    # Nor on sys.path (a machine that has the peer importable, e.g. through PYTHONPATH).
    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if not (Path(p or ".") / f"{bench_moe_peer.PEER_MODULE}.py").is_file()])
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(bench_moe_peer.PEERS_DIR_ENV, str(empty))
    peer, why = bench_moe_peer.find_peer()
    assert peer is None and "not found" in why and ".peers" in why and bench_moe_peer.PEERS_DIR_ENV in why

    (tmp_path / ".peers").mkdir()
    (tmp_path / ".peers" / f"{bench_moe_peer.PEER_MODULE}.py").write_text("WHERE = 'dot peers'\n")
    peer, where = bench_moe_peer.find_peer()
    assert peer.WHERE == "dot peers" and where.endswith(f".peers/{bench_moe_peer.PEER_MODULE}.py")

    (empty / f"{bench_moe_peer.PEER_MODULE}.py").write_text("WHERE = 'env dir'\n")
    peer, _ = bench_moe_peer.find_peer()  # the env var's folder comes first
    assert peer.WHERE == "env dir"
    monkeypatch.delitem(sys.modules, bench_moe_peer.PEER_MODULE, raising=False)


def test_int4_model_bench_rows_on_cpu():
    """The whole-model int4 bench (issue 14) on the tiny stand-in: build rows with the weight bytes
    (int4 experts smaller than bf16), decode rows with a floor and tokens/s, prefill rows."""
    from bench import bench_int4_model

    build, steps = bench_int4_model.run(quick=True)
    by_model = {r.case: r for r in build.rows}
    assert set(by_model) == {"4 layers, bf16 experts", "4 layers, int4 experts"}
    assert by_model["4 layers, int4 experts"].extra["weights_GB"] < by_model["4 layers, bf16 experts"].extra["weights_GB"]
    decode = [r for r in steps.rows if "decode" in r.case]
    prefill = [r for r in steps.rows if "prefill" in r.case]
    assert len(decode) == 2 * 2 and len(prefill) == 2
    for r in decode:
        assert r.ms > 0 and r.floor_ms and r.floor_ms > 0 and r.extra["tokens_per_s"] > 0, r
    for r in prefill:
        assert r.ms > 0 and r.extra["tokens_per_s"] > 0, r


def test_int4_step_bytes_count_the_touched_experts_at_their_stored_size():
    from bench.bench_int4_model import step_weight_bytes
    from bench.bench_model import decode_weight_bytes
    from dots1_ext.config import dots1_real_config

    cfg = dots1_real_config(62)
    bf16 = step_weight_bytes(cfg, 1, 2, "bf16")
    int4 = step_weight_bytes(cfg, 1, 2, "int4")
    assert bf16 == decode_weight_bytes(cfg, 1, 2)
    # issue 14: about 17.6 GB per token at B=1 for the 62-layer int4 model (weights only)
    assert 17.0e9 < int4 < 18.0e9, int4
    routed = 61 * 6 * 3 * 4096 * 1408  # weights of the experts one token touches
    assert abs((bf16 - int4) - routed * (2 - (0.5 + 3 / 128))) < 1e3


def test_pdl_overlap_timeline_groups_kernels_by_short_name():
    # bench/probes/pdl_overlap.py's step timeline (GPU-only probe; its parsing checked here on made-up
    # CUPTI records): names lose return type, namespaces, template arguments and parameters; per name,
    # launches per step, median span, median gap from the previous kernel's end (negative: overlap).
    from bench.probes.pdl_overlap import kernel_timeline, short_kernel_name

    gate_up = ("void dots1::(anonymous namespace)::moe_gate_up_kernel<__nv_bfloat16, (dots1::MoeGateUpLayout)1, 1, "
               "dots1::(anonymous namespace)::Int4Experts<__nv_bfloat16>, 1, 4>(dots1::(anonymous namespace)::"
               "GateUpParams<__nv_bfloat16, dots1::(anonymous namespace)::Int4Experts<__nv_bfloat16> >)")
    router = "void dots1::(anonymous namespace)::router_gating_grid_kernel<4, false, __nv_bfloat16>(float const*, int)"
    assert short_kernel_name(gate_up) == "moe_gate_up_kernel"
    assert short_kernel_name(router) == "router_gating_grid_kernel"
    assert short_kernel_name("at::native::vectorized_elementwise_kernel") == "vectorized_elementwise_kernel"
    # Two replays of router -> gate_up: gate_up starts 2 us before the router ends (overlap).
    events = [(router, 0.0, 10.0), (gate_up, 8.0, 40.0), (router, 100.0, 112.0), (gate_up, 110.0, 146.0)]
    rows = {r[0]: r[1:] for r in kernel_timeline(events, steps=2)}
    assert rows["moe_gate_up_kernel"] == (1.0, 34.0, -2.0, 34.0)
    per_step, span, gap, total = rows["router_gating_grid_kernel"]
    assert (per_step, span, gap, total) == (1.0, 11.0, 60.0, 11.0)  # one gap: 100 - 40
    assert [r[0] for r in kernel_timeline(events, steps=2)] == ["moe_gate_up_kernel", "router_gating_grid_kernel"]


def test_pdl_overlap_attention_block_measures_from_the_qkv_gemm():
    # The attention block of pdl_overlap.py: from the qkv GEMM's end (a skinny GEMM one or two launches
    # before the attention kernel), the attention's start and end and the combine's end.
    from bench.probes.pdl_overlap import attention_block

    qkv, rope = "void dots1::skinny_gemm_wide_kernel<>()", "void dots1::qk_norm_rope_kernel<>()"
    att, comb = "void dots1::decode_attention_kernel<>()", "void dots1::decode_attention_combine_kernel<>()"
    o_proj = "void dots1::skinny_gemm_wide_kernel<>()"
    events = [(qkv, 0.0, 20.0), (rope, 15.0, 22.0), (att, 18.0, 31.0), (comb, 21.0, 33.0), (o_proj, 30.0, 40.0),
              (qkv, 100.0, 120.0), (att, 119.0, 130.0), (o_proj, 129.0, 140.0)]  # fused: no rope, no combine
    out = attention_block(events)
    assert out == {"attention start": [-2.0, -1.0], "attention end": [11.0, 10.0], "combine end": [13.0, 10.0],
                   "attention span": [13.0, 11.0]}
    assert attention_block([(rope, 0.0, 1.0), (att, 2.0, 3.0)])["attention span"] == []  # no qkv GEMM before


def test_moe_phase_stamps_edges_per_slot_from_the_reference():
    # bench/probes/moe_phase_stamps.py (GPU-only probe of a stamps build; its parsing checked here on
    # made-up stamps): per slot, the first / median / last CTA in µs from the reference, over the CTAs
    # given that wrote the slot (0: not written), and how many did.
    import numpy as np

    from bench.probes.moe_phase_stamps import BLOCKS, SLOTS, edges

    st = np.zeros((2, BLOCKS, SLOTS), dtype=np.uint64)
    ref = 1_000_000
    for b, (resident, done) in enumerate([(0, 9_000), (1_000, 12_000), (2_000, 30_000)]):
        st[0, b, 0] = ref + resident
        st[0, b, 15] = ref + done
    st[1, 0, 0] = ref + 31_000
    out = edges(st, 0, {0: "resident", 5: "routed tile 1 done", 15: "exit"}, ref, [0, 1, 2])
    assert out == {"resident": (0.0, 1.0, 2.0, 3), "exit": (9.0, 12.0, 30.0, 3)}  # slot 5: nobody wrote it
    assert edges(st, 0, {15: "exit"}, ref, [0, 1])["exit"] == (9.0, 10.5, 12.0, 2)
    assert edges(st, 1, {0: "resident"}, ref, range(BLOCKS))["resident"] == (31.0, 31.0, 31.0, 1)


def test_moe_phase_stamps_reader_needs_a_stamps_build():
    # A regular build exports no stamps reader: the probe says how to make a stamps build instead of
    # reading nothing. A stamps build (CUDA) reads [2][512][16] stamps, all zero right after a clear.
    import ctypes

    ext = pytest.importorskip("dots1_ext._C")
    from bench.probes.moe_phase_stamps import BLOCKS, SLOTS, stamps_reader

    if not hasattr(ctypes.CDLL(ext.__file__), "dots1_phase_stamps_copy"):
        with pytest.raises(SystemExit, match="DOTS1_EXT_PHASE_STAMPS=1"):
            stamps_reader()
        return
    read = stamps_reader()
    read(True)
    st = read(False)
    assert st.shape == (2, BLOCKS, SLOTS) and not st.any()


def test_moe_phase_stamps_router_reader_is_optional():
    # The router's stamps (csrc/gating) come with the same build switch; without them the probe prints
    # the MoE kernels' alone. In a stamps build (CUDA) the reader gives [1][512][8] stamps, zero after a clear.
    import ctypes

    ext = pytest.importorskip("dots1_ext._C")
    from bench.probes.moe_phase_stamps import ROUTER_BLOCKS, ROUTER_SLOTS, router_stamps_reader

    read = router_stamps_reader()
    if not hasattr(ctypes.CDLL(ext.__file__), "dots1_router_stamps_copy"):
        assert read is None
        return
    read(True)
    st = read(False)
    assert st.shape == (1, ROUTER_BLOCKS, ROUTER_SLOTS) and not st.any()


def test_probe_layers_word():
    # pdl_overlap.py / moe_phase_stamps.py take the model depth as layers=N, out of the switches.
    from bench.common import parse_knobs, pop_layers

    knobs = parse_knobs(["bf16", "layers=62", "DOTS1_EXT_ROUTER_RANK=0,1"])
    assert pop_layers(knobs) == 62 and knobs == {"DOTS1_EXT_ROUTER_RANK": ["0", "1"]}
    assert pop_layers(parse_knobs(["all"])) == 8
    for bad in ("layers=0", "layers=x", "layers=8,62", "layers=-3"):
        with pytest.raises(SystemExit, match="layers="):
            pop_layers(parse_knobs([bad]))


def test_commit_id_marks_a_tree_that_differs_from_head(tmp_path):
    # Results record the commit they measured; a run of changed files (or of a copy whose .git is older
    # than its files) says so instead of passing for HEAD.
    import shutil
    import subprocess

    from bench.common import commit_id

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "a.txt").write_text("one\n")
    subprocess.run(git + ["add", "a.txt"], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "one"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert commit_id(tmp_path) == head
    (tmp_path / "untracked.txt").write_text("not counted\n")
    assert commit_id(tmp_path) == head
    (tmp_path / "a.txt").write_text("two\n")
    assert commit_id(tmp_path) == f"{head}+1 changed"
    assert commit_id(tmp_path / "no-such-dir") == ""


def test_probe_switches_parse_and_combine_in_order():
    # The GPU probes' NAME=v1,v2 words (bench/probes/*.py): every combination in order, labelled
    # without the DOTS1_EXT_ prefix; no switches is one "defaults" setting.
    from bench.common import knob_settings, parse_knobs

    knobs = parse_knobs(["1,4", "routed", "DOTS1_EXT_A=0,1", "B=x"], {"DOTS1_EXT_A": ["9"], "C": ["c"]})
    assert knobs == {"DOTS1_EXT_A": ["0", "1"], "C": ["c"], "B": ["x"]}
    assert list(knob_settings(knobs)) == [({"DOTS1_EXT_A": "0", "C": "c", "B": "x"}, "A=0 C=c B=x"),
                                          ({"DOTS1_EXT_A": "1", "C": "c", "B": "x"}, "A=1 C=c B=x")]
    assert list(knob_settings(parse_knobs(["bf16"]))) == [({}, "defaults")]
