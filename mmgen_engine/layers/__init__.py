"""Shared building blocks of every model family; each calls :mod:`mmgen_engine.ops`."""
from .attention import CrossAttention, SelfAttention, merge_heads, split_heads
from .linear import Linear
from .mlp import GLU, MLP
from .norm import LayerNorm

__all__ = ["CrossAttention", "GLU", "LayerNorm", "Linear", "MLP", "SelfAttention", "merge_heads", "split_heads"]
