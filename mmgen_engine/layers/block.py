"""Pre-LayerNorm transformer encoder block (ViT, CLIP, the a2g-gpt audio encoder):
``h = h + attn(ln1(h)); h = h + mlp(ln2(h))``, bidirectional attention."""
from __future__ import annotations

import math

import torch
from torch import nn

from .attention import SelfAttention
from .mlp import MLP
from .norm import LayerNorm


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, eps: float, activation: str, qkv_bias: bool = True,
                 device=None):
        super().__init__()
        self.ln1 = LayerNorm(dim, eps, device)
        self.attn = SelfAttention(dim, num_heads, 1 / math.sqrt(dim // num_heads), qkv_bias, device=device)
        self.ln2 = LayerNorm(dim, eps, device)
        self.mlp = MLP(dim, hidden, activation, device)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x, h = self.ln2.add(self.attn(self.ln1(h)), h)  # x = ln2(h + attn), h = h + attn
        return h + self.mlp(x)
