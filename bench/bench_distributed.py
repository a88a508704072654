"""Expert-parallel Dots1 over several GPUs (issue 7): the full 62-layer real-shape model, random weights.

    torchrun --nproc-per-node 4 -m bench.bench_distributed            # 4 (or 8) H200s, 62 layers
    torchrun --nproc-per-node 4 -m bench.bench_distributed --quick    # 4 layers, fewer shapes
    torchrun --nproc-per-node 2 -m bench.bench_distributed --quick    # CPU + gloo: a tiny smoke run

Each rank builds only its shard (distributed.build_random_model_distributed: the full model never
exists). Figures are the slowest rank's median (CUDA events; collectives included). Reports:
1. one MoE layer at T tokens: dispatch "all_to_all" vs "all_reduce" (this sets
   distributed.A2A_MIN_TOKENS_PER_RANK), next to the same layer with all 128 experts on one GPU and to
   one replicated attention layer at the same T (the replicate-vs-split-heads decision: if attention
   dominates a rank's prefill time, split its heads). Floor: this rank's share of the FLOPs (routed
   rows k*T/W, shared experts T/W) or of the bytes (its experts that receive a token, expected value
   E/W * (1 - (1 - k/E)^T), plus the shared experts), whichever is larger.
2. the whole model: prefill of one 2048-token sequence, and one decode step at context 2048 with batch
   1 and 32. Floor: per-rank FLOPs (replicated layers + its share of the routed rows) for prefill; per-
   rank bytes (replicated weights, its touched experts, the KV cache read) for decode.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from bench.common import Report, Row, bytes_floor_ms, environment, flops_floor_ms, header, time_fn, write_json
from dots1_ext import distributed
from dots1_ext.config import Dots1Config, dots1_real_config
from dots1_ext.loader import model_bytes
from dots1_ext.model import build_random_model
from dots1_ext.modules import Dots1MoE

BENCH = "distributed"


def _tiny_config(layers: int) -> Dots1Config:
    return Dots1Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4,
        first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5, max_position_embeddings=4096,
        rms_norm_eps=1e-5, sliding_window=None)


def _slowest(ms: float, info: distributed.DistInfo) -> float:
    """The slowest rank's time: the step is as fast as its last rank."""
    if info.world_size == 1:
        return ms
    t = torch.tensor([ms], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _time(fn, info, quick) -> float:
    if info.world_size > 1:
        dist.barrier()
    return _slowest(time_fn(fn, warmup=2 if quick else 5, iters=5 if quick else 20), info)


def _touched(experts: int, k: int, total: int, tokens: int) -> float:
    """Expected number of ``experts`` (out of ``total``) that receive at least one of tokens*k rows."""
    return experts * (1.0 - (1.0 - k / total) ** tokens)


def moe_layer_report(model, config, info, dtype, token_counts, quick) -> Report:
    W, E, k, H, I = info.world_size, config.n_routed_experts, config.num_experts_per_tok, config.hidden_size, config.moe_intermediate_size
    layer = model.model.layers[config.first_k_dense_replace]
    moe, attn = layer.mlp, layer.self_attn
    expert_bytes = 3 * H * I * dtype.itemsize
    shared_bytes = 3 * H * I * (config.n_shared_experts or 0) * dtype.itemsize
    # The peer: the same layer with every expert on this one GPU (4.4 GB at real shape).
    one_gpu = Dots1MoE(config, device=info.device, dtype=dtype)
    with torch.no_grad():
        for p in one_gpu.parameters():
            p.normal_(0.0, 0.02)
        one_gpu.gate.weight.normal_(0.0, H ** -0.5)
    report = Report(f"MoE layer over {W} rank(s), E={E} k={k} H={H} I={I}, {dtype} ({info.device.type})")
    for T in token_counts:
        gen = torch.Generator(device=info.device).manual_seed(T)  # the same replicated input on every rank
        x = torch.randn(T, H, generator=gen, device=info.device).to(dtype)
        residual = torch.randn(T, H, generator=gen, device=info.device).to(dtype)
        flops = 2 * 3 * H * I * (T * k + T * (config.n_shared_experts or 0)) / W
        nbytes = _touched(E // W, k, E, T) * expert_bytes + shared_bytes
        floor = max(flops_floor_ms(flops), bytes_floor_ms(nbytes))
        case = f"T={T}"
        with torch.no_grad():
            if W > 1:
                for mode in ("all_to_all", "all_reduce"):
                    moe.dispatch = mode
                    ms = _time(lambda: moe(x, residual), info, quick)
                    report.add(Row(BENCH, case, f"dots1_ext EP {mode}", ms, floor, tflops=flops / ms / 1e9,
                                   extra={"world_size": W}))
                moe.dispatch = "auto"
            ms = _time(lambda: one_gpu(x, residual), info, quick)
            report.add(Row(BENCH, case, "one GPU, all experts", ms, max(flops_floor_ms(flops * W), bytes_floor_ms(
                _touched(E, k, E, T) * expert_bytes + shared_bytes))))
            if model.model.cache_shape is None or model.model.cache_shape[1] < T:
                model.setup_cache(1, T)
            slots = torch.arange(T, device=info.device)
            step = model.model.step_inputs(slots, T)
            ms = _time(lambda: attn(x, step), info, quick)
            report.add(Row(BENCH, case, "attention layer (replicated, per rank)", ms, extra={"world_size": W}))
    del one_gpu
    return report


def model_report(model, config, info, dtype, prefill_len, batches, quick) -> Report:
    W, E, k = info.world_size, config.n_routed_experts, config.num_experts_per_tok
    H, I, V = config.hidden_size, config.moe_intermediate_size, config.vocab_size
    moe_layers, L = config.num_moe_layers, config.num_hidden_layers
    expert_bytes = 3 * H * I * dtype.itemsize
    local_expert_bytes = moe_layers * (E // W) * expert_bytes
    embed_bytes = V * H * dtype.itemsize
    replicated_bytes = model_bytes(model) - local_expert_bytes - embed_bytes  # all read once per step
    replicated_params = replicated_bytes / dtype.itemsize
    report = Report(f"Dots1 {L} layers over {W} rank(s): {model_bytes(model) / 2**30:.1f} GiB of weights per rank, "
                    f"{dtype} ({info.device.type})")
    gen = torch.Generator(device=info.device).manual_seed(0)

    # Prefill: one sequence.
    T = prefill_len
    ids = torch.randint(3, V, (1, T), generator=gen, device=info.device)
    model.setup_cache(1, T + 1)
    attn_flops = L * 2 * T * T * H  # causal QK^T and PV: 4*T^2*H halved
    flops = 2 * replicated_params * T + attn_flops + moe_layers * 2 * 3 * H * I * T * k / W
    ms = _time(lambda: model.prefill(ids, last_only=True), info, quick)
    report.add(Row(BENCH, f"prefill B=1 L={T}", "dots1_ext EP", ms, flops_floor_ms(flops), tflops=flops / ms / 1e9,
                   extra={"world_size": W, "tokens_per_s": T / ms * 1e3}))

    # Decode: one step at context `prefill_len`.
    for B in batches:
        tok = torch.randint(3, V, (B,), generator=gen, device=info.device)
        model.setup_cache(B, T + 1)
        model.model.mark_cache_written(T)  # the timed step attends over whatever the cache holds
        kv_bytes = L * B * T * 2 * config.num_key_value_heads * config.head_dim * dtype.itemsize
        nbytes = replicated_bytes + moe_layers * _touched(E // W, k, E, B) * expert_bytes + kv_bytes
        ms = _time(lambda: model.decode(tok, T), info, quick)
        report.add(Row(BENCH, f"decode B={B} ctx={T}", "dots1_ext EP", ms, bytes_floor_ms(nbytes),
                       gbs=nbytes / ms / 1e6, extra={"world_size": W, "tokens_per_s": B / ms * 1e3}))
    return report


def run(quick: bool = False, layers: int | None = None, info: distributed.DistInfo | None = None) -> list[Report]:
    info = info or distributed.init_from_env()
    gpu = info.device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    if gpu:
        config = dots1_real_config(layers or (4 if quick else 62))
        token_counts = (1, 64, 2048) if quick else (1, 8, 64, 256, 1024, 4096, 16384)
        prefill_len, batches = (512 if quick else 2048), ((1,) if quick else (1, 32))
    else:  # CPU: a tiny smoke run of the same code
        config = _tiny_config(layers or 3)
        token_counts, prefill_len, batches = (1, 16, 128), 64, (1, 4)
    if info.world_size > 1:
        model = distributed.build_random_model_distributed(config, info, dtype)
    else:
        model = build_random_model(config, device=info.device, dtype=dtype)
    reports = [moe_layer_report(model, config, info, dtype, token_counts, quick),
               model_report(model, config, info, dtype, prefill_len, batches, quick)]
    return reports


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--layers", type=int, help="layers of the model (default 62 on GPU, 4 with --quick)")
    p.add_argument("--json", help="write the reports here (rank 0)")
    args = p.parse_args(argv)
    info = distributed.init_from_env()
    try:
        reports = run(args.quick, args.layers, info)
        if info.is_main:
            env = environment() | {"world_size": info.world_size}
            print(header(env))
            for r in reports:
                print()
                print(r.table())
            if args.json:
                write_json(args.json, reports, env)
    finally:
        distributed.shutdown(info)  # destroys the group it created, and checks its threads are gone
    return 0


if __name__ == "__main__":
    sys.exit(main())
