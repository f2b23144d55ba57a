"""Feed-forward blocks.

``MLP``: ``fc2(act(fc1(x)))`` with the fc1 bias fused into the activation: a GELU (GPT-2, ViT) or
ReLU (OPT).
``GLU``: min-dalle's gated block ``fc2(ln1(gelu(fc0(x)) * fc1(x)))``, bias-free, with ``fc0`` and
``fc1`` fused into one ``fc01 [2H, D]`` product (rows of fc0, then fc1). Its input LayerNorm ``ln0``
is held here but applied by the caller, which fuses it with the residual add.
``SwiGLU``: LLaMA's ``down(silu(gate(x)) * up(x))``, with ``gate`` and ``up`` fused into one
``gate_up [2H, D]`` product (rows of gate, then up); biases only with ``bias`` (``mlp_bias``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .linear import Linear
from .norm import LayerNorm

# config activation name -> ops.bias_gelu approximation
GELU_FORMS = {"gelu": "none", "gelu_tanh": "tanh", "quick_gelu": "sigmoid"}


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str, device=None):
        super().__init__()
        self.fc1 = Linear(dim, hidden, device=device)
        self.fc2 = Linear(hidden, dim, device=device)
        self.approximate = None if activation == "relu" else GELU_FORMS[activation]  # None: ReLU
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ops.linear(x, self.fc1.op_weight, None)
        if self.approximate is None:
            return self.fc2(ops.bias_relu(h, self.fc1.bias))
        return self.fc2(ops.bias_gelu(h, self.fc1.bias, self.approximate))


class GLU(nn.Module):
    def __init__(self, dim: int, hidden: int, eps: float, device=None):
        super().__init__()
        self.ln0 = LayerNorm(dim, eps, device)
        self.fc01 = Linear(dim, 2 * hidden, bias=False, device=device)
        self.ln1 = LayerNorm(hidden, eps, device)
        self.fc2 = Linear(hidden, dim, bias=False, device=device)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block on ``x`` already normalized by ``ln0``."""
        return self.fc2(self.ln1(ops.gelu_mul(self.fc01(x))))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False, device=None):
        super().__init__()
        self.gate_up = Linear(dim, 2 * hidden, bias=bias, device=device)
        self.down = Linear(hidden, dim, bias=bias, device=device)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)  # in x's dtype, as transformers' LlamaMLP
