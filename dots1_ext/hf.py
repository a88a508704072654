"""Bridge to Hugging Face transformers' Dots1: run a transformers model on the dots1_ext kernels.

Three ways in, all inference-only (the ops have no autograd formulas):

- ``patch_hf_model(model)`` swaps modules of a transformers ``Dots1ForCausalLM`` (or ``Dots1Model``)
  in place, sharing the very same weight tensors (no copies): every ``Dots1RMSNorm`` becomes a
  ``PatchedRMSNorm`` (our ``rms_norm`` op), every ``Dots1MoE`` a ``PatchedMoE`` (our router, permute,
  grouped GEMMs and combine), and every ``Dots1Attention`` a ``PatchedAttention`` whose QK-norm + RoPE
  is our fused ``qk_norm_rope_`` op while transformers' KV cache and attention interface stay in
  charge. ``model.generate`` then runs on our kernels; ``unpatch_hf_model(model)`` restores the
  original modules. The dense ``Dots1MLP`` stays as it is (cuBLAS). ``state_dict`` keys, shapes and
  values are unchanged by either call (the experts' gate_up_proj is stored interleaved while patched,
  and its state_dict entry converted back to the HF layout).
- ``experts_implementation="dots1_ext"``: importing this module registers ``dots1_ext_experts_forward``
  with transformers' experts interface, so any transformers MoE whose experts use
  ``@use_experts_implementation`` (fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``,
  SwiGLU) runs its routed experts through permute -> grouped GEMM (SwiGLU) -> grouped GEMM -> unpermute.
- The modules of ``dots1_ext.modules`` are themselves drop-ins: their parameter names and shapes
  are transformers', so ``load_state_dict`` of an HF module's state dict just works.

The bridge only moves weights and swaps modules: the math is the modules' and the ops' own
(PatchedRMSNorm and PatchedMoE *are* ``dots1_ext.modules`` classes; PatchedAttention is transformers'
attention with its norm + RoPE lines replaced by one op call).

Shape letters: B batch, L new tokens per sequence, T = B*L, H hidden, Hq/Hk heads, D head_dim,
E experts, k experts per token, P rows of the RoPE table.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch import nn

from dots1_ext import modules, reference
from dots1_ext.config import Dots1Config
from dots1_ext.rope import SUPPORTED_ROPE_TYPES, rope_type_of

try:
    from transformers.models.dots1 import modeling_dots1 as hf_dots1
except ImportError as exc:  # pragma: no cover - transformers is a test extra, not a core requirement
    raise ImportError(
        "dots1_ext.hf needs transformers >= 5 with the Dots1 model (pip install 'transformers>=5')"
    ) from exc

try:  # transformers >= 5: pluggable experts implementations
    from transformers.integrations import moe as hf_moe
except ImportError:  # pragma: no cover - older transformers
    hf_moe = None

EXPERTS_IMPLEMENTATION = "dots1_ext"
_PATCH_ATTR = "_dots1_ext_patch"


# -- drop-in modules -------------------------------------------------------------------------------
def _check_no_grad(module: nn.Module, x: torch.Tensor, to_train: str = "unpatch_hf_model(model)") -> None:
    """The ops have no autograd formulas: a backward through them would leave every gradient of the
    patched modules None (torch only warns). A module in training mode says so: in eval mode a forward
    without no_grad (common for inference) runs as before. Host-side flags only, no device sync."""
    if module.training and torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in module.parameters())):
        raise RuntimeError(
            f"dots1_ext: {type(module).__name__} runs dots1_ext ops, which have no autograd (the transformers "
            "bridge is inference-only), but it is in training mode with gradients enabled: call model.eval(), or "
            "run the model under torch.no_grad() or torch.inference_mode() (model.generate does), or freeze it "
            f"with model.requires_grad_(False); to train, {to_train}"
        )


class PatchedRMSNorm(modules.RMSNorm):
    """``dots1_ext.modules.RMSNorm`` standing in for transformers' ``Dots1RMSNorm`` (same ``weight``)."""

    @property
    def variance_epsilon(self) -> float:  # transformers' name for eps
        return self.eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        _check_no_grad(self, x)
        return super().forward(x, residual)

    @classmethod
    def from_hf(cls, hf_norm: nn.Module) -> "PatchedRMSNorm":
        norm = cls(hf_norm.weight.shape[0], hf_norm.variance_epsilon, device="meta", dtype=hf_norm.weight.dtype)
        _share_tensors(hf_norm, norm)
        return norm.train(hf_norm.training)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class PatchedMoE(modules.Dots1MoE):
    """``dots1_ext.modules.Dots1MoE`` standing in for transformers' ``Dots1MoE``: takes [..., H] like it.

    Shares ``gate.weight``, ``gate.e_score_correction_bias``, ``experts.gate_up_proj``,
    ``experts.down_proj`` and ``shared_experts.*`` with the HF module (the shared experts' gate and up
    Parameters become row slices of one packed weight, see ``modules._PacksLinears``). As in transformers,
    ``routed_scaling_factor`` scales the routed weights only; the shared experts' output is added
    unscaled (inside the combine op).
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        _check_no_grad(self, hidden_states)
        shape = hidden_states.shape
        return super().forward(hidden_states.reshape(-1, shape[-1])).view(shape)

    @classmethod
    def from_hf(cls, hf_moe_block: nn.Module, config: Dots1Config | None = None) -> "PatchedMoE":
        config = config or _our_config(hf_moe_block.config)
        moe = cls(config, device="meta", dtype=hf_moe_block.experts.gate_up_proj.dtype)
        if moe.shared_experts is None and getattr(hf_moe_block, "shared_experts", None) is not None:
            moe.shared_experts = hf_moe_block.shared_experts  # n_shared_experts 0: HF keeps an empty MLP
        gate = hf_moe_block.gate
        if gate.e_score_correction_bias.dtype != torch.float32:
            # Our gating reads an fp32 bias; HF adds it to fp32 scores, so the upcast is exact for both.
            gate.e_score_correction_bias = gate.e_score_correction_bias.float()
        _share_tensors(hf_moe_block, moe)
        if isinstance(moe.shared_experts, modules.Dots1MLP):
            # gate/up as one weight, so decode runs the shared experts inside the MoE decode ops. The
            # Parameters stay the HF module's (now slices of the packed tensor), so it still shares them.
            moe.shared_experts.pack_linears_()
        # transformers' child order (experts before gate), so state_dict() lists keys in its order too.
        order = [name for name in hf_moe_block._modules if name in moe._modules]
        moe._modules = {**{name: moe._modules[name] for name in order}, **moe._modules}
        return moe.train(hf_moe_block.training)


def _qk_norm_rope_(*args) -> None:
    # Through modules.ops so that `modules.use_reference_ops()` covers the patched model too.
    impl = getattr(modules.ops, "qk_norm_rope_", None)
    (impl if impl is not None else reference.qk_norm_rope_)(*args)


# The (cos, sin) -> table conversion of the last forward, reused by its other layers (keyed by the
# identity of transformers' cos tensor, held weakly so that no forward's tensors outlive it).
_ROPE_ROWS: dict = {}

# Newer transformers (those whose attention takes `cache`) pass the attention kwargs on to cache.update.
_HF_CACHE_UPDATE_TAKES_KWARGS = "cache" in inspect.signature(hf_dots1.Dots1Attention.forward).parameters


class PatchedAttention(hf_dots1.Dots1Attention):
    """transformers' ``Dots1Attention`` with q_norm / k_norm + RoPE fused into ``qk_norm_rope_``.

    Weights, KV cache (``past_key_values``), attention interface (eager / sdpa / flash) and sliding
    window stay transformers'. The rotation uses the (cos, sin) transformers computed for this forward
    (``position_embeddings``, one row per token), as its own attention does: it covers every RoPE type
    and every position transformers can produce, beyond ``max_position_embeddings`` included, which a
    table sized ahead of time could not without a host synchronisation to check the positions.
    A patched module is the original object with its class swapped (``patch_hf_model``).
    """

    _dots1_ext_eps: float = 1e-6

    def _rope_inputs(self, position_embeddings, batch: int, seq: int):
        """-> (positions [T] int64, cos_sin_cache [P, D] fp32): the rows of this forward's (cos, sin)."""
        cos, sin = position_embeddings  # [B or 1, L, D]: cos/sin of (angles, angles)
        cached = _ROPE_ROWS.get("cos")
        if cached is not None and cached() is cos:  # every layer of one forward gets the same tensors
            return _ROPE_ROWS["rows"].expand(batch, seq).reshape(-1), _ROPE_ROWS["table"]
        half = self.head_dim // 2
        table = torch.cat((cos[..., :half], sin[..., :half]), dim=-1).float().reshape(-1, self.head_dim)
        rows = torch.arange(table.shape[0], device=table.device).view(cos.shape[0], seq)
        _ROPE_ROWS.update(cos=weakref.ref(cos), rows=rows, table=table)
        return rows.expand(batch, seq).reshape(-1), table

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, L, H]
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values=None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        _check_no_grad(self, hidden_states)
        # transformers renamed the KV cache argument past_key_values -> cache (5.2x); take either.
        cache = cache if cache is not None else past_key_values
        input_shape = hidden_states.shape[:-1]
        batch, seq = input_shape
        hidden_shape = (*input_shape, -1, self.head_dim)
        T, D = batch * seq, self.head_dim

        q = self.q_proj(hidden_states).view(T, -1, D)  # [T, Hq, D]
        k = self.k_proj(hidden_states).view(T, -1, D)  # [T, Hk, D]
        positions, cos_sin_cache = self._rope_inputs(position_embeddings, batch, seq)
        _qk_norm_rope_(q, k, self.q_norm.weight, self.k_norm.weight, positions, cos_sin_cache, self._dots1_ext_eps)
        query_states = q.view(hidden_shape).transpose(1, 2)  # [B, Hq, L, D]
        key_states = k.view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        # From here on, transformers' Dots1Attention.forward unchanged.
        if cache is not None:
            if _HF_CACHE_UPDATE_TAKES_KWARGS:
                key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
            else:
                key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
        attention_interface = hf_dots1.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, hf_dots1.eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


# -- patching --------------------------------------------------------------------------------------
def _share_tensors(src: nn.Module, dst: nn.Module) -> None:
    """Points every parameter and buffer of ``dst`` at ``src``'s tensor of the same state_dict key
    (the very same object: no copy). The parameter names must match exactly."""
    src_params = dict(src.named_parameters(remove_duplicate=False))
    dst_params = dict(dst.named_parameters(remove_duplicate=False))
    if set(src_params) != set(dst_params):
        raise ValueError(
            f"dots1_ext: cannot share the weights of {type(src).__name__} with {type(dst).__name__}: "
            f"parameters only in the source {sorted(set(src_params) - set(dst_params))}, "
            f"only in the target {sorted(set(dst_params) - set(src_params))}"
        )
    src_buffers = dict(src.named_buffers(remove_duplicate=False))
    for name, tensor in [*src_params.items(), *((n, b) for n, b in src_buffers.items())]:
        owner_path, _, attr = name.rpartition(".")
        owner = dst.get_submodule(owner_path)
        if attr in owner._parameters or attr in owner._buffers:
            setattr(owner, attr, tensor)
    left = [n for n, t in [*dst.named_parameters(), *dst.named_buffers()]
            if t.is_meta and n not in src_params and n not in src_buffers]
    if left:
        raise ValueError(f"dots1_ext: {type(dst).__name__} has tensors with no counterpart in {type(src).__name__}: {left}")


def _our_config(hf_config) -> Dots1Config:
    d = hf_config.to_dict()
    if not _rope_supported(hf_config):  # the patched model takes RoPE from transformers anyway
        d.pop("rope_parameters", None)
        d.pop("rope_scaling", None)
    return Dots1Config.from_dict(d)


def _check_no_accelerate_hook(module: nn.Module, name: str) -> None:
    if hasattr(module, "_hf_hook"):
        raise NotImplementedError(
            f"dots1_ext: {name} carries an accelerate hook (offloaded or device-mapped at module level); "
            "patch the model before dispatching it, or map whole decoder layers to devices"
        )


def _rope_supported(config) -> bool:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope_type_of(rope) in SUPPORTED_ROPE_TYPES  # the config's own rule for the type


def patch_hf_model(
    model: nn.Module,
    *,
    norms: bool = True,
    moe: bool = True,
    attention: bool = True,
) -> nn.Module:
    """Swaps, in place, the modules of a transformers Dots1 model for ones running dots1_ext ops.

    ``model``: a transformers ``Dots1ForCausalLM`` / ``Dots1Model`` (or any module holding Dots1
    modules). ``norms`` / ``moe`` / ``attention`` choose what to swap. Weights are shared, never
    copied; ``state_dict`` is unchanged. The routed experts' shared ``gate_up_proj`` is repacked in
    place for the fused SwiGLU epilogue (see ``dots1_ext.modules.GateUpLayout``): ``state_dict`` and
    ``load_state_dict`` still speak the HF layout, but the raw tensor holds the interleaved one until
    ``unpatch_hf_model`` restores it.
    Returns ``model``. Patching a patched model is a no-op. Inference only (no autograd): a patched
    module raises RuntimeError when it runs with gradients enabled and its parameters or input require
    grad. Raises TypeError for a ``model`` that is not an nn.Module or a flag that is not a bool, and
    ValueError when the model holds no transformers Dots1 module to swap (nothing would run on our ops).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers Dots1ForCausalLM or Dots1Model), "
                        f"got {type(model).__name__}")
    for flag, value in (("norms", norms), ("moe", moe), ("attention", attention)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool, got {value!r}")
    if hasattr(model, _PATCH_ATTR):
        return model
    record = {"modules": [], "attention": []}  # (parent, attribute name, original module)
    config_cache: dict[int, Dots1Config] = {}

    def ours(hf_config) -> Dots1Config:
        key = id(hf_config)
        if key not in config_cache:
            config_cache[key] = _our_config(hf_config)
        return config_cache[key]

    def replace(parent: nn.Module, attr: str, old: nn.Module, new: nn.Module) -> None:
        for hooks in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                      "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            getattr(new, hooks).update(getattr(old, hooks))
        setattr(parent, attr, new)
        record["modules"].append((parent, attr, old))

    targets = []
    for name, module in model.named_modules():
        if (moe and type(module) is hf_dots1.Dots1MoE) or (norms and type(module) is hf_dots1.Dots1RMSNorm) or (
            attention and type(module) is hf_dots1.Dots1Attention
        ):
            _check_no_accelerate_hook(module, name)
            targets.append((name, module))
    if not targets:
        # Marking it patched anyway would let it run on transformers' (or other) code while is_patched says ours.
        if not (norms or moe or attention):
            raise ValueError("norms, moe and attention are all False: patch_hf_model has nothing to swap")
        raise ValueError(
            f"model: this {type(model).__name__} holds no transformers Dots1 module to patch (Dots1RMSNorm, "
            "Dots1MoE or Dots1Attention of transformers.models.dots1, not yet patched); patch_hf_model takes a "
            "transformers Dots1ForCausalLM or Dots1Model (dots1_ext's own Dots1ForCausalLM runs on the "
            "dots1_ext ops already)"
        )

    for name, module in targets:
        if isinstance(module, hf_dots1.Dots1Attention):
            module.__class__ = PatchedAttention
            module._dots1_ext_eps = float(module.q_norm.variance_epsilon)
            record["attention"].append(module)
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(module, hf_dots1.Dots1MoE):
            patched = PatchedMoE.from_hf(module, ours(module.config))
            patched.experts.interleave_gate_up_()  # in place, for the fused SwiGLU; undone by unpatch
            replace(parent, attr, module, patched)
        else:
            replace(parent, attr, module, PatchedRMSNorm.from_hf(module))
    object.__setattr__(model, _PATCH_ATTR, record)
    return model


def unpatch_hf_model(model: nn.Module) -> nn.Module:
    """Restores the transformers modules replaced by ``patch_hf_model`` (sharing the current tensors,
    so weights moved or loaded while patched stay). Returns ``model``; a no-op if not patched."""
    record = getattr(model, _PATCH_ATTR, None)
    if record is None:
        return model
    for parent, attr, original in reversed(record["modules"]):
        patched = getattr(parent, attr)
        if isinstance(patched, PatchedMoE):
            patched.experts.deinterleave_gate_up_()
        _share_tensors(patched, original)
        original.train(patched.training)
        setattr(parent, attr, original)
    for module in record["attention"]:
        module.__dict__.pop("_dots1_ext_eps", None)
        module.__class__ = hf_dots1.Dots1Attention
    object.__delattr__(model, _PATCH_ATTR)
    return model


def is_patched(model: nn.Module) -> bool:
    return hasattr(model, _PATCH_ATTR)


patch = patch_hf_model
unpatch = unpatch_hf_model


# -- experts implementation ------------------------------------------------------------------------
def _experts_supported(experts: nn.Module) -> bool:
    """Our kernels cover concatenated [gate; up] SwiGLU experts in HF layout without bias."""
    act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
    default_gate = hf_moe is not None and getattr(type(experts), "_apply_gate", None) is hf_moe._default_apply_gate
    return (
        getattr(experts, "has_gate", True)
        and not getattr(experts, "has_bias", False)
        and not getattr(experts, "is_transposed", False)
        and getattr(experts, "is_concatenated", True)
        and not getattr(experts, "_is_expert_parallel", False)
        and default_gate
        and act in ("silu", "swish")
    )


def dots1_ext_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, k] int64 (HF routers), any integer dtype
    top_k_weights: torch.Tensor,  # [T, k]
) -> torch.Tensor:  # [T, H]
    """transformers experts forward on dots1_ext ops: permute -> grouped GEMM (SwiGLU) -> grouped GEMM ->
    weighted combine (fp32, fixed order). Experts outside what the kernels cover (bias, transposed or
    interleaved weights, custom gates, expert parallelism) run transformers' grouped_mm instead."""
    if not _experts_supported(self):
        return hf_moe.grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    _check_no_grad(self, hidden_states, "use another experts implementation (set_experts_implementation)")
    ops = modules.ops
    gate_up = self.gate_up_proj  # [E, 2I, H]
    x = hidden_states.to(gate_up.dtype)
    permuted, offsets, row_map = ops.permute(x, top_k_index.to(torch.int32), gate_up.shape[0])
    act = ops.grouped_gemm(permuted, gate_up, offsets, "swiglu")  # [T*k, I]
    expert_out = ops.grouped_gemm(act, self.down_proj, offsets, "none")  # [T*k, H]
    return ops.unpermute(expert_out, row_map, top_k_weights.to(torch.float32)).to(hidden_states.dtype)


def register_experts_implementation(name: str = EXPERTS_IMPLEMENTATION) -> bool:
    """Registers ``dots1_ext_experts_forward`` as transformers experts implementation ``name`` (done
    on import). Returns False when the installed transformers has no experts interface."""
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if hf_moe is None or not hasattr(hf_moe, "ALL_EXPERTS_FUNCTIONS"):
        return False
    hf_moe.ALL_EXPERTS_FUNCTIONS.register(name, dots1_ext_experts_forward)
    return True


EXPERTS_IMPLEMENTATION_REGISTERED = register_experts_implementation()

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "PatchedAttention",
    "PatchedMoE",
    "PatchedRMSNorm",
    "dots1_ext_experts_forward",
    "is_patched",
    "patch",
    "patch_hf_model",
    "register_experts_implementation",
    "unpatch",
    "unpatch_hf_model",
]
