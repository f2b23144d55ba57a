"""The decoder of a T2M-GPT-style motion VQ-VAE (Zhang et al. 2023): motion token ids ``[B, n]`` ->
normalized pose features ``[B, n * 2**levels, 2 * joints]``.

``codebook[ids]`` (:func:`mmgen_engine.ops.token_gather`) -> Conv1d(k3) -> ReLU -> ``levels`` x
(ResStack, nearest 2x upsample in time, Conv1d(k3)) -> Conv1d(k3) -> ReLU -> Conv1d(k3). A ResStack
applies ``depth`` residual blocks ``x + conv_k1(relu(conv_k3_dilated(relu(x))))`` with dilations
``growth**(depth-1) .. 1`` (the encoder's, reversed). Everything is channels-last ``[B, T, C]``; the
convolutions are :class:`~mmgen_engine.layers.Conv1d` (one ``ops.linear`` each).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..config import MotionVQConfig
from ..layers import Conv1d


class ResBlock(nn.Module):
    def __init__(self, width: int, dilation: int, device=None):
        super().__init__()
        self.conv1 = Conv1d(width, width, 3, padding=dilation, dilation=dilation, device=device)
        self.conv2 = Conv1d(width, width, 1, device=device)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(torch.relu(x))))


class MotionVQDecoder(nn.Module):
    def __init__(self, cfg: MotionVQConfig, device=None):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        dilations = [cfg.growth ** i for i in range(cfg.depth)][::-1]
        self.codebook = nn.Parameter(torch.empty(cfg.codebook_size, cfg.code_dim, device=device), requires_grad=False)
        self.conv_in = Conv1d(cfg.code_dim, w, 3, padding=1, device=device)
        self.res = nn.ModuleList(nn.ModuleList(ResBlock(w, d, device) for d in dilations) for _ in range(cfg.levels))
        self.up_conv = nn.ModuleList(Conv1d(w, w, 3, padding=1, device=device) for _ in range(cfg.levels))
        self.conv_mid = Conv1d(w, w, 3, padding=1, device=device)
        self.conv_out = Conv1d(w, 2 * cfg.joints, 3, padding=1, device=device)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv_in(ops.token_gather(codes, self.codebook)))  # (B, n, W)
        for stack, conv in zip(self.res, self.up_conv):
            for block in stack:
                x = block(x)
            x = conv(x.repeat_interleave(2, dim=1))
        return self.conv_out(torch.relu(self.conv_mid(x)))
