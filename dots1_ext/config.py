"""Dots1Config: the model hyper-parameters, read from and written to a Hugging Face ``config.json``.

Missing keys take the defaults of transformers' ``Dots1Config`` so that a checkpoint means the same
thing here and there; ``dots1_real_config()`` gives the dimensions of dots.llm1 (docs/design.md §2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import torch

from dots1_ext.ops import dispatch as _dispatch_op
from dots1_ext.ops import gating as _gating_op
from dots1_ext.rope import check_rope_scaling, rope_type_of

CONFIG_NAME = "config.json"
MODEL_TYPE = "dots1"  # transformers' Dots1Config.model_type, and what dots.llm1's config.json carries
LAYER_TYPES = ("full_attention", "sliding_attention")
# The kernels' limits (csrc/gating/gating.h kGatingMaxExperts / kGatingMaxTopk, csrc/dispatch/dispatch.h
# kPermuteMaxExperts), as the op wrappers define them.
MAX_EXPERTS = min(_gating_op.MAX_EXPERTS, _dispatch_op.MAX_EXPERTS)
MAX_TOPK = _gating_op.MAX_TOPK

# field -> (type, lower bound, may be null). Float bounds: ">0" or ">=0". Null fields that have a
# default meaning (num_key_value_heads, n_group, topk_group, ...) are filled in before the check.
_FIELD_RULES = {
    "vocab_size": (int, 1, False),
    "hidden_size": (int, 1, False),
    "intermediate_size": (int, 0, False),  # >= 1 when a layer is dense (validate)
    "moe_intermediate_size": (int, 0, False),  # >= 1 when a layer is MoE (validate)
    "num_hidden_layers": (int, 1, False),
    "num_attention_heads": (int, 1, False),
    "num_key_value_heads": (int, 1, False),
    "head_dim": (int, 1, True),
    "n_routed_experts": (int, 1, True),
    "n_shared_experts": (int, 0, False),
    "num_experts_per_tok": (int, 1, True),
    "n_group": (int, 1, False),
    "topk_group": (int, 1, False),
    "first_k_dense_replace": (int, 0, False),
    "max_position_embeddings": (int, 1, False),
    "sliding_window": (int, 1, True),
    "max_window_layers": (int, 0, True),
    "rms_norm_eps": (float, ">0", False),
    "rope_theta": (float, ">0", False),
    "routed_scaling_factor": (float, ">0", False),
    "initializer_range": (float, ">=0", False),
    "norm_topk_prob": (bool, None, False),
    "attention_bias": (bool, None, False),
    "tie_word_embeddings": (bool, None, False),
}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """"bf16" / "bfloat16" / "torch.bfloat16" / torch.bfloat16 -> torch.bfloat16 (None stays None)."""
    if value is None:
        return value
    if isinstance(value, torch.dtype):
        if value in _DTYPES.values():
            return value
        raise ValueError(f"unsupported dtype {value!r} (supported: float32, bfloat16, float16)")
    key = str(value).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {value!r} (supported: float32, bfloat16, float16)")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Dots1Config:
    vocab_size: int = 152064
    hidden_size: int = 4608
    intermediate_size: int = 10944  # dense-layer MLP
    moe_intermediate_size: int = 1408  # one routed expert
    num_hidden_layers: int = 62
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: = num_attention_heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    n_group: int | None = 1  # null in some configs: one group
    topk_group: int | None = 1
    first_k_dense_replace: int = 0  # layers [0, first_k_dense_replace) are dense, the rest MoE
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope_parameters / rope_scaling; None = plain RoPE
    attention_bias: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int | None = 62
    layer_types: list[str] | None = None  # None: derived with the HF rule in __post_init__
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # the checkpoint's dtype, e.g. "bfloat16"
    initializer_range: float = 0.02
    extra: dict = field(default_factory=dict, repr=False)  # keys we do not use, kept for round trips

    def __post_init__(self):
        # null in a config.json means the default; 0 is not null, and is rejected by validate().
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.n_group is None:
            self.n_group = 1
        if self.topk_group is None:
            self.topk_group = 1
        if self.first_k_dense_replace is None:
            self.first_k_dense_replace = 0
        if self.n_shared_experts is None:
            self.n_shared_experts = 0
        if isinstance(self.rope_scaling, dict) and "rope_theta" in self.rope_scaling:
            # transformers takes rope_parameters' rope_theta over a rope_theta given next to it; one field holds it.
            self.rope_scaling = dict(self.rope_scaling)
            theta = self.rope_scaling.pop("rope_theta")
            if theta is not None:
                self.rope_theta = theta
        self._check_types_and_ranges()  # before anything below divides by or iterates over a field
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
            if self.head_dim < 2 or self.head_dim % 2:
                raise ValueError(f"Dots1Config: head_dim (null: hidden_size // num_attention_heads) must be a positive "
                                 f"even number for RoPE, got {self.head_dim} (hidden_size={self.hidden_size}, "
                                 f"num_attention_heads={self.num_attention_heads})")
        if self.layer_types is None:
            # transformers' rule: sliding from layer max_window_layers on, when a window is set.
            self.layer_types = [
                "sliding_attention"
                if self.sliding_window is not None and i >= (self.max_window_layers or 0)
                else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        self.layer_types = list(self.layer_types)
        if self.torch_dtype is not None:
            try:
                self.torch_dtype = dtype_name(parse_dtype(self.torch_dtype))
            except ValueError as e:
                raise ValueError(f"Dots1Config: torch_dtype: {e}") from None
        self.validate()

    def _check_types_and_ranges(self) -> None:
        """Each field on its own: type and range, naming the field and the value."""
        for name, (kind, low, optional) in _FIELD_RULES.items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            if kind is int:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
                want = f"an integer >= {low}"
            elif kind is float:
                ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                      and (value > 0 if low == ">0" else value >= 0))
                want = "a finite number > 0" if low == ">0" else "a finite number >= 0"
            else:  # bool
                ok = isinstance(value, bool)
                want = "true or false"
            if not ok:
                raise ValueError(f"Dots1Config: {name} must be {want}{' (or null)' if optional else ''}, got {value!r}")

    def validate(self) -> None:
        """Every field, alone and against the others, and the kernels' limits; raises ValueError naming
        the field and its value. Called on construction (so on every config read)."""
        def bad(msg):
            raise ValueError(f"Dots1Config: {msg}")

        self._check_types_and_ranges()
        if self.hidden_act != "silu":
            bad(f"hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim < 2 or self.head_dim % 2:
            bad(f"head_dim must be a positive even number for RoPE, got {self.head_dim} "
                f"(hidden_size={self.hidden_size}, num_attention_heads={self.num_attention_heads})")
        if min(self.first_k_dense_replace, self.num_hidden_layers) and self.intermediate_size < 1:
            bad(f"intermediate_size must be >= 1 (layers [0, {self.first_k_dense_replace}) are dense), "
                f"got {self.intermediate_size}")
        if not isinstance(self.layer_types, (list, tuple)):
            bad(f"layer_types must be a list of strings, got {self.layer_types!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            bad(f"layer_types={self.layer_types!r} has {len(self.layer_types)} entries for "
                f"num_hidden_layers={self.num_hidden_layers}")
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                bad(f"layer_types[{i}]: unknown layer type {t!r} (supported: {', '.join(LAYER_TYPES)})")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            bad("a layer is 'sliding_attention' but sliding_window is not set")
        if self.num_moe_layers:
            E, k = self.n_routed_experts, self.num_experts_per_tok
            if E is None or k is None or self.moe_intermediate_size < 1:
                bad(f"MoE layers (from first_k_dense_replace={self.first_k_dense_replace} on) need n_routed_experts, "
                    f"num_experts_per_tok and moe_intermediate_size >= 1, got {E}, {k}, {self.moe_intermediate_size}")
            if E > MAX_EXPERTS:
                bad(f"n_routed_experts={E} exceeds the kernels' limit of {MAX_EXPERTS} experts")
            if k > min(E, MAX_TOPK):
                bad(f"num_experts_per_tok={k} must be <= min(n_routed_experts={E}, {MAX_TOPK}) (the kernels' top-k limit)")
            if E % self.n_group:
                bad(f"n_routed_experts={E} is not a multiple of n_group={self.n_group}")
            if self.topk_group > self.n_group:
                bad(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            if k > self.topk_group * (E // self.n_group):
                bad(f"num_experts_per_tok={k} exceeds the experts of the kept groups "
                    f"(topk_group={self.topk_group} x {E // self.n_group} experts per group)")
        for name in ("bos_token_id", "pad_token_id"):
            self._check_token_id(name, getattr(self, name))
        eos = self.eos_token_id
        for i, t in enumerate(eos if isinstance(eos, list) else [eos]):
            self._check_token_id("eos_token_id" if not isinstance(eos, list) else f"eos_token_id[{i}]", t)
        self._check_rope(self.rope_scaling)
        if not isinstance(self.extra, dict):
            bad(f"extra must be a dict, got {self.extra!r}")

    @staticmethod
    def _check_rope(rope_scaling) -> None:
        try:
            check_rope_scaling(rope_scaling)
        except NotImplementedError as e:
            raise NotImplementedError(f"Dots1Config: {e}") from None
        except ValueError as e:
            raise ValueError(f"Dots1Config: {e}") from None

    def _check_token_id(self, name: str, value) -> None:
        if value is None:
            return
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
            raise ValueError(f"Dots1Config: {name} must be a token id in [0, vocab_size={self.vocab_size}) "
                             f"(or null), got {value!r}")

    # -- derived -------------------------------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace

    def window(self, i: int) -> int | None:
        """The sliding window of layer i, or None for full attention."""
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else None

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    # -- json ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "Dots1Config":
        if not isinstance(d, dict):
            raise TypeError(f"Dots1Config.from_dict: expected a dict, got {type(d).__name__}")
        d = dict(d)
        model_type = d.pop("model_type", None)
        if model_type is not None and model_type != MODEL_TYPE:
            raise ValueError(f"Dots1Config: model_type must be {MODEL_TYPE!r} (or absent), got {model_type!r}")
        d.pop("architectures", None)
        for name in ("rope_parameters", "rope_scaling"):
            if d.get(name) is not None and not isinstance(d[name], dict):
                raise ValueError(f"Dots1Config: {name} must be a dict (or null), got {d[name]!r}")
        # transformers 5 (convert_rope_params_to_dict): a non-empty rope_scaling (4.x) replaces rope_parameters
        # whole; rope_theta and partial_rotary_factor at the top level only fill what the dict lacks.
        rope = d.pop("rope_scaling", None) or d.pop("rope_parameters", None)
        d.pop("rope_parameters", None)
        rope = dict(rope) if rope else {}
        theta = rope.pop("rope_theta", None)
        if theta is None:
            theta = d.get("rope_theta")
        d["rope_theta"] = theta if theta is not None else 10000.0
        partial = d.pop("partial_rotary_factor", None)
        if partial is not None:
            rope.setdefault("partial_rotary_factor", partial)
        cls._check_rope(rope)  # before a "default" dict is dropped with whatever it holds
        d["rope_scaling"] = rope if rope_type_of(rope) != "default" else None
        if "dtype" in d and "torch_dtype" not in d:  # transformers 5 writes "dtype"
            d["torch_dtype"] = d.pop("dtype")
        if "num_local_experts" in d and d.get("n_routed_experts") is None:
            d["n_routed_experts"] = d.pop("num_local_experts")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "Dots1Config":
        """Errors name the file: ValueError for invalid JSON or an invalid field, NotImplementedError for
        an unsupported feature (FileNotFoundError when there is no file)."""
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON: {e}") from None
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not a UTF-8 JSON file: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except NotImplementedError as e:
            raise NotImplementedError(f"{path}: {e}") from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "Dots1Config":
        return cls.from_json_file(os.path.join(directory, CONFIG_NAME))

    def to_dict(self) -> dict:
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        d.pop("rope_scaling")
        rope = self.rope_scaling or {}
        # rope_type spelled out: a 4.x dict has only "type", and a "rope_type" default next to it would win on reading.
        d["rope_parameters"] = {**rope, "rope_type": rope_type_of(rope), "rope_theta": self.rope_theta}
        d["model_type"] = MODEL_TYPE
        d["architectures"] = ["Dots1ForCausalLM"]
        return d

    def save(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path


def dots1_real_config(num_layers: int = 62) -> Dots1Config:
    """dots.llm1 dimensions (docs/design.md §2) with ``num_layers`` layers (layer 0 dense)."""
    return Dots1Config(
        vocab_size=152064, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=num_layers, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
        n_routed_experts=128, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e7, sliding_window=None,
        max_window_layers=62, eos_token_id=151649, torch_dtype="bfloat16",
    )
