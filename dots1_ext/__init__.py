"""dots1_ext: fast dots.llm1 (Dots1) Mixture-of-Experts inference for PyTorch on NVIDIA Hopper."""

from dots1_ext import ops
from dots1_ext.config import Dots1Config
from dots1_ext.loader import load_model, save_checkpoint
from dots1_ext.model import Dots1ForCausalLM, reference_ops
from dots1_ext.rope import build_cos_sin_cache

__version__ = "0.1.0"
__all__ = [
    "ops",
    "build_cos_sin_cache",
    "Dots1Config",
    "Dots1ForCausalLM",
    "load_model",
    "save_checkpoint",
    "reference_ops",
    "patch_hf_model",
    "unpatch_hf_model",
    "__version__",
]


def __getattr__(name: str):
    # The HF bridge imports transformers (an optional extra): load it only when asked for.
    if name in ("patch_hf_model", "unpatch_hf_model"):
        from dots1_ext import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'dots1_ext' has no attribute {name!r}")
