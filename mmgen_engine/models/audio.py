"""a2g-gpt's audio encoder: log-mel frames ``[B, F, n_mels]`` -> two Conv1d (kernel 3, stride 2,
padding 1) each with an exact GELU -> + learned positions -> pre-LN transformer blocks -> LayerNorm
-> ``[B, L, D]`` with ``L = ceil(ceil(F / 2) / 2)``."""
from __future__ import annotations

import torch
from torch import nn

from ..config import AudioEncoderConfig
from ..layers import Conv1d, EncoderBlock, LayerNorm


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig, device=None):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.conv1 = Conv1d(cfg.n_mels, d, 3, stride=2, padding=1, device=device)
        self.conv2 = Conv1d(d, d, 3, stride=2, padding=1, device=device)
        self.pos_embed = nn.Parameter(torch.empty(cfg.max_positions, d, device=device), requires_grad=False)
        self.layers = nn.ModuleList(EncoderBlock(d, cfg.num_heads, cfg.intermediate_size, cfg.layer_norm_eps, "gelu",
                                                 device=device) for _ in range(cfg.num_layers))
        self.ln_f = LayerNorm(d, cfg.layer_norm_eps, device)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.conv1(mel.to(self.pos_embed.dtype), gelu=True), gelu=True)  # (B, L, D)
        if h.shape[1] != self.cfg.max_positions:
            raise ValueError(f"expected {self.cfg.max_positions} audio states, got {h.shape[1]}")
        h = h + self.pos_embed
        for layer in self.layers:
            h = layer(h)
        return self.ln_f(h)
