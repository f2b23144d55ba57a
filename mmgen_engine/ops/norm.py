"""Layer normalization ops.

``layer_norm``:      ``out = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias`` over the last dim.
``add_layer_norm``:  ``h = x + residual; return layer_norm(h), h`` (the pre-LN transformer step:
                     one read of both inputs, one write of each output when fused).
``rms_norm``:        ``out = (x / sqrt(mean(x^2) + eps)).to(x.dtype) * weight`` over the last dim, the
                     statistics in fp32 (transformers' ``LlamaRMSNorm``: the normalized row is rounded
                     to x's dtype before the weight multiplies it); output in x's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import CUDA_DEVICES, HALF_DTYPES, TRITON_DEVICES, dispatch, register, register_lazy


@register("layer_norm", "reference")
def layer_norm_reference(x, weight, bias, eps):
    # statistics in fp32: fp16/bf16 variance of wide rows loses digits.
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


@register("add_layer_norm", "reference")
def add_layer_norm_reference(x, residual, weight, bias, eps):
    h = x + residual
    return layer_norm_reference(h, weight, bias, eps), h


@register("rms_norm", "reference")
def rms_norm_reference(x, weight, eps):
    h = x.float()
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight * h).to(x.dtype)


register_lazy("rms_norm", "triton", "mmgen_engine.kernels.norm:rms_norm", TRITON_DEVICES)
register_lazy("layer_norm", "triton", "mmgen_engine.kernels.norm:layer_norm", TRITON_DEVICES)
register_lazy("add_layer_norm", "triton", "mmgen_engine.kernels.norm:add_layer_norm", TRITON_DEVICES)
register_lazy("layer_norm", "cuda", "mmgen_engine.ops.cuda_ops:layer_norm", CUDA_DEVICES, HALF_DTYPES)
register_lazy("add_layer_norm", "cuda", "mmgen_engine.ops.cuda_ops:add_layer_norm", CUDA_DEVICES, HALF_DTYPES)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm of ``x [..., D]`` with ``weight, bias [D]``."""
    return dispatch("layer_norm", x)(x, weight, bias, eps)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer_norm(x + residual), x + residual)`` for ``x, residual [..., D]``."""
    return dispatch("add_layer_norm", x)(x, residual, weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x [..., D]`` with ``weight [D]`` -> x's shape and dtype (see the module docstring)."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight must have shape {tuple(x.shape[-1:])}, got {tuple(weight.shape)}")
    return dispatch("rms_norm", x)(x, weight, eps)
