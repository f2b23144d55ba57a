"""Fused bias + GELU: ``out = gelu(x + bias)``.

``approximate="none"`` is the exact form ``0.5 x (1 + erf(x / sqrt 2))`` (ViT's "gelu");
``approximate="tanh"`` is ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (GPT-2's "gelu_new").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import TRITON_DEVICES, dispatch, register, register_lazy

APPROXIMATIONS = ("none", "tanh")


@register("bias_gelu", "reference")
def bias_gelu_reference(x, bias, approximate):
    return F.gelu(x + bias, approximate=approximate)


register_lazy("bias_gelu", "triton", "mmgen_engine.kernels.activation:bias_gelu", TRITON_DEVICES)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    """GELU of ``x [..., N] + bias [N]``."""
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    return dispatch("bias_gelu", x)(x, bias, approximate)
