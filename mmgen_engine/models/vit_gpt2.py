"""ViT-GPT2 captioner (HF ``VisionEncoderDecoderModel`` with a ViT encoder and a GPT-2 decoder).

``encode`` runs the ViT and, when the widths differ, the linear ``enc_to_dec`` projection; the
decoder half is :class:`~mmgen_engine.models.gpt2.GPT2Decoder`, driven by the runtime.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import CaptioningConfig
from ..layers import Linear
from .gpt2 import GPT2Decoder
from .vit import ViTEncoder


class VitGpt2(nn.Module):
    def __init__(self, cfg: CaptioningConfig, device=None):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViTEncoder(cfg.encoder, device)
        if cfg.enc_to_dec_proj:
            self.enc_to_dec = Linear(cfg.encoder.hidden_size, cfg.decoder.hidden_size, device=device)
        self.decoder = GPT2Decoder(cfg.decoder, device)
        self.requires_grad_(False)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values [B, C, H, W]`` -> encoder states in decoder width ``[B, 1 + N, D_dec]``."""
        h = self.encoder(pixel_values)
        return self.enc_to_dec(h) if self.cfg.enc_to_dec_proj else h
