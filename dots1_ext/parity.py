"""Logits parity that separates a kernel bug from rounding.

Our kernels and the eager reference ops both round in the model's dtype, so comparing one with the other
says little in bf16: two correct 16-bit runs of a deep model differ by several percent. The yardstick is
the reference ops run in a higher precision (fp32 for a 16-bit model, fp64 for an fp32 one, each module
upcast on a temporary copy, one at a time). For every token t:

    ours_err[t] = ||ours[t] - yardstick[t]|| / ||yardstick[t]||      (relative L2 over the vocabulary)
    ref_err[t]  = the same for the reference ops in the model's dtype

PASS when every token has ``ours_err <= FACTOR * ref_err + FLOOR[dtype]`` and ``ours_err <= CAP[dtype]``,
and every logit is finite. FACTOR allows our kernels to round differently (fused epilogues, other
summation orders) but not to be worse than twice the reference's own rounding error, token by token;
FLOOR covers tokens where the reference happens to land very close to the yardstick; CAP bounds the
error whatever the reference does. There is no "some tokens may be off" allowance: a bug that touches
one token or one sequence fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

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


@dataclass
class ParityResult:
    dtype: torch.dtype
    ours_err: torch.Tensor  # [N] fp64, per token, against the yardstick
    ref_err: torch.Tensor  # [N] fp64, the reference ops in the same dtype, against the yardstick
    factor: float
    floor: float
    cap: float

    @property
    def bad_tokens(self) -> torch.Tensor:
        """Indices of the tokens that fail the criterion."""
        ok = (self.ours_err <= self.factor * self.ref_err + self.floor) & (self.ours_err <= self.cap)
        return (~ok).nonzero().flatten()

    @property
    def passed(self) -> bool:
        return self.bad_tokens.numel() == 0

    def summary(self) -> str:
        worst = int(torch.argmax(self.ours_err - self.factor * self.ref_err))
        return (f"per-token error vs {str(YARDSTICK_DTYPE[self.dtype]).removeprefix('torch.')} reference: "
                f"ours max {self.ours_err.max():.3e} median {self.ours_err.median():.3e}, "
                f"reference ops in {str(self.dtype).removeprefix('torch.')} max {self.ref_err.max():.3e} "
                f"median {self.ref_err.median():.3e}; worst token {worst}: ours {self.ours_err[worst]:.3e} vs "
                f"reference {self.ref_err[worst]:.3e} (rule: ours <= {self.factor:g} x reference + {self.floor:.0e}, "
                f"<= {self.cap:.2g}); tokens failing: {self.bad_tokens.numel()}/{self.ours_err.numel()} "
                f"{'PASS' if self.passed else 'FAIL'}")


def judge(ours: torch.Tensor, reference: torch.Tensor, yardstick: torch.Tensor, dtype: torch.dtype) -> ParityResult:
    """ours, reference (the same model in ``dtype``), yardstick (higher precision): [..., V] logits."""
    return ParityResult(dtype, per_token_rel_err(ours, yardstick).cpu(), per_token_rel_err(reference, yardstick).cpu(),
                        FACTOR, FLOOR[dtype], CAP[dtype])


@torch.no_grad()
def logits_parity(model, prompts: Sequence[Sequence[int]]) -> ParityResult:
    """Prompt logits (real tokens only) of ``model`` on its kernels, on the reference ops in its dtype,
    and on the reference ops upcast (the yardstick), judged as in this module's docstring."""
    ids, mask = left_pad(prompts, device=model.device)
    real = mask.bool()
    ours = model(ids, mask)[real]
    with reference_ops():
        reference = model(ids, mask)[real]
        yardstick = model.prefill(ids, mask, upcast=YARDSTICK_DTYPE[model.dtype])[real]
    return judge(ours, reference, yardstick, model.dtype)
