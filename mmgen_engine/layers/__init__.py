"""Shared building blocks of every model family; each calls :mod:`mmgen_engine.ops`."""
from .attention import CrossAttention, SelfAttention, merge_heads, split_heads
from .block import EncoderBlock
from .conv1d import Conv1d
from .linear import Linear
from .mlp import GLU, MLP
from .norm import LayerNorm

__all__ = [
    "Conv1d",
    "CrossAttention",
    "EncoderBlock",
    "GLU",
    "LayerNorm",
    "Linear",
    "MLP",
    "SelfAttention",
    "merge_heads",
    "split_heads",
]
