"""Dots1 on several GPUs: expert parallelism over torch.distributed (NCCL on GPUs, gloo on CPU).

Layout ("expert parallelism over replicated activations"), W ranks, E routed experts:
- every rank holds the embeddings, attention (and its KV cache), the dense MLP, the routers, the shared
  experts, the final norm and lm_head, and runs attention on all T tokens of a step;
- rank r holds routed experts [r*E/W, (r+1)*E/W) of every MoE layer. Those are 95% of the weights:
  dots.llm1 in bf16 is 270 GB of routed experts and 15 GB of everything else, so on 4 H200s a rank
  holds 67 + 15 GB, on 8 34 + 15 GB.
Why attention is replicated rather than split by heads: it fits (above), it adds no collective per
layer, and it keeps the KV cache and the decode path of the one-GPU model unchanged. Its cost is
prefill compute: every rank repeats the attention of the step. Splitting heads (q/k/v column-wise,
o_proj row-wise, plus one all_reduce per layer) is the next step if bench/bench_distributed.py shows
attention dominating a rank's prefill time; on two H200s one replicated attention layer took 0.63 ms
at T = 2048 against 1.23 ms for the MoE layer (bench/results/2026-11-30-h200-e83e44e-phase-mixing-ep-two-gpus).

An MoE layer runs one of two dispatches (``ExpertParallelMoE.dispatch``; "auto" picks by step size and
world size, see A2A_MIN_TOKENS_PER_RANK below):
- "all_to_all" (prefill): rank r takes the r-th contiguous shard of the T tokens, routes it and permutes
  its rows by expert (ops.permute); as ranks own contiguous expert ranges, the rows are then grouped by
  destination rank. The per-(destination, local expert) row counts are exchanged first with
  all_to_all_single and brought to the host (all_to_all_single with variable splits needs its split
  sizes on the host: one synchronisation per layer, so this path cannot be captured in a CUDA graph).
  The rows follow with all_to_all_single; the receiver regroups them from (source, expert) to (expert,
  source) order with ops.permute, runs its experts' grouped GEMMs, restores the received order and
  sends the results back with all_to_all_single. The sender combines them with ops.unpermute (routing
  weights, shared experts and residual fused, as on one GPU), and all_gather rebuilds the full [T, H]
  on every rank for the next attention.
- "all_reduce" (decode, small T): every rank routes all T tokens (identically), computes only the rows
  of its own experts (grouped GEMM over its slice of the expert offsets: other rows come out zero) and a
  1/W slice of the shared experts' intermediate dimension (tensor-parallel over the replicated
  weights), combines, and one all_reduce sums the partial outputs (rank 0 adds the residual). No host
  synchronisation and fixed shapes: CUDA-graph capturable.
Both give every rank the same routed-expert GEMM work (the rows routed to its experts); "all_to_all"
also splits the router, shared experts and permute/combine W ways and needs 4 collectives + 1 host sync
per layer, "all_reduce" needs 1 collective and moves less data, so it wins when T is small (and with
two ranks at every T measured, up to 2048 tokens per layer).

The same code runs on one process: ``init_from_env`` is a no-op without torchrun's WORLD_SIZE, and
``shard_model_`` leaves a model alone when the world size is 1.

Launch: ``torchrun --nproc-per-node N -m dots1_ext [cli args]``, e.g.
``torchrun --nproc-per-node 4 -m dots1_ext --real-shape --layers 62``: ``dots1_ext.cli.main`` sees
torchrun's WORLD_SIZE and builds the model with the functions below. This module is a library (it has
no entry point and does not import the CLI).
"""

from __future__ import annotations

import datetime
import gc
import os
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if dist.is_available():
    # Imported before any process group exists, on purpose. torch.distributed.nn.functional binds
    # ``group=group.WORLD`` as default arguments when it is first imported; imported after
    # init_process_group (torch._dynamo imports it, e.g. on the first nn.init of a meta-device
    # nn.Embedding, which building a model does), ten of its functions keep the default process group
    # alive for the life of the interpreter. destroy_process_group then frees nothing: gloo's threads
    # run on until the group is torn down at interpreter exit, racing the other ranks' exits, where now
    # and then a rank aborted ("terminate called without an active exception", exit -6).
    # Imported first, those defaults are None. ``shutdown`` checks that the group is really gone.
    import torch.distributed.nn  # noqa: F401

from dots1_ext import modules
from dots1_ext.config import Dots1Config
from dots1_ext.loader import check_device_memory, load_model, model_bytes, read_config
from dots1_ext.model import Dots1ForCausalLM, init_random_weights_, is_integer
from dots1_ext.modules import Dots1MoE

DISPATCHES = ("auto", "all_to_all", "all_reduce")
# "auto" uses all_to_all from A2A_MIN_TOKENS_PER_RANK tokens per rank on, in worlds of at least
# A2A_MIN_WORLD_SIZE ranks (bench/bench_distributed.py's "moe layer" rows time both dispatches at each T).
# Two ranks always all-reduce: on two H200s (bench/results/2026-11-30-h200-e83e44e-phase-mixing-ep-two-gpus)
# all_reduce was faster at every T tried (one real-shape MoE layer, T = 1 / 64 / 2048: 0.58 / 0.80 / 1.23
# ms against 0.93 / 1.68 / 1.94), as the bytes say: all_to_all sends one row per (token, remote expert),
# about 1.5 T rows per rank at k = 6 and W = 2, and gets as many back, then all-gathers T / 2 rows,
# while the ring all-reduce sends T rows per rank. Four or more ranks: not measured (no such machine).
A2A_MIN_TOKENS_PER_RANK = 32
A2A_MIN_WORLD_SIZE = 4


# -- process group -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank / world size in ``group`` (None: the default group), its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: object | None = None
    owns_group: bool = False  # init_from_env created the process group (and `shutdown` destroys it)

    def __post_init__(self):
        _check_rank(self.rank, self.world_size)
        if not is_integer(self.local_rank) or self.local_rank < 0:
            raise ValueError(f"local_rank must be an integer >= 0, got {self.local_rank!r}")
        if not isinstance(self.device, torch.device):
            raise TypeError(f"device must be a torch.device, got {type(self.device).__name__}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _check_rank(rank, world_size) -> None:
    if not is_integer(world_size) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not is_integer(rank):
        raise ValueError(f"rank must be an integer (not bool), got {rank!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")


def _check_dispatch(dispatch) -> None:
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer >= {minimum}")
    return value


def _default_device(local_rank: int, device: str | torch.device | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {str(device)!r}")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        # Checked here: the device is only touched later, after the process group is joined.
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} requested but no CUDA device is available")
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} (LOCAL_RANK {local_rank}) does not exist: "
                             f"{torch.cuda.device_count()} CUDA device(s) visible")
    return device


def init_from_env(device: str | torch.device | None = None, backend: str | None = None,
                  timeout: datetime.timedelta | None = None) -> DistInfo:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without WORLD_SIZE > 1 it is a no-op (rank 0 of 1). ``device``: "cuda" (each rank takes
    cuda:LOCAL_RANK; the default when CUDA is present) or "cpu". ``backend``: default NCCL on CUDA,
    gloo on CPU. ``timeout``: of the collectives (default torch's). An already initialised default
    group is reused. Malformed LOCAL_RANK / WORLD_SIZE, or an unusable ``device``, raise ValueError
    naming them."""
    local_rank = _env_int("LOCAL_RANK", 0, 0)
    if dist.is_available() and dist.is_initialized():
        dev = _default_device(local_rank, device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    world_size = _env_int("WORLD_SIZE", 1, 1)
    dev = _default_device(local_rank if world_size > 1 else 0, device)
    if world_size <= 1:
        return DistInfo(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    # device_id binds the NCCL communicator to this rank's GPU up front (and silences the guessing).
    dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=True)


def shutdown(info: DistInfo, model=None) -> None:
    """Destroys the process group if ``init_from_env`` created it, and checks that it is gone (its
    transport threads joined) rather than left for the interpreter's exit to tear down. ``model`` (a
    Dots1ForCausalLM, or anything with ``release_graphs``): its captured decode graphs are destroyed
    first, because NCCL's destroy_process_group never returns while a graph that captured collectives
    lives (pytorch/pytorch#115388; seen with two ranks on two H200s)."""
    if info.owns_group and dist.is_initialized():
        if model is not None:
            model.release_graphs()
        # Every rank reaches here before any tears its transport down: none has a collective in flight.
        if dist.get_world_size() > 1:
            dist.barrier()
        group = weakref.ref(dist.group.WORLD)
        dist.destroy_process_group()
        if group() is not None:
            gc.collect()
        if group() is not None:
            warnings.warn(
                "dots1_ext.distributed.shutdown: the default process group is still referenced after "
                "destroy_process_group, so its transport threads live on until interpreter exit, where "
                "tearing them down can abort the process. Was torch.distributed.nn imported after "
                "init_process_group? (see the top of dots1_ext/distributed.py)", RuntimeWarning, stacklevel=2)


def barrier(info: DistInfo) -> None:
    """Waits for every rank of ``info``'s group (a no-op in a world of one)."""
    if info.world_size > 1:
        dist.barrier(group=info.group)


def current_info(device: str | torch.device | None = None) -> DistInfo:
    """DistInfo of the initialised default group (rank 0 of 1 when there is none)."""
    return init_from_env(device) if dist.is_available() and dist.is_initialized() else DistInfo(
        device=_default_device(0, device))


def expert_range(num_experts: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the routed experts that ``rank`` owns: contiguous, E/W each. ``num_experts``
    must be divisible by ``world_size`` (so W <= E): the all_to_all dispatch sends expert e's rows to
    rank e // (E/W) and views the expert offsets as [W, E/W]. Integers only (not bool)."""
    if not is_integer(num_experts) or num_experts < 1:
        raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
    _check_rank(rank, world_size)
    if num_experts % world_size:
        raise ValueError(f"expert parallelism needs n_routed_experts ({num_experts}) divisible by the "
                         f"world size ({world_size})")
    per_rank = num_experts // world_size
    return rank * per_rank, (rank + 1) * per_rank


# -- the expert-parallel MoE block ---------------------------------------------------------------
def _check_shardable(experts, name: str) -> None:
    if isinstance(experts, modules.Dots1Int4Experts):
        # Its weights are Int4Tensor modules, and ExpertParallelMoE runs the bf16 grouped GEMMs only.
        raise ValueError(f"{name}: expert parallelism does not support int4 routed experts yet; shard the "
                         "bf16 model (the CLI refuses --experts int4 with several ranks for the same reason)")
    if not all(isinstance(getattr(experts, n, None), torch.Tensor) for n in ("gate_up_proj", "down_proj")):
        raise TypeError(f"{name} must be a routed-experts module with gate_up_proj and down_proj tensors "
                        f"(Dots1Experts), got {type(experts).__name__}")


class LocalExperts(modules.GateUpLayout, nn.Module):
    """This rank's slice of ``mlp.experts``: same parameter names, first dimension E/W, experts
    [start, end) of the checkpoint, the same gate_up_proj layout. Built from the full experts module
    (meta: nothing allocated; materialised: this rank's experts are copied out), or adopts the tensors
    of one that already holds just [start, end) (``load_model(..., experts=(start, end))``)."""

    def __init__(self, experts: nn.Module, start: int, end: int, num_experts: int):
        _check_shardable(experts, "experts")
        if not is_integer(num_experts) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
        if not (is_integer(start) and is_integer(end) and 0 <= start < end <= num_experts):
            raise ValueError(f"experts [start, end) = [{start!r}, {end!r}) must satisfy 0 <= start < end <= "
                             f"num_experts={num_experts}")
        held = getattr(experts, "expert_range", None)
        if held is not None and tuple(held) != (start, end):
            raise ValueError(f"the experts module holds experts [{held[0]}, {held[1]}), not this rank's "
                             f"[{start}, {end})")
        rows = end - start if held is not None else num_experts
        for name in ("gate_up_proj", "down_proj"):
            if getattr(experts, name).shape[0] != rows:
                raise ValueError(f"experts.{name} has {getattr(experts, name).shape[0]} experts, expected {rows} "
                                 f"({'its range' if held is not None else 'num_experts'})")
        super().__init__()
        self._init_gate_up_layout()
        self.gate_up_interleaved = getattr(experts, "gate_up_interleaved", False)
        self.start, self.end, self.num_experts = start, end, num_experts
        self.expert_range = (start, end)
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            if held is not None:  # already this rank's experts: adopted as they are
                setattr(self, name, full)
                continue
            if full.is_meta:
                local = torch.empty((end - start,) + tuple(full.shape[1:]), dtype=full.dtype, device="meta")
            else:  # a copy, so the full tensor is freed with the module it came from
                local = full.detach()[start:end].clone()
            setattr(self, name, nn.Parameter(local, requires_grad=full.requires_grad))


class ExpertParallelMoE(nn.Module):
    """Drop-in for Dots1MoE holding only this rank's routed experts (``mlp.experts`` keeps its keys,
    with E/W experts); router and shared experts replicated. ``forward(x [T, H], residual)`` takes and
    returns the full, replicated [T, H], like Dots1MoE; see the module docstring for the dispatch."""

    def __init__(self, moe: Dots1MoE, rank: int, world_size: int, group=None, dispatch: str = "auto"):
        super().__init__()
        _check_dispatch(dispatch)
        self.num_experts = moe.num_experts
        self.rank, self.world_size, self.group, self.dispatch = rank, world_size, group, dispatch
        start, end = expert_range(moe.num_experts, rank, world_size)
        self.gate = moe.gate
        self.experts = LocalExperts(moe.experts, start, end, moe.num_experts)
        self.shared_experts = moe.shared_experts

    def extra_repr(self) -> str:
        return (f"experts [{self.experts.start}, {self.experts.end}) of {self.num_experts}, rank {self.rank} "
                f"of {self.world_size}, dispatch={self.dispatch!r}")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        mode = self.dispatch
        if mode == "auto":
            large = x.shape[0] >= A2A_MIN_TOKENS_PER_RANK * self.world_size
            mode = "all_to_all" if large and self.world_size >= A2A_MIN_WORLD_SIZE else "all_reduce"
        if mode == "all_to_all":
            return self._forward_all_to_all(x, residual)
        return self._forward_all_reduce(x, residual)

    def _forward_all_to_all(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        ops = modules.ops  # read per call: model.reference_ops() swaps it
        T, H = x.shape
        W, E_local = self.world_size, self.experts.end - self.experts.start
        chunk = -(-T // W)  # tokens per rank; the last ranks may get fewer, or none
        lo, hi = min(T, self.rank * chunk), min(T, (self.rank + 1) * chunk)
        xs = x[lo:hi]  # [Ts, H] this rank's tokens
        weights, ids = self.gate(xs)  # fp32 [Ts, k], int32 [Ts, k]
        permuted, offsets, row_map = ops.permute(xs, ids, self.num_experts)  # [Ts*k, H], [E+1], [Ts*k]
        # Rows per (destination rank, its local expert): destination d owns experts [d*El, (d+1)*El).
        send_counts = offsets.diff().view(W, E_local).to(torch.int64)
        recv_counts = torch.empty_like(send_counts)  # [W sources, El]
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits, recv_splits = send_counts.sum(1), recv_counts.sum(1)
        host = torch.cat([send_splits, recv_splits]).tolist()  # the one host synchronisation
        send_splits, recv_splits = host[:W], host[W:]
        received = x.new_empty(sum(recv_splits), H)
        dist.all_to_all_single(received, permuted, recv_splits, send_splits, group=self.group)

        # Received rows are in (source, expert) order; regroup by expert for the grouped GEMMs.
        local_ids = torch.arange(E_local, dtype=torch.int32, device=x.device).repeat(W)
        local_ids = local_ids.repeat_interleave(recv_counts.flatten(), output_size=received.shape[0])
        grouped, local_offsets, local_row_map = ops.permute(received, local_ids[:, None], E_local)
        act = ops.grouped_gemm(grouped, self.experts.gate_up_proj, local_offsets,
                                 self.experts.gate_up_epilogue)
        out = ops.grouped_gemm(act, self.experts.down_proj, local_offsets, "none")
        out = out.index_select(0, local_row_map.long())  # back to the received order

        expert_out = x.new_empty(permuted.shape[0], H)  # [Ts*k, H] in this rank's permuted order
        dist.all_to_all_single(expert_out, out, send_splits, recv_splits, group=self.group)
        shared = self.shared_experts(xs) if self.shared_experts is not None else None
        ys = ops.unpermute(expert_out, row_map, weights, shared_out=shared,
                           residual=None if residual is None else residual[lo:hi])
        return _all_gather_rows(ys, T, chunk, W, self.group)

    def _forward_all_reduce(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        ops = modules.ops
        weights, ids = self.gate(x)  # the same on every rank
        permuted, offsets, row_map = ops.permute(x, ids, self.num_experts)
        local_offsets = offsets[self.experts.start:self.experts.end + 1]  # rows of other experts stay zero
        act = ops.grouped_gemm(permuted, self.experts.gate_up_proj, local_offsets,
                                 self.experts.gate_up_epilogue)
        out = ops.grouped_gemm(act, self.experts.down_proj, local_offsets, "none")
        shared = self._shared_slice(x) if self.shared_experts is not None else None
        y = ops.unpermute(out, row_map, weights, shared_out=shared,
                          residual=residual if self.rank == 0 else None)
        dist.all_reduce(y, group=self.group)
        return y

    def _shared_slice(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's 1/W of the shared-experts MLP (its intermediate columns); the all_reduce sums them."""
        s = self.shared_experts
        inter = s.gate_proj.weight.shape[0]
        chunk = -(-inter // self.world_size)
        a, b = min(inter, self.rank * chunk), min(inter, (self.rank + 1) * chunk)
        h = F.silu(F.linear(x, s.gate_proj.weight[a:b])) * F.linear(x, s.up_proj.weight[a:b])
        return F.linear(h, s.down_proj.weight[:, a:b])


def _all_gather_rows(shard: torch.Tensor, total: int, chunk: int, world_size: int, group) -> torch.Tensor:
    """Concatenates every rank's [<= chunk, H] row shard in rank order -> [total, H]."""
    if shard.shape[0] < chunk:  # equal sizes for all_gather_into_tensor
        shard = torch.cat([shard, shard.new_zeros(chunk - shard.shape[0], shard.shape[1])])
    out = shard.new_empty(world_size * chunk, shard.shape[1])
    dist.all_gather_into_tensor(out, shard.contiguous(), group=group)
    return out[:total]


def shard_model_(model: Dots1ForCausalLM, rank: int | None = None, world_size: int | None = None,
                 group=None, dispatch: str = "auto") -> Dots1ForCausalLM:
    """In place: every Dots1MoE becomes an ExpertParallelMoE keeping only ``rank``'s experts (default,
    both None: this process's rank in the default group). A no-op when the world size is 1. Works on a
    meta model (then nothing is allocated) or a materialised one (the full expert tensors are freed).
    Every argument, and every MoE layer's experts, is checked before the first layer is changed."""
    if not isinstance(model, Dots1ForCausalLM):
        raise TypeError(f"model must be a dots1_ext Dots1ForCausalLM, got {type(model).__name__}")
    _check_dispatch(dispatch)
    if (rank is None) != (world_size is None):
        raise ValueError(f"give both rank and world_size, or neither (got rank={rank!r}, world_size={world_size!r})")
    if rank is None:
        info = current_info()
        rank, world_size = info.rank, info.world_size
    _check_rank(rank, world_size)
    if world_size == 1:
        return model
    moe_layers = [(i, layer) for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, Dots1MoE)]
    for i, layer in moe_layers:
        _check_shardable(layer.mlp.experts, f"model.layers.{i}.mlp.experts")
        expert_range(layer.mlp.num_experts, rank, world_size)
    for _, layer in moe_layers:
        layer.mlp = ExpertParallelMoE(layer.mlp, rank, world_size, group, dispatch)
    model.dist_info = (rank, world_size)
    return model


def set_dispatch(model: nn.Module, dispatch: str) -> None:
    _check_dispatch(dispatch)
    for m in model.modules():
        if isinstance(m, ExpertParallelMoE):
            m.dispatch = dispatch


# -- sharded loading -----------------------------------------------------------------------------
def _check_info(info) -> DistInfo:
    if info is None:
        return current_info()
    if not isinstance(info, DistInfo):
        raise TypeError(f"info must be a dots1_ext.distributed.DistInfo or None, got {type(info).__name__}")
    return info


def load_model_distributed(
    path: str | os.PathLike,
    info: DistInfo | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
    dispatch: str = "auto",
) -> Dots1ForCausalLM:
    """Loads the HF Dots1 checkpoint in ``path`` as this rank's shard onto ``info.device``: replicated
    tensors, and of the routed experts only this rank's (``loader.load_model(experts=...)``: hub layout,
    the other experts' tensors are never read; fused layout, only this rank's rows are). Streams tensor
    by tensor like loader.load_model; same errors. Progress is shown by rank 0 only."""
    info = _check_info(info)
    _check_dispatch(dispatch)
    experts = None
    if info.world_size > 1:
        config = read_config(path)
        if config.num_moe_layers:
            experts = expert_range(config.n_routed_experts, info.rank, info.world_size)
    model = load_model(path, info.device, dtype, progress=progress and info.is_main, experts=experts)
    return shard_model_(model, info.rank, info.world_size, info.group, dispatch).eval()


@torch.no_grad()
def build_random_model_distributed(config: Dots1Config, info: DistInfo | None = None,
                                   dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                                   dispatch: str = "auto") -> Dots1ForCausalLM:
    """A random-weight model built directly as this rank's shard on ``info.device`` (the full model never
    exists anywhere). Replicated weights are identical on every rank (same seed, same draw order);
    routed expert e of layer i is drawn from its own seed, so ranks hold different experts."""
    info = _check_info(info)
    _check_dispatch(dispatch)
    model = Dots1ForCausalLM(config, device="meta", dtype=dtype)
    shard_model_(model, info.rank, info.world_size, info.group, dispatch)
    check_device_memory(model_bytes(model), info.device)
    model.to_empty(device=info.device)
    model.tie_weights()
    init_random_weights_(model, seed)
    std = config.initializer_range
    gen = torch.Generator(device=info.device)
    for i, layer in enumerate(model.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if isinstance(experts, LocalExperts):
            for e in range(experts.start, experts.end):
                gen.manual_seed(seed * 1_000_003 + i * 1009 + e + 1)
                experts.gate_up_proj[e - experts.start].normal_(0.0, std, generator=gen)
                experts.down_proj[e - experts.start].normal_(0.0, std, generator=gen)
    return modules.interleave_gate_up_(model).eval()
