"""Two-layer feed-forward block: ``fc2(gelu(fc1(x)))`` with the fc1 bias fused into the GELU."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .linear import Linear

# config activation name -> ops.bias_gelu approximation
GELU_FORMS = {"gelu": "none", "gelu_tanh": "tanh"}


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str, device=None):
        super().__init__()
        self.fc1 = Linear(dim, hidden, device=device)
        self.fc2 = Linear(hidden, dim, device=device)
        self.approximate = GELU_FORMS[activation]
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ops.bias_gelu(ops.linear(x, self.fc1.weight, None), self.fc1.bias, self.approximate)
        return self.fc2(h)
