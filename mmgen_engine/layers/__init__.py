"""Shared building blocks of every model family; each calls :mod:`mmgen_engine.ops`."""
from .attention import CrossAttention, GroupedQueryAttention, SelfAttention, merge_heads, split_heads
from .block import EncoderBlock
from .conv1d import Conv1d
from .linear import Linear, QuantizedLinear, quantize_linears
from .mlp import GLU, MLP, SwiGLU
from .norm import LayerNorm, RMSNorm
from .rotary import RotaryTable

__all__ = [
    "Conv1d",
    "CrossAttention",
    "EncoderBlock",
    "GLU",
    "GroupedQueryAttention",
    "LayerNorm",
    "Linear",
    "MLP",
    "QuantizedLinear",
    "RMSNorm",
    "RotaryTable",
    "SelfAttention",
    "SwiGLU",
    "merge_heads",
    "quantize_linears",
    "split_heads",
]
