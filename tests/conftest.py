"""Shared test fixtures: the device grid, seeded fresh inputs, output poisoning, tolerances."""

from __future__ import annotations

import zlib

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Relative error norm ||out - ref|| / ||ref|| allowed per dtype (docs/design.md §5).
RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    # A fresh but reproducible draw per test: the seed comes from the test's id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))  # not hash(): salted per process


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN or Inf anywhere in out gives inf, so it never passes."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom > 0 else 1.0)


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fills t with NaN (floats) or -1 (ints) so that an element a kernel fails to write is caught."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-1)


def capture_cuda_graph(fn):
    """(graph, out): fn() run once first (warm-up outside the capture: workspaces, first-call device
    queries), then captured into a CUDA graph; ``out`` is what the captured call returned, the static
    output every replay rewrites."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            out = fn()
    return graph, out


def set_env(monkeypatch, name: str, value: str | None) -> None:
    """The environment variable ``name`` set to ``value`` for the test, or unset where ``value`` is None (the
    ops' knobs are read per call: a test compares their settings, the default included, in one process)."""
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)


def replay_poisoned(graph, *outputs: torch.Tensor) -> None:
    """Replays graph with its static ``outputs`` poisoned first (poison_: an element the replay does not
    write stays NaN), then waits for it."""
    for t in outputs:
        poison_(t)
    graph.replay()
    torch.cuda.synchronize()


def hf_dots1_config(base: dict, **overrides):
    """transformers' Dots1Config from a dict of our test fields (``rope_theta`` or ``rope_parameters``),
    eager attention."""
    transformers = pytest.importorskip("transformers")
    kw = {**base, **overrides}
    if "rope_parameters" in kw:
        kw.pop("rope_theta")
    else:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
    config = transformers.Dots1Config(**kw)
    config._attn_implementation = "eager"
    return config


def assert_parity(ours: torch.Tensor, theirs: torch.Tensor, gold: torch.Tensor, dtype: torch.dtype,
                  what: str = "logits") -> None:
    """Token by token (rows of [..., V]): our error against ``gold`` (the reference in higher precision)
    within dots1_ext.parity's rule relative to ``theirs`` (the reference in ``dtype``) — no row may be
    off, NaN never passes. For fp32 ``theirs`` is usually ``gold`` itself and the floor decides."""
    from dots1_ext.parity import judge

    result = judge(ours.float().cpu(), theirs.float().cpu(), gold.double().cpu(), dtype)
    assert result.passed, f"{what}: {result.summary()}"


# ---- Per-row and ULP comparisons (docs/design.md §5: a norm over the whole tensor hides a few wrong rows) ----

# Per-row bound on max |out - ref| relative to the row's largest |ref|: 4 units of rounding
# (u = 2^-8 bf16, 2^-11 fp16) at the row's largest magnitude, i.e. two ulps there; fp32 as the old
# relative-norm tolerance. A row with a wrong value of the row's size misses it by far.
ROW_RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(1, -1)
    return t.reshape(-1, t.shape[-1])


def assert_rows_close(out: torch.Tensor, ref_fp32: torch.Tensor, dtype: torch.dtype | None = None,
                      rtol: float | None = None, atol: float = 0.0, what: str = "output",
                      equal_nan: bool = False) -> None:
    """Row by row (rows = all dims but the last): max |out - round(ref)| <= rtol * max |round(ref)| + atol.

    ``ref_fp32`` is the reference computed in fp32 (or better); it is rounded to ``dtype`` (default:
    out's dtype) first, so the bound is on the kernel's own error. ``rtol`` defaults to ROW_RTOL[dtype].
    NaN or Inf in out never passes, unless ``equal_nan`` and the reference has NaN at the same places.
    Reports the worst rows."""
    dtype = dtype or out.dtype
    rtol = ROW_RTOL[dtype] if rtol is None else rtol
    assert out.shape == ref_fp32.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref_fp32.shape)}"
    o = _as_rows(out).double()
    r = _as_rows(ref_fp32.to(dtype)).double()
    o_nan, r_nan = torch.isnan(o), torch.isnan(r)
    if equal_nan:
        assert torch.equal(o_nan, r_nan), f"{what}: NaN at {int((o_nan != r_nan).sum())} places the reference has none (or the reverse)"
        o, r = o.masked_fill(o_nan, 0.0), r.masked_fill(r_nan, 0.0)
    assert torch.isfinite(o).all(), f"{what}: {int((~torch.isfinite(o)).sum())} non-finite values"
    assert torch.isfinite(r).all(), f"{what}: the reference has non-finite values"
    if o.numel() == 0:
        return
    err = (o - r).abs().amax(dim=1)
    bound = rtol * r.abs().amax(dim=1) + atol
    bad = err > bound
    if bad.any():
        worst = torch.argsort(err / bound.clamp_min(1e-300), descending=True)[:3].tolist()
        detail = ", ".join(f"row {i}: max err {err[i].item():.3e} > {bound[i].item():.3e}" for i in worst)
        raise AssertionError(f"{what}: {int(bad.sum())} of {o.shape[0]} rows off ({detail})")


def _ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """The float's bits as an int64 monotone in its value (+0 and -0 both 0): ulp distance = difference."""
    if t.dtype == torch.float32:
        bits, mask = t.view(torch.int32).long(), 0x7FFFFFFF
    elif t.dtype in (torch.float16, torch.bfloat16):
        bits, mask = t.view(torch.int16).long(), 0x7FFF
    else:
        raise TypeError(f"no ulp metric for {t.dtype}")
    mag = bits & mask
    return torch.where(bits < 0, -mag, mag)


def ulp_distance(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in ulps of out's dtype between out and ref rounded to that dtype (int64)."""
    return (_ordered_bits(out.detach().contiguous()) - _ordered_bits(ref.detach().to(out.dtype).contiguous())).abs()


def assert_ulps(out: torch.Tensor, ref: torch.Tensor, max_ulps: int, what: str = "output",
                max_frac_at_max: float | None = None, equal_nan: bool = False) -> None:
    """Every element of out within ``max_ulps`` ulps (of out's dtype) of ``ref`` rounded to that dtype.

    For kernels exact up to rounding (the norms): ``ref`` is the reference with the op's documented
    roundings. ``max_frac_at_max`` optionally bounds the fraction of elements at exactly ``max_ulps``
    (kernels agree bit for bit but on rounding boundaries). NaN never passes unless ``equal_nan`` and
    ref is NaN at the same places."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if out.numel() == 0:
        return
    r = ref.detach().to(out.dtype)
    o_nan, r_nan = torch.isnan(out), torch.isnan(r)
    if equal_nan:
        assert torch.equal(o_nan, r_nan), f"{what}: NaN at {int((o_nan != r_nan).sum())} places the reference has none (or the reverse)"
    else:
        assert not o_nan.any(), f"{what}: {int(o_nan.sum())} NaN"
        assert not r_nan.any(), f"{what}: the reference has NaN"
    keep = ~(o_nan & r_nan)
    d = ulp_distance(out, r)[keep]
    if d.numel() == 0:
        return
    worst = int(d.max())
    assert worst <= max_ulps, (f"{what}: {int((d > max_ulps).sum())} of {d.numel()} elements more than {max_ulps} "
                               f"ulp from the reference (worst {worst} ulp)")
    if max_frac_at_max is not None and max_ulps > 0:
        frac = (d == max_ulps).double().mean().item()
        assert frac <= max_frac_at_max, f"{what}: {frac:.2%} of elements at {max_ulps} ulp (> {max_frac_at_max:.2%})"
