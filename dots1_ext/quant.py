"""int4 routed experts (W4A16): the weight format, round-to-nearest quantizers, and the quantized
experts module (docs/design.md §7).

Format (one weight ``w [..., N, K]``, K the reduction dimension: H for ``gate_up_proj [E, 2I, H]``, I for
``down_proj [E, H, I]``; leading dims, e.g. the expert, are carried through):

- groups of ``GROUP_SIZE`` = 128 consecutive elements along K (K % 128 == 0; Dots1: H = 4096 = 32 x 128,
  I = 1408 = 11 x 128); each group g of row n has a scale ``s[n, g]`` (bf16) and, asymmetric only, an
  integer zero point ``z[n, g]`` in [0, 15] (uint8); symmetric groups have the fixed zero point 8;
- each element is a 4-bit code ``u`` in [0, 15] and stands for ``(u - z) * s``;
- ``qweight [..., N, K/2]`` uint8: byte j of a row holds element 2j in its low nibble and element 2j+1 in
  its high nibble (``u[2j] | u[2j+1] << 4``); ``scales [..., N, K/128]`` bf16; ``zeros [..., N, K/128]``
  uint8 (asymmetric only).

Quantizers (round to nearest, half to even as ``torch.round``; computed in fp32, each group on its own):

- symmetric: ``s = bf16(absmax / 7)``, ``q = clamp(round(w / s), -8, 7)``, ``u = q + 8``. Per element
  ``|w - (u - 8) * s| <= s / 2`` (the bf16 rounding of s can push ``|w / s|`` to 7.03: still rounds to 7).
- asymmetric: ``lo = min(min(w), 0)``, ``hi = max(max(w), 0)``, ``s = bf16((hi - lo) / 15)``,
  ``z = clamp(round(-lo / s), 0, 15)``, ``u = clamp(round(w / s) + z, 0, 15)``. Per element
  ``|w - (u - z) * s| <= (1/2 + 15 * 2^-8) * s``: the bf16 rounding of s (up to 2^-8 of it) can leave the
  grid's last step short of the group's extreme, where the code clamps.
- An all-zero group gets s = 0 (its elements dequantize to 0). NaN or Inf weights are refused.

Dequantization (:func:`dequantize_int4`): ``(u - z) * s`` computed exactly in fp32 (a 5-bit integer times
an 8-bit-mantissa scale), rounded once to the requested dtype. This is the reference the kernels must
match: the int4 experts' forward is the bf16 model's math on these dequantized weights.

Choice: **asymmetric** (measured by ``bench/bench_quant.py``, the table it prints: relative error
``||x @ dq(w).T - x @ w.T|| / ||x @ w.T||`` for x [1024, K] ~ N(0, 1), w [2048, K] scaled by 0.02, fp32,
at the real shapes' row lengths; the weights' own relative error is the same to 3 digits):

=====================================  =========  ==========
weights                                symmetric  asymmetric
=====================================  =========  ==========
normal, K = 4096 (gate_up rows)        0.1173     0.1005
normal, K = 1408 (down rows)           0.1174     0.1006
Student-t 5 dof, K = 4096              0.1719     0.1333
Student-t 5 dof, K = 1408              0.1727     0.1335
Student-t 3 dof, K = 4096              0.2232     0.1641
Student-t 3 dof, K = 1408              0.2238     0.1648
=====================================  =========  ==========

Asymmetric is 14% lower on normal weights and 22-27% lower on heavy-tailed ones: a group's outlier
sits on one side, and the symmetric grid wastes the other half of its 15 levels, while the asymmetric
grid spans [min, max] with 16. It costs one uint8 zero point per group of 128 (0.5 + 2/128 + 1/128 =
0.523 bytes per weight against 0.516) and, in the kernels, one integer subtraction ``u - z`` before
the int4 -> bf16 conversion (exact: ``|u - z| <= 15``), then the scale multiply as for symmetric.
So the format is asymmetric (``quantize_int4``'s default); ``symmetric=True`` gives the symmetric
variant (``zeros`` None), which the experts module and the checkpoint format also carry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GROUP_SIZE = 128
FORMAT_NAME = "int4-g128"  # the checkpoint's name for this format (config.json quantization_config)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Dequantize at most this many elements at a time (bounds the fp32 temporaries of a large call).
_DEQUANT_CHUNK_ELEMENTS = 1 << 24


@dataclass
class Int4Weight:
    """A weight ``[..., N, K]`` in the int4 format (see the module docstring)."""

    qweight: torch.Tensor  # [..., N, K/2] uint8, two codes per byte along K (low nibble = even k)
    scales: torch.Tensor  # [..., N, K/128] bf16
    zeros: torch.Tensor | None = None  # [..., N, K/128] uint8 in [0, 15]; None: symmetric (zero point 8)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def shape(self) -> torch.Size:
        """The logical shape [..., N, K] of the weight."""
        return torch.Size((*self.qweight.shape[:-1], self.qweight.shape[-1] * 2))

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize_int4(self, dtype)


def _check_weight(w: torch.Tensor, name: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point tensor (float32, bfloat16, float16, float64), got {w.dtype}")
    if w.dim() < 2:
        raise ValueError(f"{name} must be [..., N, K] (at least 2-D), got shape {tuple(w.shape)}")
    K = w.shape[-1]
    if K == 0 or K % GROUP_SIZE:
        raise ValueError(f"{name}: the reduction dimension K = {K} (last dim of shape {tuple(w.shape)}) must be a "
                         f"positive multiple of the group size {GROUP_SIZE}")


@torch.no_grad()
def quantize_int4(w: torch.Tensor, symmetric: bool = False) -> Int4Weight:
    """``w [..., N, K]`` (float32 / bfloat16 / float16 / float64, K % 128 == 0) -> its int4 format, on
    w's device, by round to nearest (see the module docstring for the exact rules). Raises ValueError
    naming ``w`` for a wrong dtype, shape, K, non-finite values, or values whose group range overflows
    float32 (the scale or the dequantized grid would be infinite); TypeError for a non-bool ``symmetric``."""
    _check_weight(w)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
    if w.is_meta:
        raise ValueError("w is a meta tensor (no values); int4 quantization needs its values")
    *lead, N, K = w.shape
    G = K // GROUP_SIZE
    x = w.detach().to(torch.float32).reshape(*lead, N, G, GROUP_SIZE)
    if symmetric:
        scale = (x.abs().amax(-1) / 7).to(torch.bfloat16)  # [..., N, G]
        s = scale.float()
        reach = s * 7  # |w / s| <= 7.03 rounds to at most 7: the largest dequantized magnitude
    else:
        lo = x.amin(-1).clamp(max=0.0)
        hi = x.amax(-1).clamp(min=0.0)
        scale = ((hi - lo) / 15).to(torch.bfloat16)
        s = torch.where(scale == 0, 1.0, scale.float())
        z = torch.round(-lo / s).clamp_(0, 15)
        reach = torch.maximum(z, 15 - z) * scale.float()
    # Finite weights can still have hi - lo, or a grid point of the bf16 scale, beyond float32 (or, in
    # float64, the values themselves): an infinite scale or grid dequantizes to Inf / NaN. One host read
    # for all the checks (once per weight).
    x_finite, reach_finite = torch.stack([torch.isfinite(x).all(), torch.isfinite(reach).all()]).tolist()
    if not x_finite:
        if w.dtype != torch.float64 or not bool(torch.isfinite(w).all()):
            raise ValueError("w contains NaN or Inf; int4 quantization needs finite weights")
        raise ValueError(f"w has values beyond float32's range (max |w| = {w.abs().max().item():.3e}); int4 "
                         "quantization computes in float32")
    if not reach_finite:
        raise ValueError(f"w has a group whose int4 scale or dequantized grid overflows float32 (max |w| = "
                         f"{w.abs().max().item():.3e}); int4 quantization needs group ranges well inside float32")
    if symmetric:
        q = torch.round(x / torch.where(s == 0, 1.0, s)[..., None]).clamp_(-8, 7)
        codes = (q + 8).to(torch.uint8)
        zeros = None
    else:
        codes = (torch.round(x / s[..., None]) + z[..., None]).clamp_(0, 15).to(torch.uint8)
        zeros = z.to(torch.uint8)
    return Int4Weight(_pack(codes.reshape(*lead, N, K)), scale, zeros)


def _check_codes_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8:
        raise ValueError(f"{name} must be uint8, got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{name} must be at least 1-D [..., K], got a 0-d tensor")


def _pack(codes: torch.Tensor) -> torch.Tensor:
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[..., K]`` in [0, 15] (K even) -> ``[..., K/2]`` uint8, ``codes[2j] | codes[2j+1] << 4``.
    Reads the codes' maximum on the host (a code above 15 would spill into its neighbour's nibble)."""
    _check_codes_tensor(codes, "codes")
    if codes.shape[-1] % 2:
        raise ValueError(f"codes: the last dim must be even, got shape {tuple(codes.shape)}")
    if not codes.is_meta and codes.numel() and (top := int(codes.max())) > 15:
        raise ValueError(f"codes must be 4-bit codes in [0, 15], got values up to {top}")
    return _pack(codes)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[..., K/2]`` uint8 -> codes ``[..., K]`` uint8 in [0, 15]."""
    _check_codes_tensor(qweight, "qweight")
    return torch.stack([qweight & 0xF, qweight >> 4], dim=-1).reshape(*qweight.shape[:-1], qweight.shape[-1] * 2)


def check_int4(q: Int4Weight, name: str = "q") -> None:
    """ValueError naming the field for tensors that do not form an int4 weight (TypeError for a ``q``
    that is not an Int4Weight). Zero points above 15 are a ValueError for CPU tensors only: on a GPU the
    check would be a host synchronisation, and this runs on the model's forward (the dequantizing int4
    paths), so there :func:`dequantize_int4` poisons such groups with NaN instead."""
    if not isinstance(q, Int4Weight):
        raise TypeError(f"{name} must be a dots1_ext.quant.Int4Weight, got {type(q).__name__}")
    qw, sc, z = q.qweight, q.scales, q.zeros
    if not isinstance(qw, torch.Tensor) or qw.dtype != torch.uint8 or qw.dim() < 2:
        raise ValueError(f"{name}.qweight must be a uint8 tensor [..., N, K/2], got "
                         f"{getattr(qw, 'dtype', type(qw).__name__)} {tuple(getattr(qw, 'shape', ()))}")
    K = qw.shape[-1] * 2
    if K == 0:
        raise ValueError(f"{name}.qweight has no columns (K = 0); K must be a positive multiple of {GROUP_SIZE}")
    if K % GROUP_SIZE:
        raise ValueError(f"{name}.qweight: K = 2 x {qw.shape[-1]} = {K} is not a multiple of {GROUP_SIZE}")
    groups = (*qw.shape[:-1], K // GROUP_SIZE)
    if not isinstance(sc, torch.Tensor) or not sc.is_floating_point() or tuple(sc.shape) != groups:
        raise ValueError(f"{name}.scales must be a floating-point tensor of shape {list(groups)}, got "
                         f"{getattr(sc, 'dtype', type(sc).__name__)} {list(getattr(sc, 'shape', ()))}")
    if z is not None and (not isinstance(z, torch.Tensor) or z.dtype != torch.uint8 or tuple(z.shape) != groups):
        raise ValueError(f"{name}.zeros must be None or a uint8 tensor of shape {list(groups)}, got "
                         f"{getattr(z, 'dtype', type(z).__name__)} {list(getattr(z, 'shape', ()))}")
    if sc.device != qw.device or (z is not None and z.device != qw.device):
        raise ValueError(f"{name}: qweight, scales and zeros must be on one device")
    if z is not None and z.device.type == "cpu" and z.numel() and (top := int(z.max())) > 15:
        raise ValueError(f"{name}.zeros must be 4-bit zero points in [0, 15], got values up to {top}")


@torch.no_grad()
def dequantize_int4(q: Int4Weight, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(u - z) * s`` of every element, exact in fp32, rounded once to ``dtype`` -> ``[..., N, K]`` on
    q's device (into ``out`` when given: a tensor of that shape and dtype). Works through the weight a
    slice of the leading dims at a time, so fp32 temporaries stay small."""
    check_int4(q)
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be a floating-point dtype (float32, bfloat16, float16, float64), got {dtype}")
    shape = q.shape
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=q.qweight.device)
    elif tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous() or out.device != q.qweight.device:
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {list(shape)} on {q.qweight.device}, "
                         f"got {out.dtype} {list(out.shape)} on {out.device}")
    N, K = shape[-2], shape[-1]
    G = K // GROUP_SIZE
    lead = math.prod(shape[:-2])  # not -1: ambiguous for an empty weight
    qw = q.qweight.reshape(lead, N, K // 2)
    sc = q.scales.reshape(lead, N, G)
    zs = None if q.zeros is None else q.zeros.reshape(lead, N, G)
    flat = out.view(lead, N, K)
    step = max(1, _DEQUANT_CHUNK_ELEMENTS // max(1, N * K))
    for a in range(0, qw.shape[0], step):
        b = min(qw.shape[0], a + step)
        codes = unpack_int4(qw[a:b]).view(b - a, N, G, GROUP_SIZE).to(torch.float32)
        # A zero point above 15 (check_int4 raises for it on the CPU only) dequantizes to NaN, not to a
        # plausible weight.
        zero = 8.0 if zs is None else torch.where(zs[a:b] > 15, torch.nan, zs[a:b].to(torch.float32))[..., None]
        vals = (codes - zero) * sc[a:b].to(torch.float32)[..., None]
        flat[a:b] = vals.view(b - a, N, K).to(dtype)
    return out


# -- models ----------------------------------------------------------------------------------------
# config.json's "quantization_config" of a checkpoint with int4 routed experts (and the value of the
# safetensors metadata key METADATA_KEY in each of its files). quant_method is not one transformers
# knows, so transformers refuses such a checkpoint instead of loading it wrongly.
QUANT_METHOD = "dots1_ext"
METADATA_KEY = "dots1_ext.experts"
EXPERT_FORMATS = ("bf16", "int4")


def quantization_config(symmetric: bool = False) -> dict:
    return {"quant_method": QUANT_METHOD, "format": FORMAT_NAME, "bits": 4, "group_size": GROUP_SIZE,
            "symmetric": bool(symmetric), "modules": ["mlp.experts"],
            "tensors": ["qweight (uint8, [E, N, K/2], low nibble = even k)", "scales (bfloat16, [E, N, K/128])",
                        "zeros (uint8, [E, N, K/128]; asymmetric only)"]}


def metadata_value(symmetric: bool) -> str:
    return f"{FORMAT_NAME}-{'sym' if symmetric else 'asym'}"


def checkpoint_symmetric(config) -> bool | None:
    """None for a checkpoint whose experts are not quantized; else whether its int4 groups are symmetric.
    Raises ValueError for a quantization_config this package did not write."""
    qc = getattr(config, "extra", {}).get("quantization_config")
    if qc is None:
        return None
    # bits too: the loader reads every such checkpoint's experts as 4-bit codes (quantization_config writes 4).
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD or qc.get("format") != FORMAT_NAME \
            or qc.get("bits") != 4 or qc.get("group_size") != GROUP_SIZE \
            or not isinstance(qc.get("symmetric"), bool):
        raise ValueError(f"unsupported quantization_config {qc!r}: dots1_ext reads only its own int4 experts format "
                         f"(quant_method {QUANT_METHOD!r}, format {FORMAT_NAME!r}, bits 4, group_size {GROUP_SIZE})")
    return qc["symmetric"]


def check_expert_format(experts: str) -> str:
    if experts not in EXPERT_FORMATS:
        raise ValueError(f"experts must be one of {', '.join(map(repr, EXPERT_FORMATS))}, got {experts!r}")
    return experts
