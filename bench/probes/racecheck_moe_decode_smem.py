"""Probe: the MoE decode kernels' newest shared-memory paths alone, few and small enough for racecheck
to finish in well under a minute (the sanitize scripts' small sets take over 100 s under racecheck).

    PYTHONPATH=. PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck \\
        python bench/probes/racecheck_moe_decode_smem.py int4|bf16|int4_rows

int4: gate_up's staged stream (DOTS1_EXT_MOE_DECODE_INT4_STAGED=1: each thread cp.async-copies its
pieces of its next routed tile into a double buffer while it computes the current one) with every
warp's share one batch (H = 4096), at one token (H = 1024), and with hot experts at 64 tokens (H = 256,
most warps without a step of a tile). bf16: the wide_all weight-load mapping above 8 tokens (items of
8 pairs; hot experts at 64 tokens, and 17 tokens). int4_rows: gate_up's routed tiles of 4 and 2 row
groups (DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS; 4 is the default up to 8 tokens), with the activations'
shared-memory copy that 4 row groups read at 1 and 3-8 tokens (DOTS1_EXT_MOE_DECODE_INT4_ACT_SMEM). Each case
checks its outputs against the reference
(tests/sanitize_moe_decode.py's case()); exits non-zero on a mismatch.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))

import torch  # noqa: E402

import sanitize_moe_decode as bf16_cases  # noqa: E402
import sanitize_moe_decode_int4 as int4_cases  # noqa: E402


def main() -> int:
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    if which not in ("int4", "bf16", "int4_rows"):
        print("usage: racecheck_moe_decode_smem.py int4|bf16|int4_rows", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("racecheck_moe_decode_smem: needs a CUDA GPU")
        return 2
    torch.manual_seed(0)
    bf = torch.bfloat16
    if which == "int4":
        os.environ["DOTS1_EXT_MOE_DECODE_INT4_STAGED"] = "1"
        int4_cases.case("int4 staged H=4096 T=9", bf, 9, 16, 6, 4096, 128, 128)
        int4_cases.case("int4 staged H=1024 T=1", bf, 1, 16, 6, 1024, 128, 128)
        int4_cases.case("int4 staged H=256 T=64 hot experts", bf, 64, 24, 6, 256, 128, 128)
    elif which == "int4_rows":
        # gate_up's routed tiles of 4 and 2 row groups (more SwiGLU readers of the partials' buffer), one
        # expert taking every pair.
        for rg in ("4", "2"):
            os.environ["DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS"] = rg
            int4_cases.case(f"int4 row groups {rg} T=8", bf, 8, 16, 6, 1024, 128, 128)
        int4_cases.case("int4 row groups 4 T=1 (activations in shared memory)", bf, 1, 16, 6, 1024, 128, 128)
        int4_cases.case("int4 row groups 2 one expert", bf, 4, 8, 6, 256, 128, 32,
                        ids=torch.full((4, 6), 3, dtype=torch.int32))
    else:
        os.environ["DOTS1_EXT_MOE_DECODE_LOADS"] = "wide_all"
        bf16_cases.case("wide_all T=64 hot experts", bf, 64, 24, 6, 128, 64, 128)
        bf16_cases.case("wide_all T=17", bf, 17, 24, 6, 256, 64, 128)
    torch.cuda.synchronize()
    for f in bf16_cases.failures:  # both scripts' check() appends here
        print("MISMATCH", f)
    print(f"racecheck_moe_decode_smem {which}:", "ok" if not bf16_cases.failures else "mismatches")
    return 1 if bf16_cases.failures else 0


if __name__ == "__main__":
    sys.exit(main())
