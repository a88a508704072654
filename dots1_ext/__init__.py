"""dots1_ext: fast dots.llm1 (Dots1) Mixture-of-Experts inference for PyTorch on NVIDIA Hopper."""

from dots1_ext import ops
from dots1_ext.rope import build_cos_sin_cache

__version__ = "0.1.0"
__all__ = ["ops", "build_cos_sin_cache", "__version__"]
