"""Ops: every op is a plain-torch reference (the spec) plus faster backends, chosen by one table.

See :mod:`mmgen_engine.ops.registry` for how an implementation is chosen and each op's module
docstring for its math.
"""
from .activation import bias_gelu, bias_relu, gelu_mul
from .attention import attention, decode_attention
from .conv import conv2d, group_norm
from .embedding import embedding, token_gather
from .linear import linear
from .norm import add_layer_norm, layer_norm, rms_norm
from .penalties import penalize
from .quant import Int8Weight, dequantize_int8, quantize_int8
from .registry import BackendError, available_backends, forced_backend
from .rotary import rotary
from .sampling import sample

__all__ = [
    "add_layer_norm",
    "attention",
    "available_backends",
    "BackendError",
    "bias_gelu",
    "bias_relu",
    "conv2d",
    "decode_attention",
    "dequantize_int8",
    "embedding",
    "forced_backend",
    "gelu_mul",
    "group_norm",
    "Int8Weight",
    "layer_norm",
    "linear",
    "penalize",
    "quantize_int8",
    "rms_norm",
    "rotary",
    "sample",
    "token_gather",
]
