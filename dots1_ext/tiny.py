"""A small random-weight Dots1 checkpoint in the hub layout, made once and cached.

It exercises every feature of the architecture at toy size: a dense first layer, MoE layers with
group-limited routing and a nonzero e_score_correction_bias, shared experts, GQA, a sliding-window
layer, and a sharded bf16 checkpoint with experts stored one by one.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

from dots1_ext.config import Dots1Config
from dots1_ext.loader import SAFE_WEIGHTS_INDEX_NAME, save_checkpoint
from dots1_ext.model import build_random_model

TINY_VERSION = 1  # bump when the recipe changes, so stale caches are not reused


def tiny_config() -> Dots1Config:
    return Dots1Config(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4, n_group=4, topk_group=2,
        first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=1e6,
        sliding_window=16, layer_types=["full_attention", "full_attention", "sliding_attention", "full_attention"],
        bos_token_id=1, eos_token_id=2, pad_token_id=0, torch_dtype="bfloat16",
    )


def cache_dir() -> str:
    root = os.environ.get("DOTS1_EXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dots1_ext")
    return os.path.join(root, f"tiny-dots1-v{TINY_VERSION}")


def tiny_checkpoint_exists(directory: str | None = None) -> bool:
    return os.path.exists(os.path.join(directory or cache_dir(), SAFE_WEIGHTS_INDEX_NAME))


def make_tiny_checkpoint(directory: str | None = None, seed: int = 0) -> str:
    """Writes the tiny checkpoint (bf16, hub layout, several shards) unless it already exists; returns its path."""
    directory = directory or cache_dir()
    if tiny_checkpoint_exists(directory):
        return directory
    model = build_random_model(tiny_config(), device="cpu", dtype=torch.float32, seed=seed)
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    # Written next to its final place and renamed, so an interrupted run never leaves half a checkpoint.
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        save_checkpoint(model, tmp, shard_size="4MB", layout="hub", dtype=torch.bfloat16)
        try:
            os.rename(tmp, directory)
        except OSError:  # another process finished first
            if not os.path.exists(os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
