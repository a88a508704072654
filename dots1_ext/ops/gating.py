"""Top-k gating: sigmoid + bias-corrected, group-limited top-k routing (DeepSeek-V3 / Dots1 style).

Kernels: csrc/gating/. Reference: dots1_ext.reference.topk_gating / router_topk_gating.
Ties between equal biased scores (and equal group scores) go to the lower expert (group) id, on
every backend (what a stable descending sort gives; csrc/gating/gating.h). Routing runs in fp32 end
to end with an exact expf sigmoid.

NaN logits (every backend): torch.topk's policy, a NaN biased score ranks above every number, and
several NaN tie, broken by the lower id like any tie (torch.topk itself leaves the order among NaN
unspecified: on CPU it returned ids [1, 4, 3, 2, 0] for five NaN). A group holding a NaN has a NaN
group score and so is kept first. The token's weights come out NaN: a NaN logit never routes
silently. The bias is not checked per call (that would read it on the host every step): a NaN in it
ranks that expert first with finite weights, so load_model refuses a checkpoint whose router bias is
not finite.

CUDA: one warp per token (E <= 512 in registers, k rounds of a warp arg-max on a 64-bit
(score, -id) key). router_topk_gating with T <= 16 tokens (decode) computes the projection inside the
same launch (a grid of 1 KB column slices x 8 experts writing partial logits, the last block to arrive
summing them in slice order and routing; DOTS1_EXT_ROUTER_KERNEL=cluster|gemm picks the sm_90
thread-block-cluster kernel or the unfused path); above that it runs one GEMM through ATen
(fp32 accumulation, as the reference) and the gating kernel.
"""

from __future__ import annotations

import torch

from dots1_ext import reference
from dots1_ext.ops import _checks as C
from dots1_ext.ops._lib import fill_with_reference, op

MAX_EXPERTS = 512
MAX_TOPK = 16
# router_topk_gating computes the router projection inside its one gating launch for T <= this;
# above it the op runs a GEMM, then the gating kernel. 16 is what the fused kernels hold, not a tuning
# knob: csrc/gating/gating.h kRouterFusedMaxTokens (per-lane accumulators acc[16] and a [16 x 512]
# fp32 logits tile in shared memory). This is the one Python definition; modules.py imports it and
# calls the op exactly where it is one launch. The default fused kernel is a grid over the whole GPU
# (csrc/gating/gating_kernels.cu router_gating_grid_kernel); DOTS1_EXT_ROUTER_KERNEL=cluster|gemm
# selects the former thread-block-cluster kernel (11.5 us in a CUDA graph at T=1 on the H100,
# bench/results/2026-11-25-h100-07b969f) or the unfused GEMM path, for tests and benchmarks.
ROUTER_FUSED_MAX_TOKENS = 16


def _check_routing_args(E: int, k: int, n_group: int, topk_group: int) -> None:
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"dots1_ext: number of experts (logits.shape[1]) must be in [1, {MAX_EXPERTS}], got {E}")
    if not 1 <= k <= min(E, MAX_TOPK):
        raise ValueError(f"dots1_ext: k must be in [1, min(num_experts={E}, {MAX_TOPK})], got {k}")
    if n_group < 1 or E % n_group:
        raise ValueError(f"dots1_ext: n_group must be a positive divisor of num_experts={E}, got {n_group}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"dots1_ext: topk_group must be in [1, n_group={n_group}], got {topk_group}")
    if k > topk_group * (E // n_group):
        raise ValueError(
            f"dots1_ext: k={k} exceeds the experts in the kept groups (topk_group={topk_group} x {E // n_group})"
        )


def _check_topk_gating(logits, bias, k, n_group, topk_group, renormalize, scale):
    C.check_dtype(logits, "logits", (torch.float32,))
    C.check_shape(logits, "logits", (None, None))
    E = logits.shape[1]
    C.check_dtype(bias, "bias", (torch.float32,))
    C.check_shape(bias, "bias", (E,))
    C.check_same_device(bias, "bias", logits, "logits")
    _check_routing_args(E, k, n_group, topk_group)


def _check_router_topk_gating(hidden, router_weight, bias, k, n_group, topk_group, renormalize, scale):
    C.check_dtype(hidden, "hidden", C.FLOAT_DTYPES)
    C.check_shape(hidden, "hidden", (None, None))
    C.check_dtype(router_weight, "router_weight", C.FLOAT_DTYPES)
    C.check_shape(router_weight, "router_weight", (None, hidden.shape[1]))
    C.check_same_device(router_weight, "router_weight", hidden, "hidden")
    E = router_weight.shape[0]
    C.check_dtype(bias, "bias", (torch.float32,))
    C.check_shape(bias, "bias", (E,))
    C.check_same_device(bias, "bias", hidden, "hidden")
    _check_routing_args(E, k, n_group, topk_group)


fill_with_reference("topk_gating", reference.topk_gating, _check_topk_gating)
fill_with_reference("router_topk_gating", reference.router_topk_gating, _check_router_topk_gating)


@torch.library.register_fake("dots1_ext::topk_gating")
def _topk_gating_fake(logits, bias, k, n_group, topk_group, renormalize, scale):
    _check_topk_gating(logits, bias, k, n_group, topk_group, renormalize, scale)
    T = logits.shape[0]
    return logits.new_empty(T, k), logits.new_empty(T, k, dtype=torch.int32)


@torch.library.register_fake("dots1_ext::router_topk_gating")
def _router_topk_gating_fake(hidden, router_weight, bias, k, n_group, topk_group, renormalize, scale):
    _check_router_topk_gating(hidden, router_weight, bias, k, n_group, topk_group, renormalize, scale)
    T = hidden.shape[0]
    return hidden.new_empty(T, k, dtype=torch.float32), hidden.new_empty(T, k, dtype=torch.int32)


def topk_gating(
    logits: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routes each token to k experts.

    logits [T, E] fp32 router logits; bias [E] fp32 ``e_score_correction_bias``.
    Returns (weights [T, k] fp32, ids [T, k] int32): ids chosen by sigmoid(logits) + bias among the
    ``topk_group`` best of ``n_group`` groups (group score = sum of its top-2 biased scores); weights
    are the unbiased sigmoid scores at ids, renormalised to sum 1 if ``renormalize``, times ``scale``.
    Ties go to the lower id. NaN ranks highest (torch.topk's policy; NaN ties to the lower id), so a
    token with a NaN logit is routed to that expert first and gets NaN weights.
    """
    return op("topk_gating")(logits, bias, k, n_group, topk_group, renormalize, float(scale))


def router_topk_gating(
    hidden: torch.Tensor,
    router_weight: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_gating(hidden.float() @ router_weight.float().T, ...)`` in one op.

    hidden [T, H], router_weight [E, H] (any float dtypes; fp32 accumulation), bias [E] fp32.
    Returns (weights [T, k] fp32, ids [T, k] int32). Meant for small T (decode): one launch up to
    ``ROUTER_FUSED_MAX_TOKENS`` tokens. Ties and NaN as :func:`topk_gating`.
    """
    return op("router_topk_gating")(hidden, router_weight, bias, k, n_group, topk_group, renormalize, float(scale))
