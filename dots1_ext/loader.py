"""Hugging Face Dots1 checkpoints: load (streaming, tensor by tensor) and save (hub layout or fused).

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Routed experts are stored one by one in the hub layout
(``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``) or fused as in transformers 5
(``mlp.experts.gate_up_proj`` [E, 2I, H], gate rows first, and ``mlp.experts.down_proj`` [E, H, I]).

Every problem with a checkpoint (missing, unreadable or invalid files, missing / unexpected / misshapen
tensors) raises a :class:`CheckpointError` (a ValueError) whose message names the file, and the tensor
where there is one; ``python -m dots1_ext`` prints it as one line.

Loading builds the model on the meta device, allocates it once on the target device, then copies each
checkpoint tensor (read through safetensors' mmap) into its slot; a hub-layout expert lands in a slice
of the fused parameter, and fused expert tensors are copied one expert at a time. So no weight is ever
held twice, and host memory holds at most one expert matrix (or one dense tensor) at a time.

int4 routed experts (``dots1_ext.quant``): ``load_model(path, experts="int4")`` quantizes each expert
matrix of a bf16/fp16/fp32 checkpoint on the target device as it is copied (the only high-precision
copy is that one matrix), and a checkpoint written by ``save_checkpoint`` from an int4 model is read
back as int4. That checkpoint's config.json carries ``quantization_config`` (``quant.quantization_config``:
``quant_method`` "dots1_ext", ``format`` "int4-g128", ``symmetric``), each safetensors file the metadata
key ``dots1_ext.experts`` ("int4-g128-asym" / "-sym"), and every MoE layer the fused tensors
``model.layers.{i}.mlp.experts.{gate_up_proj,down_proj}.{qweight,scales,zeros}`` (qweight uint8
[E, N, K/2], scales bf16 and zeros uint8 [E, N, K/128], gate_up rows in the HF order: gate first; no
zeros when symmetric), whatever ``layout`` says; every other tensor is as in a bf16 checkpoint.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import numbers
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dots1_ext import quant
from dots1_ext.config import CONFIG_NAME, Dots1Config, dtype_name, parse_dtype
from dots1_ext.model import Dots1ForCausalLM, is_integer
from dots1_ext.modules import (
    Dots1Int4Experts,
    Int4Tensor,
    experts_in_hf_layout,
    int4_expert_modules,
    interleave_gate_up_,
    pack_linears_,
    quantize_experts_,
)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Keys some exporters add that carry nothing we need (RoPE tables are rebuilt from the config).
IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq|cos_cached|sin_cached)$")
_HUB_EXPERT_KEY = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<part>gate_proj|up_proj|down_proj)\.weight$")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# Fused expert tensors [E, ...], read one expert at a time: bf16 ones and the int4 format's.
_FUSED_EXPERT_KEY = re.compile(r"mlp\.experts\.(gate_up_proj|down_proj)(\.(qweight|scales|zeros))?$")


# -- errors --------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: a missing, unreadable or invalid file, or tensors that do not
    fit the model. The message names the file (and the tensor, where there is one)."""


class CheckpointKeyError(CheckpointError, KeyError):
    """A tensor missing from the checkpoint, or one the model has no place for (also a KeyError)."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint (directory, config.json, weight files) where one was expected (also a FileNotFoundError)."""


@contextlib.contextmanager
def _open(path: str):
    """safe_open(path) whose errors name the file (safetensors' own do not: "incomplete metadata, file
    not fully covered" for a truncated file)."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            yield f
    except CheckpointError:
        raise
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{path}: no such file") from e
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def _read_json(path: str, what: str) -> object:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON in the {what}: {e}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: the {what} is not UTF-8 text: {e}") from None


# -- reading -------------------------------------------------------------------------------------
def read_config(directory: str | os.PathLike) -> Dots1Config:
    """The Dots1Config of the checkpoint in ``directory``; CheckpointError naming the file otherwise."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointNotFoundError(f"{directory}: no such checkpoint directory")
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{path}: no such file (a Hugging Face checkpoint directory has a {CONFIG_NAME})")
    try:
        return Dots1Config.from_json_file(path)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text: {e}") from None
    except (ValueError, NotImplementedError) as e:  # their messages name the file and the field
        raise CheckpointError(str(e)) from None


def checkpoint_files(directory: str | os.PathLike) -> dict[str, str]:
    """{tensor key: safetensors file path} of the checkpoint in ``directory``."""
    directory = os.fspath(directory)
    index_path = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.exists(index_path):
        index = _read_json(index_path, "checkpoint index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            found = f"keys {sorted(index)}" if isinstance(index, dict) else f"a JSON {type(index).__name__}"
            raise CheckpointError(f"{index_path}: expected a JSON object with a non-empty \"weight_map\" "
                                  f"{{tensor name: file name}}, found {found}")
        bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v or os.sep in v]
        if bad:
            raise CheckpointError(f"{index_path}: weight_map[{bad[0][0]!r}] must be a file name in the "
                                  f"checkpoint directory, got {bad[0][1]!r}")
        files = {key: os.path.join(directory, name) for key, name in weight_map.items()}
        for key, path in files.items():
            if not os.path.isfile(path):
                raise CheckpointNotFoundError(f"{path}: no such file (listed in {index_path} for {key!r})")
        return files
    single = os.path.join(directory, SAFE_WEIGHTS_NAME)
    files = [single] if os.path.exists(single) else sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise CheckpointNotFoundError(
            f"{directory}: no {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} or *.safetensors")
    keys = {}
    for path in files:
        with _open(path) as f:
            keys.update({key: path for key in f.keys()})
    return keys


class _Int4Slot:
    """Where high-precision expert weights go in an int4 model: ``copy_`` quantizes them into the
    Int4Tensor (expert ``e``, ``rows`` of it; all experts when e is None). Duck-types the tensor
    destinations of _Slots (``data``, ``shape``, indexing, ``numel``, ``element_size``)."""

    def __init__(self, target: Int4Tensor, e: int | None = None, rows: slice = slice(None)):
        self.target, self.e, self.rows = target, e, rows

    @property
    def data(self) -> "_Int4Slot":
        return self

    @property
    def shape(self) -> torch.Size:
        E, N, K = self.target.shape
        if self.e is None:
            return torch.Size((E, N, K))
        return torch.Size((len(range(N)[self.rows]), K))

    dtype = None  # any floating-point source is quantized

    def __getitem__(self, index) -> "_Int4Slot":
        if isinstance(index, int):
            return _Int4Slot(self.target, index)
        e, rows = index
        return _Int4Slot(self.target, e, rows)

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:  # progress counts the bytes read (a 16-bit source's)
        return 2

    def copy_(self, src: torch.Tensor) -> None:
        if self.e is None:
            for e in range(src.shape[0]):
                self.target.set_rows_(e, slice(None), src[e])
        else:
            self.target.set_rows_(self.e, self.rows, src)


class _Slots:
    """Where each checkpoint key goes in the model, and which parts of each weight have been filled."""

    SKIP = "skip"  # a routed expert outside [start, end): not read

    def __init__(self, model: Dots1ForCausalLM, start: int = 0, end: int | None = None, quantized_source: bool = False):
        self.config = model.config
        # The model holds routed experts [start, end) of each MoE layer (all of them unless load_model
        # was given an expert range).
        self.start, self.end = start, (model.config.n_routed_experts or 0) if end is None else end
        # Tied lm_head.weight is the embedding: named_parameters drops the duplicate name.
        self.targets = dict(model.named_parameters())
        self.targets.update((n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
        # int4 experts: the int4 tensors themselves (a quantized checkpoint) or, for a high-precision
        # one, a slot that quantizes what is copied into it, under the bf16 parameter's name.
        for name, m in model.named_modules():
            if isinstance(m, Dots1Int4Experts):
                for part in ("gate_up_proj", "down_proj"):
                    int4 = getattr(m, part)
                    if quantized_source:
                        self.targets.update((f"{name}.{part}.{leaf}", t) for leaf, t in int4.buffers_by_name().items())
                    else:
                        self.targets[f"{name}.{part}"] = _Int4Slot(int4)
        # Per target, a bool per fillable part: [E, 2] for gate_up_proj (gate, up), [E, 1] for down_proj.
        self.filled = {n: torch.zeros(*self._parts(n), dtype=torch.bool) for n in self.targets}

    def _parts(self, name: str) -> tuple[int, int]:
        if name.endswith("mlp.experts.gate_up_proj"):
            return (self.end - self.start, 2)
        if name.endswith("mlp.experts.down_proj"):
            return (self.end - self.start, 1)
        return (1, 1)

    def resolve(self, key: str):
        """key -> None (ignored), SKIP (a routed expert outside [start, end)), or (target name, destination
        view, the filled-map index it covers, rows): rows = (start, end), the experts to read from a fused
        expert tensor [E, ...], else None."""
        m = _HUB_EXPERT_KEY.match(key)
        if m:
            part, e = m["part"], int(m["e"])
            name = f"{m['prefix']}.{'down_proj' if part == 'down_proj' else 'gate_up_proj'}"
            if name not in self.targets and f"{name}.qweight" in self.targets:
                raise CheckpointKeyError(f"unexpected checkpoint tensor {key!r}: config.json's quantization_config "
                                         "says the routed experts are int4 (fused .qweight/.scales tensors), but this "
                                         "is an unquantized (bf16/fp16/fp32) expert weight")
            if name not in self.targets or e >= self.config.n_routed_experts:
                raise CheckpointKeyError(f"unexpected checkpoint tensor {key!r}: the model has no such expert "
                                         f"(n_routed_experts={self.config.n_routed_experts})")
            if not self.start <= e < self.end:
                return self.SKIP
            local, I = e - self.start, self.config.moe_intermediate_size
            fused = self.targets[name].data
            if part == "down_proj":
                return name, fused[local], (local, 0), None
            j = 0 if part == "gate_proj" else 1
            return name, fused[local, j * I:(j + 1) * I], (local, j), None
        if key in self.targets:
            rows = (self.start, self.end) if _FUSED_EXPERT_KEY.search(key) else None
            return key, self.targets[key].data, (slice(None), slice(None)), rows
        if IGNORED_KEYS.search(key) or (key == "lm_head.weight" and self.config.tie_word_embeddings):
            return None
        fused, _, leaf = key.rpartition(".")
        if f"{key}.qweight" in self.targets:
            raise CheckpointKeyError(f"unexpected checkpoint tensor {key!r}: config.json's quantization_config says "
                                     "the routed experts are int4 (fused .qweight/.scales tensors), but this is an "
                                     "unquantized (bf16/fp16/fp32) expert weight")
        if _FUSED_EXPERT_KEY.search(key) and leaf in ("qweight", "scales", "zeros"):
            if fused in self.targets:
                raise CheckpointKeyError(f"unexpected checkpoint tensor {key!r}: an int4 expert tensor, but "
                                         "config.json has no dots1_ext quantization_config, so the checkpoint reads "
                                         "as an unquantized one")
            if leaf == "zeros" and f"{fused}.scales" in self.targets:
                raise CheckpointKeyError(f"unexpected checkpoint tensor {key!r}: int4 zero points, but config.json's "
                                         "quantization_config says symmetric int4 (no zero points)")
        raise CheckpointKeyError(f"unexpected checkpoint tensor {key!r}: no parameter of that name in the Dots1 model")

    def mark(self, name: str, index: tuple, key: str) -> None:
        if self.filled[name][index].any():
            raise CheckpointError(f"checkpoint tensor {key!r} fills {name!r} a second time (both hub and fused layouts?)")
        self.filled[name][index] = True

    def missing(self) -> list[str]:
        keys = []
        for name, filled in self.filled.items():
            if filled.all():
                continue
            if filled.shape == (1, 1) or not filled.any():
                keys.append(name)
                continue
            parts = ("down_proj",) if name.endswith("down_proj") else ("gate_proj", "up_proj")
            prefix = name.rsplit(".", 1)[0]
            keys += [f"{prefix}.{self.start + e}.{parts[j]}.weight" for e, j in (~filled).nonzero().tolist()]
        return keys


class _Progress:
    """An in-place counter line on stderr."""

    def __init__(self, total_bytes: int, enabled: bool):
        self.total, self.done, self.enabled = total_bytes, 0, enabled
        self.start = self.last = time.perf_counter()

    def update(self, nbytes: int, tensors: int, total_tensors: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if self.enabled and (now - self.last > 0.2 or tensors == total_tensors):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9) / 1e9
            sys.stderr.write(f"\rloading weights: {tensors}/{total_tensors} tensors, "
                             f"{self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB ({rate:.2f} GB/s)")
            if tensors == total_tensors:
                sys.stderr.write("\n")
            sys.stderr.flush()


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's (unique) parameters and persistent buffers."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def parse_device(device: torch.device | str | int) -> torch.device:
    """``device`` (a torch.device, "cpu", "cuda", "cuda:1", or a CUDA index) -> torch.device; ValueError
    naming ``device`` for anything dots1_ext cannot put weights on."""
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, numbers.Integral)):
        raise ValueError(f"device must be a torch.device, a device string such as 'cpu' or 'cuda:0', or a CUDA "
                         f"index, got {device!r}")
    try:
        parsed = torch.device(int(device) if isinstance(device, numbers.Integral) else device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device string (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if parsed.type == "meta":  # a meta model has no weights: it would fail only later, in a forward
        raise ValueError(f"device {device!r} holds no data; use 'cpu' or 'cuda'")
    if parsed.type not in ("cpu", "cuda"):  # the ops have CPU and CUDA kernels only
        raise ValueError(f"device {device!r}: dots1_ext runs on 'cpu' or 'cuda' devices")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch.cuda.is_available() is False")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) "
                             "are visible")
    return parsed


def check_device_memory(bytes_needed: int, device: torch.device | str) -> None:
    """Raises torch.OutOfMemoryError naming the bytes needed when a CUDA device has less free memory
    (ValueError naming ``device`` for a bad one, see :func:`parse_device`)."""
    device = parse_device(device)
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    if bytes_needed > free:
        raise torch.OutOfMemoryError(
            f"dots1_ext: the model needs {bytes_needed} bytes ({bytes_needed / 2**30:.2f} GiB) on {device}, "
            f"but only {free} bytes ({free / 2**30:.2f} GiB) of {total / 2**30:.2f} GiB are free. "
            "Use a smaller dtype, fewer layers, or a larger GPU.")


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
    experts: tuple[int, int] | str | None = None,
) -> Dots1ForCausalLM:
    """Loads the HF Dots1 checkpoint in ``path`` onto ``device`` in ``dtype`` (default: bf16 on CUDA,
    fp32 elsewhere).

    ``experts=(start, end)``: only routed experts [start, end) of each MoE layer are loaded, into
    ``mlp.experts`` tensors of end - start experts (hub layout: the other experts' tensors are never
    read; fused layout: only those rows are). Such a model is one rank's part of an expert-parallel
    model: :func:`dots1_ext.distributed.shard_model_` turns it into one that runs; alone, its MoE
    layers cannot run, and save_checkpoint refuses it.

    ``experts="int4"``: the routed experts are quantized to int4 (``dots1_ext.quant``: groups of 128
    along the reduction dimension, asymmetric, round to nearest) on ``device`` while loading, one
    expert matrix at a time; everything else is in ``dtype``. A checkpoint saved from an int4 model
    loads as int4 (``experts`` None or "int4"); ``experts="bf16"`` keeps the experts unquantized in
    ``dtype`` (the default for a high-precision checkpoint) and refuses an int4 one.

    A config with ``tie_word_embeddings`` whose checkpoint also holds an ``lm_head.weight`` different from
    the embedding loads untied, with a warning, as in transformers (the model's config then says untied).

    Raises CheckpointError (a ValueError; CheckpointKeyError, also a KeyError, for a missing or
    unexpected tensor; CheckpointNotFoundError, also a FileNotFoundError, for missing files) naming
    the file and the tensor, ValueError naming ``device`` for one it cannot load onto (:func:`parse_device`),
    and torch.OutOfMemoryError when the device cannot hold the model."""
    device = parse_device(device)
    dtype = parse_dtype(dtype) or _default_dtype(device)
    expert_format = quant.check_expert_format(experts) if isinstance(experts, str) else None
    if experts is not None and expert_format is None:
        _expert_pair(experts)
    config = read_config(path)
    try:
        stored_symmetric = quant.checkpoint_symmetric(config)  # None: not quantized
    except ValueError as e:
        raise CheckpointError(f"{os.path.join(os.fspath(path), CONFIG_NAME)}: {e}") from None
    if stored_symmetric is not None and expert_format == "bf16":
        raise CheckpointError(f"{path}: the checkpoint's routed experts are int4; load it with experts='int4' "
                              "(dequantizing to bf16 while loading is not supported)")
    if stored_symmetric is not None and experts is not None and expert_format is None:
        raise ValueError(f"experts={experts!r}: loading a range of experts of an int4 checkpoint is not supported")
    files = checkpoint_files(path)
    if config.tie_word_embeddings and "lm_head.weight" in files and not _tensors_equal(
            files, "lm_head.weight", "model.embed_tokens.weight", dtype):
        # transformers keeps both (untied) when they differ; the config says so here, so that a save
        # writes both tensors again.
        warnings.warn(f"{path}: config.json sets tie_word_embeddings, but the checkpoint's lm_head.weight differs "
                      "from model.embed_tokens.weight; loading them untied, as transformers does", stacklevel=2)
        config.tie_word_embeddings = False

    model = Dots1ForCausalLM(config, device="meta", dtype=dtype)
    start, end = 0, config.n_routed_experts or 0
    if experts is not None and expert_format is None:
        start, end = _check_expert_range(experts, config)
        keep_experts_(model, start, end)
    int4 = stored_symmetric is not None or expert_format == "int4"
    if int4:
        if not config.num_moe_layers:
            raise ValueError("experts='int4': the model has no MoE layers")
        quantize_experts_(model, symmetric=bool(stored_symmetric))  # on meta: empty int4 modules
    quantized = stored_symmetric is not None
    # every key, shape and dtype checked before any allocation
    plan = _plan(files, _Slots(model, start, end, quantized_source=quantized))

    check_device_memory(model_bytes(model), device)
    model.to_empty(device=device)
    model.tie_weights()
    # q/k/v and gate/up as one weight each (state_dict stays HF): packed before loading, so the
    # checkpoint's tensors are copied straight into their slices.
    pack_linears_(model)
    slots = _Slots(model, start, end, quantized_source=quantized)  # the same plan, now pointing at real storage

    bar = _Progress(sum(nbytes for *_, nbytes in plan), progress)
    done = 0
    with torch.no_grad():
        for path_, keys in _by_file(plan):
            with _open(path_) as f:
                for key in keys:
                    _, dest, _, rows = slots.resolve(key)
                    if rows is not None:  # fused experts: one expert at a time bounds host memory
                        src = f.get_slice(key)
                        for e in range(rows[0], rows[1]):
                            expert = src[e]
                            if key.endswith(".zeros"):
                                _check_zero_points(expert, key, e, path_)
                            _copy(dest[e - rows[0]], expert, key, path_, e)
                    else:
                        src = f.get_tensor(key)
                        if key.endswith("e_score_correction_bias") and not bool(torch.isfinite(src).all()):
                            # A NaN or infinite bias would pick experts silently (every logit stays finite).
                            raise CheckpointError(f"checkpoint tensor {key!r} in {path_} holds non-finite values "
                                                  f"(the router's bias must be finite)")
                        _copy(dest, src, key, path_)
                    done += 1
                    bar.update(dest.numel() * dest.element_size(), done, len(plan))
    interleave_gate_up_(model)  # once, for the fused SwiGLU epilogue; state_dict stays HF
    return model.eval()


def _tensors_equal(files: dict[str, str], a: str, b: str, dtype: torch.dtype) -> bool:
    """Whether checkpoint tensors ``a`` and ``b`` are equal once in ``dtype`` (transformers compares the loaded
    parameters), read a block of rows at a time. A tensor missing from its file counts as unequal (the plan
    names it)."""
    if b not in files:
        return False
    with _open(files[a]) as fa, _open(files[b]) as fb:
        if a not in fa.keys() or b not in fb.keys():
            return False
        sa, sb = fa.get_slice(a), fb.get_slice(b)
        shape = sa.get_shape()
        if shape != sb.get_shape():
            return False
        if len(shape) < 2:
            return torch.equal(fa.get_tensor(a).to(dtype), fb.get_tensor(b).to(dtype))
        step = max(1, (1 << 24) // max(1, math.prod(shape[1:])))  # blocks of ~16M elements bound host memory
        return all(torch.equal(sa[i:i + step].to(dtype), sb[i:i + step].to(dtype)) for i in range(0, shape[0], step))


def _expert_pair(experts) -> tuple[int, int]:
    """``experts`` as a (start, end) pair of ints; ValueError naming ``experts`` for any other shape."""
    # a dict or set would unpack its keys, a range or string its items: only an explicit pair is a range
    if not isinstance(experts, (tuple, list)) or len(experts) != 2:
        raise ValueError(f"experts must be 'bf16', 'int4' or a (start, end) tuple or list, got {experts!r}")
    if not all(is_integer(v) for v in experts):
        raise ValueError(f"experts={experts!r}: start and end must be integers")
    return int(experts[0]), int(experts[1])


def _check_expert_range(experts, config: Dots1Config) -> tuple[int, int]:
    E = config.n_routed_experts
    start, end = _expert_pair(experts)
    if not config.num_moe_layers:
        raise ValueError(f"experts={experts!r}: the model has no MoE layers")
    if not 0 <= start < end <= E:
        raise ValueError(f"experts=({start!r}, {end!r}) must satisfy 0 <= start < end <= n_routed_experts={E}")
    return start, end


def keep_experts_(model: torch.nn.Module, start: int, end: int) -> torch.nn.Module:
    """On a meta model: every MoE layer's ``mlp.experts`` now holds routed experts [start, end) only
    (meta tensors of end - start experts; ``expert_range`` records which). Returns the model."""
    E = getattr(getattr(model, "config", None), "n_routed_experts", None)
    if not (is_integer(start) and is_integer(end)) or not 0 <= start < end <= (E or 0):
        raise ValueError(f"keep_experts_: start and end must be integers with 0 <= start < end <= "
                         f"n_routed_experts={E}, got start={start!r}, end={end!r}")
    start, end = int(start), int(end)
    for name, m in model.named_modules():
        if not name.endswith("mlp.experts") or not hasattr(m, "gate_up_proj"):
            continue
        for pname in ("gate_up_proj", "down_proj"):
            full = getattr(m, pname)
            if not full.is_meta:
                raise ValueError(f"keep_experts_ works on a meta model; {name}.{pname} is on {full.device}")
            setattr(m, pname, torch.nn.Parameter(
                torch.empty((end - start,) + tuple(full.shape[1:]), dtype=full.dtype, device="meta"),
                requires_grad=full.requires_grad))
        m.expert_range, m.num_experts = (start, end), model.config.n_routed_experts
    return model


def _check_zero_points(zeros: torch.Tensor, key: str, expert: int, path: str) -> None:
    """An int4 checkpoint's zero points lie in [0, 15] (4 bits); a larger one would dequantize to plausible
    but wrong weights, so it stops the load (checked on the host copy, one expert at a time)."""
    if zeros.numel() and int(zeros.max()) > 15:
        raise CheckpointError(f"checkpoint tensor {key!r} in {path}: expert {expert} has zero points up to "
                              f"{int(zeros.max())}, but the int4 format's lie in [0, 15]")


def _copy(dest, src: torch.Tensor, key: str, path: str, expert: int | None = None) -> None:
    """dest.copy_(src); an int4 slot quantizes, and what quantization refuses (NaN, Inf, a range that
    overflows) becomes a CheckpointError naming the tensor (quant's own error would not say which)."""
    if not isinstance(dest, _Int4Slot):
        dest.copy_(src)
        return
    try:
        dest.copy_(src)
    except ValueError as e:
        which = "" if expert is None else f" (expert {expert})"
        raise CheckpointError(f"checkpoint tensor {key!r}{which} in {path} cannot be quantized to int4 "
                              f"(experts='int4'): {e}") from None


def _plan(files: dict[str, str], slots: _Slots) -> list[tuple[str, str, int]]:
    """Validates every key against the model; returns [(file, key, bytes)] of the tensors to copy."""
    plan = []
    by_file: dict[str, list[str]] = {}
    for key, path in files.items():
        by_file.setdefault(path, []).append(key)
    for path, keys in by_file.items():
        with _open(path) as f:
            present = set(f.keys())
            for key in keys:
                if key not in present:
                    raise CheckpointKeyError(f"checkpoint tensor {key!r} is listed in the index but missing from {path}")
                try:
                    resolved = slots.resolve(key)
                except CheckpointError as e:
                    raise type(e)(f"{e} (in {path})") from None
                if resolved is None or resolved is slots.SKIP:
                    continue
                name, dest, index, rows = resolved
                src = f.get_slice(key)
                shape, src_dtype = tuple(src.get_shape()), src.get_dtype()
                # A fused expert tensor read in part (rows) holds every expert: check the whole.
                expected = tuple(dest.shape) if rows is None else (slots.config.n_routed_experts,) + tuple(dest.shape[1:])
                if shape != expected:
                    raise CheckpointError(f"checkpoint tensor {key!r} in {path} has shape {list(shape)}, "
                                          f"but the model expects {list(expected)} (config: {name})")
                if getattr(dest, "dtype", None) == torch.uint8:  # an int4 model's packed codes / zero points
                    if src_dtype != "U8":
                        raise CheckpointError(f"checkpoint tensor {key!r} in {path} has dtype {src_dtype}, but the "
                                              "int4 format stores it as U8 (uint8)")
                elif src_dtype not in _SAFETENSORS_DTYPES:
                    raise CheckpointError(f"checkpoint tensor {key!r} in {path} has unsupported dtype {src_dtype}")
                try:
                    slots.mark(name, index, key)
                except CheckpointError as e:
                    raise CheckpointError(f"{e} (in {path})") from None
                plan.append((path, key, dest.numel() * dest.element_size()))
    missing = slots.missing()
    if missing:
        shown = ", ".join(repr(k) for k in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        where = os.path.dirname(next(iter(files.values()))) if files else "the checkpoint"
        raise CheckpointKeyError(f"checkpoint {where} is missing {len(missing)} tensor(s): {shown}")
    return plan


def _by_file(plan: list[tuple[str, str, int]]) -> Iterator[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = {}
    for path, key, _ in plan:
        groups.setdefault(path, []).append(key)
    yield from groups.items()


# -- writing -------------------------------------------------------------------------------------
def checkpoint_tensors(model: Dots1ForCausalLM, layout: str = "hub") -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of the checkpoint; ``layout`` "hub" splits the experts one by one. Views of
    the model's tensors where possible; an interleaved gate_up_proj comes as an HF-layout copy, which
    ``with experts_in_hf_layout(model):`` around the loop avoids (save_checkpoint does that)."""
    if layout not in ("hub", "fused"):
        raise ValueError(f"layout must be 'hub' or 'fused', got {layout!r}")
    config = model.config
    I = config.moe_intermediate_size
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        prefix, _, leaf = name.rpartition(".")
        if layout == "hub" and prefix.endswith("mlp.experts") and leaf == "gate_up_proj":
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight", t[e, :I]
                yield f"{prefix}.{e}.up_proj.weight", t[e, I:]
        elif layout == "hub" and prefix.endswith("mlp.experts") and leaf == "down_proj":
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", t[e]
        else:
            yield name, t


def parse_size(size: int | str, name: str = "size") -> int:
    """5000000000, "5GB", "500MB", "2GiB" -> bytes (at least 1); ValueError naming ``name`` otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(I?B)?\s*", size.upper()) if isinstance(size, str) else None
    if m:
        base = 1024 if m[3] == "IB" else 1000
        nbytes = int(float(m[1]) * base ** " KMGT".index(m[2] or " "))
    else:
        nbytes = int(size) if is_integer(size) else None
    if nbytes is None or nbytes < 1:
        raise ValueError(f"{name} must be a positive number of bytes: an int >= 1 or a string such as '5GB', "
                         f"'500MB', '2GiB', got {size!r}")
    return nbytes


def save_checkpoint(
    model: Dots1ForCausalLM,
    directory: str | os.PathLike,
    shard_size: int | str = "5GB",
    layout: str = "hub",
    dtype: torch.dtype | str | None = None,
) -> list[str]:
    """Writes config.json and safetensors shards (+ index when more than one) in the HF layout.
    Returns the paths of the weight files. One shard's tensors are on the host at a time.

    Crash-safe: the checkpoint is written into a temporary directory next to ``directory`` and swapped
    in by renames once complete, so an interrupted save leaves the previous checkpoint in place (or, in
    the instant between the two renames, in a ``.<name>.old-*`` sibling). Other files in ``directory``
    (a tokenizer, a generation config) are kept; its previous weights, index and config.json are not.
    So an existing ``directory`` must be empty or a Dots1 checkpoint (not the working directory, nothing in
    it mounted from elsewhere); anything else is refused before any file is written."""
    if not isinstance(model, Dots1ForCausalLM):
        raise TypeError(f"save_checkpoint: model must be a dots1_ext Dots1ForCausalLM, got {type(model).__name__}")
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ValueError("save_checkpoint: model has tensors on the meta device (no data to save)")
    raw = os.fspath(directory)
    if not os.fsdecode(raw).strip():  # "" would resolve to the current directory, which the save replaces
        raise ValueError(f"save_checkpoint: directory must be a non-empty path, got {directory!r}")
    directory = os.path.realpath(os.fsdecode(raw))  # a bytes path too (the rest joins str paths)
    dtype = parse_dtype(dtype) or model.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):  # what load_model reads back
        raise ValueError(f"save_checkpoint: dtype must be float32, bfloat16 or float16, got {dtype}")
    limit = parse_size(shard_size, "shard_size")
    for name, m in model.named_modules():
        rng = getattr(m, "expert_range", None)
        if rng is not None and tuple(rng) != (0, model.config.n_routed_experts):
            raise ValueError(f"save_checkpoint: {name} holds only routed experts [{rng[0]}, {rng[1]}) of "
                             f"{model.config.n_routed_experts}; save a model with all of them")

    def out_dtype(key, t):  # the router bias stays fp32, like HF; the int4 tensors keep the format's dtypes
        if key.endswith("e_score_correction_bias") or not t.is_floating_point():
            return t.dtype
        return torch.bfloat16 if _FUSED_EXPERT_KEY.search(key) and key.endswith(".scales") else dtype

    _check_replaceable(directory)
    parent, base = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        os.chmod(tmp, _new_dir_mode(directory))  # mkdtemp's is 0700
        with experts_in_hf_layout(model):  # in place for the duration: no second copy of the experts
            names = _save_shards(model, tmp, limit, layout, dtype, out_dtype)
        if os.path.isdir(directory):
            _link_other_files(directory, tmp)
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.rmdir(old)  # a free name for the rename below
            os.rename(directory, old)
            try:
                os.rename(tmp, directory)
            except BaseException:
                os.rename(old, directory)
                raise
            _move_new_entries(old, directory)  # made in the old directory after the links above
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename; a failed save's leftovers
    return [os.path.join(directory, n) for n in names]


def _check_replaceable(directory: str) -> None:
    """A save swaps in a new directory for ``directory`` and deletes the old one (its other files are
    hard-linked across first), so an existing one must be an empty directory or a Dots1 checkpoint that
    this can replace without touching anything else: not a file, not another kind of directory (a
    project, a home), none of it on another filesystem (rmtree would empty a mount point), and not the
    current working directory or one above it (the process would be left in a deleted directory)."""
    if not os.path.lexists(directory):
        return
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"save_checkpoint: directory {directory!r} exists and is not a directory")
    with contextlib.suppress(OSError):  # no current directory (deleted): nothing to protect
        cwd = os.path.realpath(os.getcwd())
        if os.path.commonpath([cwd, directory]) == directory:
            raise ValueError(f"save_checkpoint: directory {directory!r} is the current working directory or above "
                             "it; a save replaces the directory, which would leave the process in a deleted one")
    if not os.listdir(directory):
        return
    config = os.path.join(directory, CONFIG_NAME)
    try:
        with open(config) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type != "dots1":
        raise FileExistsError(f"save_checkpoint: directory {directory!r} exists and is not a Dots1 checkpoint (no "
                              f"{CONFIG_NAME} with model_type 'dots1'); a save replaces the whole directory, so it "
                              "only writes into a new or empty one or over a checkpoint")
    dev = os.stat(directory).st_dev
    for root, dirs, _ in os.walk(directory):
        for d in dirs:
            path = os.path.join(root, d)
            if not os.path.islink(path) and os.stat(path).st_dev != dev:
                raise ValueError(f"save_checkpoint: {path!r} inside directory {directory!r} is on another filesystem "
                                 "(a mount point); a save replaces the directory and would delete its contents")


def _new_dir_mode(directory: str) -> int:
    """The mode of ``directory`` if it exists, else what os.makedirs would give under the umask."""
    if os.path.isdir(directory):
        return os.stat(directory).st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _is_checkpoint_file(name: str) -> bool:
    """Files a save replaces: config.json, the index, and the weights (model*.safetensors)."""
    return name in (CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME) or (name.startswith("model") and name.endswith(".safetensors"))


def _link_other_files(src: str, dst: str) -> None:
    """Hard-links (copies where links fail) every entry of ``src`` that is not a checkpoint file into ``dst``."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    for entry in os.scandir(src):
        if _is_checkpoint_file(entry.name):
            continue
        target = os.path.join(dst, entry.name)
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, target, symlinks=True, copy_function=link)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        else:
            link(entry.path, target)


def _move_new_entries(old: str, new: str, top: bool = True) -> None:
    """Moves into ``new`` every entry of ``old`` that ``new`` lacks, at every depth, except the old
    checkpoint's own files at the top: files another process made in the directory after
    _link_other_files ran would otherwise be deleted with the old directory. Same filesystem, so these
    are renames."""
    for entry in os.scandir(old):
        if top and _is_checkpoint_file(entry.name):
            continue
        target = os.path.join(new, entry.name)
        if not os.path.lexists(target):
            with contextlib.suppress(OSError):  # best effort: a racing writer may have removed it again
                os.rename(entry.path, target)
        elif entry.is_dir(follow_symlinks=False) and os.path.isdir(target) and not os.path.islink(target):
            _move_new_entries(entry.path, target, top=False)


def _save_shards(model, directory, limit, layout, dtype, out_dtype) -> list[str]:
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    shard_bytes = 0
    for key, t in checkpoint_tensors(model, layout):
        nbytes = t.numel() * out_dtype(key, t).itemsize
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((key, t))
        shard_bytes += nbytes

    config = Dots1Config.from_dict(model.config.to_dict())
    config.torch_dtype = dtype_name(dtype)
    int4 = int4_expert_modules(model)
    metadata = {"format": "pt"}
    if int4:
        config.extra["quantization_config"] = quant.quantization_config(int4[0].symmetric)
        metadata[quant.METADATA_KEY] = quant.metadata_value(int4[0].symmetric)
    else:
        config.extra.pop("quantization_config", None)
    config.save(directory)
    names = [SAFE_WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        # Copies that own their storage: safetensors refuses tensors sharing memory (expert slices).
        tensors = {key: t.detach().to(device="cpu", dtype=out_dtype(key, t), copy=True).contiguous()
                   for key, t in shard}
        save_file(tensors, os.path.join(directory, name), metadata=metadata)
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
        del tensors
    if len(names) > 1:
        with open(os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return names
