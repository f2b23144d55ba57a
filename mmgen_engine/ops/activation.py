"""Fused bias + GELU: ``out = gelu(x + bias)``.

``approximate="none"`` is the exact form ``0.5 x (1 + erf(x / sqrt 2))`` (ViT's "gelu");
``approximate="tanh"`` is ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (GPT-2's "gelu_new");
``approximate="sigmoid"`` is ``x sigmoid(1.702 x)`` (Hendrycks & Gimpel's sigmoid form, OpenAI
CLIP's "quick_gelu"). Math in fp32 for the sigmoid form.

Gated GELU: ``gelu_mul(x) = gelu(x[..., :H]) * x[..., H:]`` for ``x [..., 2H]`` (the exact erf
GELU; the GLU feed-forward of min-dalle's BART, whose two input projections are fused into one
``[2H, D]`` product). Math in fp32.

Fused bias + ReLU: ``bias_relu(x, bias) = max(x + bias, 0)`` in x's dtype (OPT's feed-forward); the
add in fp32 (as torch adds half-precision tensors), rounded once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import TRITON_DEVICES, dispatch, register, register_lazy

APPROXIMATIONS = ("none", "tanh", "sigmoid")


@register("bias_gelu", "reference")
def bias_gelu_reference(x, bias, approximate):
    if approximate == "sigmoid":
        h = (x + bias).float()
        return (h * torch.sigmoid(1.702 * h)).to(x.dtype)
    return F.gelu(x + bias, approximate=approximate)


register_lazy("bias_gelu", "triton", "mmgen_engine.kernels.activation:bias_gelu", TRITON_DEVICES)


@register("gelu_mul", "reference")
def gelu_mul_reference(x):
    a, b = x.float().chunk(2, dim=-1)
    return (F.gelu(a) * b).to(x.dtype)


register_lazy("gelu_mul", "triton", "mmgen_engine.kernels.activation:gelu_mul", TRITON_DEVICES)


@register("bias_relu", "reference")
def bias_relu_reference(x, bias):
    return torch.relu(x + bias).to(x.dtype)


register_lazy("bias_relu", "triton", "mmgen_engine.kernels.activation:bias_relu", TRITON_DEVICES)


def bias_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """ReLU of ``x [..., N] + bias [N]``."""
    if bias.dim() != 1 or bias.shape[0] != x.shape[-1]:
        raise ValueError(f"bias must have shape ({x.shape[-1]},), got {tuple(bias.shape)}")
    return dispatch("bias_relu", x)(x, bias)


def gelu_mul(x: torch.Tensor) -> torch.Tensor:
    """``gelu(a) * b`` where ``a, b = x.chunk(2, -1)``; ``x [..., 2H]`` -> ``[..., H]``."""
    if x.shape[-1] % 2:
        raise ValueError(f"gelu_mul needs an even last dimension, got {x.shape[-1]}")
    return dispatch("gelu_mul", x)(x)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    """GELU of ``x [..., N] + bias [N]``."""
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    return dispatch("bias_gelu", x)(x, bias, approximate)
