"""Shared building blocks of every model family; each calls :mod:`mmgen_engine.ops`."""
from .attention import CrossAttention, SelfAttention, merge_heads, split_heads
from .mlp import MLP
from .norm import LayerNorm

__all__ = ["CrossAttention", "LayerNorm", "MLP", "SelfAttention", "merge_heads", "split_heads"]
