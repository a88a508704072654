"""Norm family benchmark: QK-norm + RoPE, RMSNorm and add + RMSNorm at real Dots1 shapes.

    python -m bench.bench_norm            # GPU: T in {1, 64, 4096, 16384}; CPU: tiny shapes
    python -m bench.bench_norm --quick    # fewer shapes and iterations

Peers, timed in the same run: HF transformers' Dots1RMSNorm / apply_rotary_pos_emb in eager mode, the
same code under torch.compile, and Liger-Kernel's RMSNorm / RoPE (/ fused add + RMSNorm) where
liger_kernel imports (GPU only). Shapes: 32 q + 32 k heads, D = 128, H = 4096, bf16; q and k are views
of a [T, (32 + 32 + 32) * 128] QKV projection output for dots1_ext and the HF code. Liger's RMSNorm
flattens its input with .view, so it gets q and k as separate contiguous tensors (as from separate
projections), which is the layout it is built for. The floor is bytes moved over the measured device
copy bandwidth.
"""

from __future__ import annotations

from typing import Callable

import torch

from bench.common import bench_main, bytes_floor_ms, graph_us, on_gpu, Report, Row, time_fn
from dots1_ext.ops import norm as N
from dots1_ext.rope import build_cos_sin_cache

HQ = HK = 32
D = 128
H = 4096
EPS = 1e-5
THETA = 1e7
MAX_POS = 32768


def _liger():
    """(rms_norm_fn, rope_fn, fused_add_rms_norm_fn or None) from liger_kernel, or a reason string."""
    if not on_gpu():
        return "Liger-Kernel is Triton (GPU only)"
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"liger_kernel not importable ({type(exc).__name__}: {exc})"
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
    except Exception:  # noqa: BLE001 - older Liger releases have no fused add + RMSNorm
        LigerFusedAddRMSNormFunction = None
    return LigerRMSNormFunction, LigerRopeFunction, LigerFusedAddRMSNormFunction


def _hf():
    try:
        from transformers.models.dots1.modeling_dots1 import Dots1RMSNorm, apply_rotary_pos_emb
    except Exception as exc:  # noqa: BLE001
        return f"transformers' Dots1 not importable ({type(exc).__name__}: {exc})"
    return Dots1RMSNorm, apply_rotary_pos_emb


def _compile(fn: Callable) -> Callable:
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


class Bench:
    def __init__(self, quick: bool):
        self.quick = quick
        self.device = "cuda" if on_gpu() else "cpu"
        self.dtype = torch.bfloat16
        self.iters = 20 if quick else 100
        self.hf = _hf()
        self.liger = _liger()
        # torch.compile on this CPU takes minutes per shape: GPU, or CPU without --quick.
        self.use_compile = on_gpu() or not quick
        self.notes: list[str] = []
        if isinstance(self.hf, str):
            self.notes.append(f"HF rows skipped: {self.hf}")
        if isinstance(self.liger, str):
            self.notes.append(f"Liger rows skipped: {self.liger}")
        if not self.use_compile:
            self.notes.append("torch.compile rows skipped on CPU in --quick mode")

    def time(self, fn: Callable, setup: Callable | None = None) -> float:
        return time_fn(fn, warmup=5 if self.quick else 10, iters=self.iters, setup=setup)

    def row(self, report: Report, case: str, impl: str, ms: float, nbytes: float, fn: Callable | None = None) -> None:
        """``fn`` (ours): also its GPU time per call inside a CUDA graph, for the decode-sized cases."""
        extra = {"graph_us": graph_us(fn)} if fn is not None and on_gpu() and nbytes < 2**20 else {}
        report.add(Row("norm", case, impl, ms, floor_ms=bytes_floor_ms(nbytes), gbs=nbytes / (ms * 1e-3) / 1e9,
                       extra=extra))

    def peer(self, report: Report, case: str, impl: str, fn: Callable, nbytes: float) -> None:
        """Times an optional peer; an API mismatch (other Liger/transformers release) becomes a note."""
        try:
            with torch.no_grad():
                fn()
                ms = self.time(fn)
        except Exception as exc:  # noqa: BLE001
            self.notes.append(f"{impl} skipped for {case}: {type(exc).__name__}: {str(exc)[:120]}")
            return
        self.row(report, case, impl, ms, nbytes)

    # --------------------------------------------------------------------------------------------
    def qk(self, report: Report, T: int) -> None:
        dev, dt = self.device, self.dtype
        qkv = torch.randn(T, (HQ + 2 * HK) * D, device=dev, dtype=dt)
        q = qkv[:, : HQ * D].view(T, HQ, D)
        k = qkv[:, HQ * D : (HQ + HK) * D].view(T, HK, D)
        v = qkv[:, (HQ + HK) * D :].view(T, HK, D)
        q_weight = (1 + 0.1 * torch.randn(D, device=dev)).to(dt)
        k_weight = (1 + 0.1 * torch.randn(D, device=dev)).to(dt)
        cache = build_cos_sin_cache(D, MAX_POS, THETA, device=dev)
        start = 0 if T > 1 else 2047  # decode: one token at context 2047
        positions = torch.arange(start, start + T, device=dev)
        case = f"QK-norm + RoPE T={T} ({HQ}+{HK} heads, D={D})"
        nbytes = 2 * T * (HQ + HK) * D * 2 + T * D * 4 + T * 8
        ours = lambda: N.qk_norm_rope_(q, k, q_weight, k_weight, positions, cache, EPS)  # noqa: E731
        self.row(report, case, "dots1_ext", self.time(ours), nbytes, ours)

        # The KV-cache variant at the same shape (a batch-1 static cache of MAX_POS rows).
        if T <= 4096:
            k_cache = torch.zeros(MAX_POS, HK, D, device=dev, dtype=dt)
            v_cache = torch.zeros_like(k_cache)
            kv_bytes = nbytes + 3 * T * HK * D * 2 + T * 8
            ms_kv = self.time(lambda: N.qk_norm_rope_kv_cache_(q, k, v, q_weight, k_weight, positions, cache, EPS,
                                                               k_cache, v_cache, positions))
            self.row(report, case + " + KV-cache write", "dots1_ext (kv-cache variant)", ms_kv, kv_bytes)

        # HF: cos/sin are computed once per forward by the rotary module (shared by all layers): not timed.
        half = cache[positions, : D // 2], cache[positions, D // 2 :]
        cos = torch.cat((half[0], half[0]), dim=-1)[None].to(dt)  # [1, T, D]
        sin = torch.cat((half[1], half[1]), dim=-1)[None].to(dt)
        if not isinstance(self.hf, str):
            Dots1RMSNorm, apply_rotary_pos_emb = self.hf
            q_norm = Dots1RMSNorm(D, eps=EPS).to(dev, dt)
            k_norm = Dots1RMSNorm(D, eps=EPS).to(dev, dt)
            with torch.no_grad():
                q_norm.weight.copy_(q_weight)
                k_norm.weight.copy_(k_weight)

            def hf_qk(qkv, cos, sin):
                # Dots1Attention.forward: q/k projections viewed as [B, T, heads, D], normed, [B, heads, T, D].
                shape = (1, T, -1, D)
                qs = q_norm(qkv[:, : HQ * D].view(shape)).transpose(1, 2)
                ks = k_norm(qkv[:, HQ * D : (HQ + HK) * D].view(shape)).transpose(1, 2)
                return apply_rotary_pos_emb(qs, ks, cos, sin)

            with torch.no_grad():
                self.row(report, case, "HF eager", self.time(lambda: hf_qk(qkv, cos, sin)), nbytes)
                if self.use_compile:
                    compiled = _compile(hf_qk)
                    self.row(report, case, "HF torch.compile", self.time(lambda: compiled(qkv, cos, sin)), nbytes)

        if not isinstance(self.liger, str):
            LigerRMSNorm, LigerRope, _ = self.liger
            q_c = torch.randn(1, T, HQ, D, device=dev, dtype=dt)
            k_c = torch.randn(1, T, HK, D, device=dev, dtype=dt)

            def liger_qk():
                qs = LigerRMSNorm.apply(q_c, q_weight, EPS).transpose(1, 2)
                ks = LigerRMSNorm.apply(k_c, k_weight, EPS).transpose(1, 2)
                return LigerRope.apply(qs, ks, cos, sin)

            self.peer(report, case, "Liger (contiguous q, k)", liger_qk, nbytes)

    # --------------------------------------------------------------------------------------------
    def rms(self, report: Report, T: int) -> None:
        dev, dt = self.device, self.dtype
        x = torch.randn(T, H, device=dev, dtype=dt)
        weight = (1 + 0.1 * torch.randn(H, device=dev)).to(dt)
        case = f"RMSNorm [{T}, {H}]"
        nbytes = 2 * T * H * 2 + H * 2
        ours = lambda: N.rms_norm(x, weight, EPS)  # noqa: E731
        self.row(report, case, "dots1_ext", self.time(ours), nbytes, ours)
        if not isinstance(self.hf, str):
            norm = self.hf[0](H, eps=EPS).to(dev, dt)
            with torch.no_grad():
                norm.weight.copy_(weight)
                self.row(report, case, "HF eager", self.time(lambda: norm(x)), nbytes)
                if self.use_compile:
                    compiled = _compile(norm.forward)
                    self.row(report, case, "HF torch.compile", self.time(lambda: compiled(x)), nbytes)
        if not isinstance(self.liger, str):
            self.peer(report, case, "Liger", lambda: self.liger[0].apply(x, weight, EPS), nbytes)

    def add_rms(self, report: Report, T: int) -> None:
        dev, dt = self.device, self.dtype
        x0 = torch.randn(T, H, device=dev, dtype=dt)
        r0 = torch.randn(T, H, device=dev, dtype=dt)
        x, residual = x0.clone(), r0.clone()
        weight = (1 + 0.1 * torch.randn(H, device=dev)).to(dt)
        case = f"add + RMSNorm [{T}, {H}]"
        nbytes = 4 * T * H * 2 + H * 2

        def restore():  # keep the residual stream from growing over the iterations (untimed)
            x.copy_(x0)
            residual.copy_(r0)

        ours = lambda: N.add_rms_norm_(x, residual, weight, EPS)  # noqa: E731
        self.row(report, case, "dots1_ext", self.time(ours, restore), nbytes, ours)
        restore()
        if not isinstance(self.hf, str):
            norm = self.hf[0](H, eps=EPS).to(dev, dt)
            with torch.no_grad():
                norm.weight.copy_(weight)

            def eager_add_norm(x, residual):  # the decoder layer's "residual + x", then the next norm
                residual = residual + x
                return norm(residual), residual

            with torch.no_grad():
                self.row(report, case, "HF eager", self.time(lambda: eager_add_norm(x0, r0)), nbytes)
                if self.use_compile:
                    compiled = _compile(eager_add_norm)
                    self.row(report, case, "HF torch.compile", self.time(lambda: compiled(x0, r0)), nbytes)
        if not isinstance(self.liger, str) and self.liger[2] is not None:
            # Out of place on copies' worth of inputs: Liger returns (normed, residual + x).
            self.peer(report, case, "Liger fused add + RMSNorm", lambda: self.liger[2].apply(x0, r0, weight, EPS), nbytes)


def run(quick: bool = False) -> list[Report]:
    b = Bench(quick)
    if on_gpu():
        tokens = [1, 4096] if quick else [1, 64, 4096, 16384]
    else:
        tokens = [1, 16]
    qk = Report("QK-norm + RoPE (bf16)")
    rms = Report("RMSNorm and add + RMSNorm (bf16)")
    for T in tokens:
        b.qk(qk, T)
        b.rms(rms, T)
        b.add_rms(rms, T)
    for r in (qk, rms):
        r.notes = list(b.notes)  # shown by __main__ under the tables
    return [qk, rms]


if __name__ == "__main__":
    bench_main(run, __doc__)
