"""Runs every CUDA kernel path of the int4 MoE decode ops once on small shapes, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck  python tests/sanitize_moe_decode_int4.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck python tests/sanitize_moe_decode_int4.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck python tests/sanitize_moe_decode_int4.py --small
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool synccheck python tests/sanitize_moe_decode_int4.py --small

Paths: the tensor-core kernels with int4 routed experts (bf16; asymmetric and symmetric; gate_up rows in
the HF and interleaved layouts; with and without shared experts and residual; T = 1, 16, 64 and 65 (two
launches); one expert taking every pair (several items side by side); 512 distinct experts; 1, 2 and 4
n-tiles; gate_up's staged stream (DOTS1_EXT_MOE_DECODE_INT4_STAGED, H <= 4096) and its register one, and
its routed tiles of 1, 2 or 4 row groups (DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS; 4 the default up to 8
tokens) and at 1 or 3-8 tokens their activations' shared-memory copy (DOTS1_EXT_MOE_DECODE_INT4_ACT_SMEM); the
last expert's last rows (memcheck sees a read past qweight / scales / zeros); many down
items per warp (items cut by warp boundaries); bad ids), and the fallback kernels (fp16, fp32,
DOTS1_EXT_MOE_DECODE_KERNEL=simple, shared experts' Is not a multiple of 8). Exits non-zero if an output
disagrees with the reference on the dequantized weights, so it doubles as a quick smoke test.

``--small`` (or DOTS1_SANITIZE_SMALL=1, which bench/gpu_check.sh sets) runs a minimal set for the slow
tools (racecheck / synccheck): bf16, one case per kernel variant and schedule shape, and the fp32 fallback.
"""

from __future__ import annotations

import os
import sys

import torch

from dots1_ext import reference
from dots1_ext.ops.moe_decode_int4 import moe_decode_int4_down, moe_decode_int4_gate_up
from dots1_ext.quant import Int4Weight, dequantize_int4, quantize_int4

sys.path.insert(0, os.path.dirname(__file__))
from sanitize_moe_decode import bad_ids, check, progress, run_sets, with_env  # noqa: E402


def case(name, dtype, T, E, k, H, I, Is, epilogue="swiglu_interleaved", residual=True, ids=None, symmetric=False,
         settled=False):
    progress(name)
    g = quantize_int4(torch.randn(E, 2 * I, H, device="cuda") / H**0.5, symmetric=symmetric)
    if epilogue == "swiglu_interleaved":
        g = Int4Weight(*(None if t is None else reference.interleave_gate_up(t)
                         for t in (g.qweight, g.scales, g.zeros)))
    d = quantize_int4(torch.randn(E, H, I, device="cuda") / I**0.5, symmetric=symmetric)
    sg = (torch.randn(2 * Is, H, device="cuda") / H**0.5).to(dtype) if Is else None
    sd = (torch.randn(H, Is, device="cuda") / Is**0.5).to(dtype) if Is else None
    hidden = torch.randn(T, H, device="cuda").to(dtype)
    if ids is None:
        ids = torch.rand(T, E).argsort(dim=1)[:, :k].to(torch.int32)
        ids[-1, -1] = E - 1  # the last expert's rows: the end of every weight tensor
    ids = ids.cuda()
    weights = torch.rand(T, k, device="cuda") + 0.1
    res = torch.randn(T, H, device="cuda").to(dtype) if residual else None
    act = moe_decode_int4_gate_up(hidden, g.qweight, g.scales, g.zeros, ids, sg, epilogue, hidden_settled=settled)
    out = moe_decode_int4_down(act, d.qweight, d.scales, d.zeros, ids, weights, sd, res)
    gu, dn = dequantize_int4(g, dtype).float(), dequantize_int4(d, dtype).float()
    ref_act = reference.moe_decode_gate_up(hidden.float(), gu, ids, sg.float() if Is else None, epilogue)
    ref_out = reference.moe_decode_down(act.float(), dn, ids, weights, sd.float() if Is else None,
                                        res.float() if residual else None)
    check(f"{name} act", act, ref_act, dtype)
    check(f"{name} out", out, ref_out, dtype)


def run_small() -> None:
    bf = torch.bfloat16
    case("small int4 T=1", bf, 1, 24, 6, 256, 128, 128)
    case("small int4 T=1 hidden_settled", bf, 1, 24, 6, 256, 128, 128, settled=True)
    case("small int4 T=16 HF symmetric", bf, 16, 24, 6, 256, 128, 128, "swiglu", symmetric=True)
    case("small int4 T=64 hot experts", bf, 64, 24, 6, 128, 128, 128)
    case("small int4 T=64 one expert", bf, 64, 8, 6, 128, 128, 32, ids=torch.full((64, 6), 3, dtype=torch.int32))
    case("small int4 T=64 512 distinct", bf, 64, 512, 8, 128, 128, 16, ids=torch.randperm(512).view(64, 8).int())
    case("small int4 T=64 bad ids", bf, 64, 10, 3, 128, 128, 32, ids=bad_ids(64, 10, 3))
    with_env("DOTS1_EXT_MOE_DECODE_NT", "4", lambda: case("small int4 NT=4 T=64", bf, 64, 24, 6, 128, 128, 128))
    case("small int4 no shared / residual", bf, 5, 16, 4, 128, 128, 0, residual=False)
    # The staged gate_up stream (the default above 8 tokens) with every warp's share a full batch (H =
    # 4096), and the register stream (staged off; and H = 8192, which never stages).
    case("small int4 H=4096 staged", bf, 9, 16, 6, 4096, 128, 128)
    with_env("DOTS1_EXT_MOE_DECODE_INT4_STAGED", "0",
             lambda: case("small int4 H=4096 registers", bf, 9, 16, 6, 4096, 128, 128))
    case("small int4 H=8192", bf, 3, 16, 6, 8192, 128, 0)
    # One token: the routed tiles read the activations' shared-memory copy (DOTS1_EXT_MOE_DECODE_INT4_ACT_SMEM,
    # default on up to H = 8192, its largest copy); T = 1 above covers H = 256.
    case("small int4 H=8192 T=1", bf, 1, 16, 6, 8192, 128, 0)
    # Routed gate_up tiles of 8 R features (DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS; default 4 up to 8
    # tokens, which the cases above run): R = 1, the last expert's rows.
    with_env("DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS", "1",
             lambda: case("small int4 row groups 1", bf, 8, 16, 6, 1024, 128, 128))
    case("small simple fp32", torch.float32, 5, 12, 3, 128, 128, 48)


def run_full() -> None:
    bf = torch.bfloat16
    for symmetric in (False, True):
        for epilogue in ("swiglu", "swiglu_interleaved"):
            for T in (1, 16, 17, 64, 65):
                case(f"int4 sym={symmetric} {epilogue} T={T}", bf, T, 24, 6, 256, 128, 128, epilogue,
                     symmetric=symmetric)
    case("int4 no shared / residual", bf, 5, 16, 4, 128, 128, 0, residual=False)
    case("int4 one expert T=16", bf, 16, 8, 6, 128, 128, 32, ids=torch.full((16, 6), 3, dtype=torch.int32))
    case("int4 one expert T=64", bf, 64, 8, 6, 128, 128, 32, ids=torch.full((64, 6), 3, dtype=torch.int32))
    case("int4 512 distinct experts", bf, 64, 512, 8, 128, 128, 16, ids=torch.randperm(512).view(64, 8).int())
    for nt in ("1", "2", "4"):
        with_env("DOTS1_EXT_MOE_DECODE_NT", nt, lambda: case(f"int4 NT={nt} T=64", bf, 64, 24, 6, 128, 128, 128))
    for T in (4, 64):
        # Real I and Is on a narrow H: many gate_up tiles per CTA, ~70 (T=64: ~120) down items of 11 steps
        # over 8 warps.
        case(f"int4 many tiles T={T}", bf, T, 128, 6, 128, 1408, 2816)
    for staged in ("1", "0"):  # the staged gate_up stream (default above 8 tokens) and the register one
        for T in (1, 9, 64):
            with_env("DOTS1_EXT_MOE_DECODE_INT4_STAGED", staged,
                     lambda: case(f"int4 H=4096 staged={staged} T={T}", bf, T, 32, 6, 4096, 256, 256))
    case("int4 H=8192 (register stream)", bf, 5, 16, 6, 8192, 128, 64)
    for act_smem in ("1", "0"):  # the tokens' activations from the shared-memory copy or from global
        for T, H in ((1, 8192), (4, 8192), (8, 4096)):
            with_env("DOTS1_EXT_MOE_DECODE_INT4_ACT_SMEM", act_smem,
                     lambda: case(f"int4 act_smem={act_smem} T={T} H={H}", bf, T, 16, 6, H, 256, 64))
    case("int4 H=16384 T=1 (past the shared-memory copy)", bf, 1, 8, 6, 16384, 128, 0)
    for rg in ("1", "2", "4"):  # routed gate_up tiles of 8 R features (up to 8 tokens; T = 9 ignores it)
        for T in (1, 8, 9):
            with_env("DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS", rg,
                     lambda: case(f"int4 row groups {rg} T={T}", bf, T, 32, 6, 4096, 256, 256))
        with_env("DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS", rg,
                 lambda: case(f"int4 row groups {rg} one expert", bf, 8, 8, 6, 256, 128, 32,
                              ids=torch.full((8, 6), 7, dtype=torch.int32)))
    case("int4 bad ids", bf, 6, 10, 3, 128, 128, 32, ids=bad_ids(6, 10, 3))
    case("int4 bad ids T=64", bf, 64, 10, 3, 128, 128, 32, ids=bad_ids(64, 10, 3))
    case("simple fp32", torch.float32, 5, 12, 3, 128, 128, 48)
    case("simple fp16 symmetric", torch.float16, 5, 12, 3, 128, 128, 48, symmetric=True)
    case("simple bf16 Is%8", bf, 5, 12, 3, 128, 128, 20, epilogue="swiglu")
    case("simple bf16 k>512", bf, 2, 530, 520, 128, 128, 8)
    with_env("DOTS1_EXT_MOE_DECODE_KERNEL", "simple", lambda: case("simple bf16 forced", bf, 6, 10, 3, 128, 128, 32,
                                                                   ids=bad_ids(6, 10, 3)))


def main() -> int:
    return run_sets("sanitize_moe_decode_int4", run_small, run_full)


if __name__ == "__main__":
    sys.exit(main())
