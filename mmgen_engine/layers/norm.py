"""LayerNorm and RMSNorm blocks holding their parameters; math in :mod:`mmgen_engine.ops.norm`."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(dim, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(x + residual), x + residual)`` in one fused op."""
        return ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm (LLaMA) holding its weight; math in :func:`mmgen_engine.ops.rms_norm`."""

    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)
