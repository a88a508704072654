"""Logits parity that separates a kernel bug from rounding.

Our kernels and the eager reference ops both round in the model's dtype, so comparing one with the other
says little in bf16: two correct 16-bit runs of a deep model differ by several percent. The yardstick is
the reference ops run in a higher precision (fp32 for a 16-bit model, fp64 for an fp32 one, each module
upcast on a temporary copy, one at a time). For every token t:

    ours_err[t] = ||ours[t] - yardstick[t]|| / ||yardstick[t]||      (relative L2 over the vocabulary)
    ref_err[t]  = the same for the reference ops in the model's dtype

PASS when every token has ``ours_err <= FACTOR * ref_err + FLOOR[dtype]`` and ``ours_err <= CAP[dtype]``,
every logit is finite, and every routing decision of ours agrees with the yardstick's or is a near-tie
explained by its inputs (below). FACTOR allows our kernels to round differently (fused epilogues, other
summation orders) but not to be worse than twice the reference's own rounding error, token by token;
FLOOR covers tokens where the reference happens to land very close to the yardstick; CAP bounds the
error whatever the reference does. There is no "some tokens may be off" allowance: a bug that touches
one token or one sequence fails.

Routing is discontinuous: where two experts' scores are closer than the rounding of the hidden state,
a 16-bit run may pick the other one, and from there on that token's numbers are not comparable (in an
8-layer random model at real shape most tokens meet such a near-tie in some layer). So the 16-bit runs
follow the yardstick's routing: the yardstick logs each gating call's experts and scores; in the
16-bit runs, a token whose experts differ from the yardstick's is checked and then given the
yardstick's experts (its weights recomputed from its own router logits at them). The check, with
``delta`` the largest difference between the run's and the yardstick's scores for that token: every
group holding one of the run's experts scores within ``4 * delta`` of the yardstick's last kept group,
and within those groups the run's experts lose at most ``2 * delta`` per swapped expert against the
yardstick's best k there (``_explained``): the run's own inputs must explain the flip. A gating
kernel that picks other experts than its inputs imply fails as "routing deviations not explained".
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dots1_ext import modules
from dots1_ext.model import left_pad, reference_ops

FACTOR = 2.0
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 1e-3}
CAP = {torch.float32: 1e-4, torch.bfloat16: 0.25, torch.float16: 0.05}
YARDSTICK_DTYPE = {torch.float32: torch.float64, torch.bfloat16: torch.float32, torch.float16: torch.float32}


def per_token_rel_err(out: torch.Tensor, yardstick: torch.Tensor) -> torch.Tensor:
    """out, yardstick [..., V] -> fp64 [N] relative L2 error per row; inf for a row with NaN or Inf."""
    out = out.reshape(-1, out.shape[-1]).double()
    ref = yardstick.reshape(-1, yardstick.shape[-1]).double()
    err = (out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)
    return torch.where(torch.isfinite(out).all(dim=-1), err, torch.full_like(err, float("inf")))


# -- routing: log the yardstick's, make the 16-bit runs follow it ----------------------------------
def _choice_scores(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return logits.double().sigmoid() + bias.double()  # [T, E] the score experts are chosen by


def _gating_weights(logits: torch.Tensor, ids: torch.Tensor, renormalize: bool, scale: float) -> torch.Tensor:
    weights = logits.float().sigmoid().gather(1, ids.long())
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale


@dataclass
class RoutingLog:
    """The yardstick's gating calls, in call order: (sorted expert ids [T, k] int64, scores [T, E] fp64)."""

    calls: list = field(default_factory=list)


@dataclass
class RoutingStats:
    """How a run's routing compared with the yardstick's, over all gating calls."""

    token_decisions: int = 0  # (token, gating call) pairs seen
    followed: int = 0  # of them, near-ties where the run picked other experts and was given the yardstick's
    unexplained: int = 0  # deviations the run's inputs do not explain: a routing bug
    worst: str = ""

    def summary(self) -> str:
        text = (f"routing: {self.followed}/{self.token_decisions} token decisions were near-ties given the "
                f"yardstick's experts; {self.unexplained} deviations not explained by the inputs")
        return text + (f" (worst: {self.worst})" if self.worst else "")


def _with_gating(base, wrap):
    """A copy of the ops namespace ``base`` whose two gating ops return ``wrap(their output, router
    logits in fp64, bias, n_group, topk_group, renormalize, scale)``."""
    names = [n for n in dir(base) if not n.startswith("_")]
    ns = types.SimpleNamespace(**{n: getattr(base, n) for n in names})
    router, topk = base.router_topk_gating, base.topk_gating

    def router_topk_gating(hidden, router_weight, bias, k, n_group=1, topk_group=1, renormalize=True, scale=1.0):
        out = router(hidden, router_weight, bias, k, n_group, topk_group, renormalize, scale)
        logits = hidden.double() @ router_weight.double().t()
        return wrap(out, logits, bias, n_group, topk_group, renormalize, scale)

    def topk_gating(logits, bias, k, n_group=1, topk_group=1, renormalize=True, scale=1.0):
        out = topk(logits, bias, k, n_group, topk_group, renormalize, scale)
        return wrap(out, logits, bias, n_group, topk_group, renormalize, scale)

    ns.router_topk_gating, ns.topk_gating = router_topk_gating, topk_gating
    return ns


@contextlib.contextmanager
def record_routing():
    """Within the block, every gating call of the current ops (``modules.ops``) is logged."""
    log = RoutingLog()

    def wrap(out, logits, bias, n_group, topk_group, renormalize, scale):
        _, ids = out
        log.calls.append((ids.long().sort(dim=-1).values, _choice_scores(logits, bias)))
        return out

    with modules.use_ops(_with_gating(modules.ops, wrap)):
        yield log


def _explained(run_ids: torch.Tensor, yard_scores: torch.Tensor, delta: torch.Tensor, n_group: int,
               topk_group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whether scores within ``delta`` (per token, max norm) of ``yard_scores`` [T, E] could make the
    group-limited top-k pick ``run_ids`` [T, k] (necessary conditions). Groups: a group score (sum of a
    group's top 2) moves by at most 2 delta, so each group holding a run expert must score within
    4 delta of the yardstick's topk_group-th group. Experts: among those groups, the run's experts
    must lose at most 2 delta per swap against the yardstick's best k there. -> (explained [T], score
    lost [T], allowed [T])."""
    T, E = yard_scores.shape
    k = run_ids.shape[1]
    allowed_experts = torch.ones_like(yard_scores, dtype=torch.bool)
    group_ok = torch.ones(T, dtype=torch.bool, device=yard_scores.device)
    if topk_group < n_group:
        size = E // n_group
        group_scores = yard_scores.view(T, n_group, size).topk(min(2, size), dim=-1).values.sum(-1)  # [T, G]
        threshold = group_scores.topk(topk_group, dim=-1).values[:, -1:]  # [T, 1]
        run_groups = torch.zeros(T, n_group, dtype=torch.bool, device=yard_scores.device)
        run_groups.scatter_(1, run_ids // size, True)
        group_ok = (~run_groups | (group_scores >= threshold - 4 * delta[:, None])).all(-1)
        allowed_experts = run_groups.repeat_interleave(size, dim=1)
    best = yard_scores.masked_fill(~allowed_experts, float("-inf")).topk(k, dim=-1).indices.sort(-1).values
    lost = yard_scores.gather(1, best).sum(-1) - yard_scores.gather(1, run_ids).sum(-1)
    swaps = k - (run_ids[:, :, None] == best[:, None, :]).any(-1).sum(-1)
    allowed = 2 * delta * swaps + 1e-6
    return group_ok & (lost <= allowed), lost, allowed


@contextlib.contextmanager
def follow_routing(log: RoutingLog):
    """Within the block, the current ops' gating calls follow ``log`` (see the module docstring)."""
    stats = RoutingStats()
    position = iter(range(len(log.calls) + 1))

    def wrap(out, logits, bias, n_group, topk_group, renormalize, scale):
        weights, ids = out
        i = next(position)
        if i >= len(log.calls):
            raise RuntimeError("follow_routing: more gating calls than the yardstick made")
        yard_ids, yard_scores = log.calls[i]
        yard_ids, yard_scores = yard_ids.to(ids.device), yard_scores.to(ids.device)
        if yard_ids.shape != ids.shape:
            raise RuntimeError(f"follow_routing: gating call {i} has ids {tuple(ids.shape)}, the yardstick "
                               f"{tuple(yard_ids.shape)}")
        run_ids = ids.long().sort(dim=-1).values
        differs = (run_ids != yard_ids).any(dim=-1)  # [T]
        stats.token_decisions += ids.shape[0]
        if not bool(differs.any()):
            return out
        rows = differs.nonzero().flatten()
        delta = (_choice_scores(logits, bias) - yard_scores).abs().amax(dim=-1)  # [T]
        explained, lost, allowed = _explained(run_ids, yard_scores, delta, n_group, topk_group)
        bad = differs & ~explained
        stats.followed += int((differs & ~bad).sum())
        if bool(bad.any()):
            stats.unexplained += int(bad.sum())
            t = int(bad.nonzero()[0])
            stats.worst = (f"call {i} token {t}: experts {run_ids[t].tolist()} instead of {yard_ids[t].tolist()}, "
                           f"score lost {float(lost[t]):.3g} > allowed {float(allowed[t]):.3g}")
        ids = ids.clone()
        weights = weights.clone()
        ids[rows] = yard_ids[rows].to(ids.dtype)
        weights[rows] = _gating_weights(logits[rows], yard_ids[rows], renormalize, scale).to(weights.dtype)
        return weights, ids

    with modules.use_ops(_with_gating(modules.ops, wrap)):
        yield stats


@dataclass
class ParityResult:
    dtype: torch.dtype
    ours_err: torch.Tensor  # [N] fp64, per token, against the yardstick
    ref_err: torch.Tensor  # [N] fp64, the reference ops in the same dtype, against the yardstick
    factor: float
    floor: float
    cap: float
    routing: RoutingStats | None = None  # how our run's routing compared with the yardstick's

    @property
    def bad_tokens(self) -> torch.Tensor:
        """Indices of the tokens that fail the criterion."""
        ok = (self.ours_err <= self.factor * self.ref_err + self.floor) & (self.ours_err <= self.cap)
        return (~ok).nonzero().flatten()

    @property
    def passed(self) -> bool:
        return self.bad_tokens.numel() == 0 and (self.routing is None or self.routing.unexplained == 0)

    def summary(self) -> str:
        worst = int(torch.argmax(self.ours_err - self.factor * self.ref_err))
        return (f"per-token error vs {str(YARDSTICK_DTYPE[self.dtype]).removeprefix('torch.')} reference: "
                f"ours max {self.ours_err.max():.3e} median {self.ours_err.median():.3e}, "
                f"reference ops in {str(self.dtype).removeprefix('torch.')} max {self.ref_err.max():.3e} "
                f"median {self.ref_err.median():.3e}; worst token {worst}: ours {self.ours_err[worst]:.3e} vs "
                f"reference {self.ref_err[worst]:.3e} (rule: ours <= {self.factor:g} x reference + {self.floor:.0e}, "
                f"<= {self.cap:.2g}); tokens failing: {self.bad_tokens.numel()}/{self.ours_err.numel()}; "
                + (f"{self.routing.summary()}; " if self.routing is not None else "")
                + ("PASS" if self.passed else "FAIL"))


def judge(ours: torch.Tensor, reference: torch.Tensor, yardstick: torch.Tensor, dtype: torch.dtype,
          routing: RoutingStats | None = None) -> ParityResult:
    """ours, reference (the same model in ``dtype``), yardstick (higher precision): [..., V] logits."""
    return ParityResult(dtype, per_token_rel_err(ours, yardstick).cpu(), per_token_rel_err(reference, yardstick).cpu(),
                        FACTOR, FLOOR[dtype], CAP[dtype], routing)


@torch.no_grad()
def aligned_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """-> (ours, reference, yardstick, routing stats of ours): prompt logits [B, L, V] of ``model`` on its
    kernels and on the reference ops in its dtype, both following the yardstick's routing, and of the
    reference ops upcast (the yardstick)."""
    model.setup_cache(*input_ids.shape)
    with reference_ops(), record_routing() as log:
        yardstick = model.prefill(input_ids, attention_mask, upcast=YARDSTICK_DTYPE[model.dtype])
    with reference_ops(), follow_routing(log):
        reference = model(input_ids, attention_mask)
    with follow_routing(log) as stats:
        ours = model(input_ids, attention_mask)
    return ours, reference, yardstick, stats


@torch.no_grad()
def logits_parity(model, prompts: Sequence[Sequence[int]]) -> ParityResult:
    """Prompt logits (real tokens only) of ``model`` on its kernels, on the reference ops in its dtype,
    and on the reference ops upcast (the yardstick), judged as in this module's docstring."""
    ids, mask = left_pad(prompts, device=model.device)
    ours, reference, yardstick, routing = aligned_logits(model, ids, mask)
    real = mask.bool()
    return judge(ours[real], reference[real], yardstick[real], model.dtype, routing)
