"""1-D convolution over channels-last sequences as one :func:`mmgen_engine.ops.linear` product.

``x [B, T, Cin]`` -> ``[B, T_out, Cout]`` with kernel ``k``, ``stride``, ``dilation`` and zero
``padding`` on both ends, ``T_out = (T + 2 padding - dilation (k - 1) - 1) // stride + 1``:
``y[b, t] = bias + sum_j W_j x[b, t stride + j dilation - padding]``. The ``k`` shifted views of
the padded input are laid side by side (im2col, ``[B, T_out, k Cin]``) and multiplied by the weight
stored tap-major, ``[Cout, k Cin]`` (torch's ``[Cout, Cin, k]`` permuted to ``[Cout, k, Cin]``), so
the convolution runs on whatever backend ``linear`` has. The sequences here are short (a window of
audio or motion), so the k-fold copy is small.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


def tap_major(weight: torch.Tensor) -> torch.Tensor:
    """torch's Conv1d weight ``[Cout, Cin, k]`` -> this layer's ``[Cout, k * Cin]``."""
    return weight.permute(0, 2, 1).reshape(weight.shape[0], -1)


class Conv1d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1,
                 device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, kernel * cin, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(cout, device=device), requires_grad=False)
        self.kernel, self.stride, self.padding, self.dilation = kernel, stride, padding, dilation

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """The im2col matrix ``[B, T_out, k Cin]`` of ``x [B, T, Cin]``."""
        if self.padding:
            x = F.pad(x, (0, 0, self.padding, self.padding))
        span = self.dilation * (self.kernel - 1)
        steps = (x.shape[1] - span - 1) // self.stride + 1
        taps = [x[:, j * self.dilation: j * self.dilation + self.stride * (steps - 1) + 1: self.stride]
                for j in range(self.kernel)]
        return taps[0] if self.kernel == 1 else torch.cat(taps, dim=-1)

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        """The convolution of ``x [B, T, Cin]``, followed by an exact GELU fused with the bias when ``gelu``."""
        cols = self.columns(x)
        if gelu:
            return ops.bias_gelu(ops.linear(cols, self.weight, None), self.bias, "none")
        return ops.linear(cols, self.weight, self.bias)
