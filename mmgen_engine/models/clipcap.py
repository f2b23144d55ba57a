"""ClipCap (Mokady et al. 2021, "ClipCap: CLIP Prefix for Image Captioning"), MLP mapping network:
the CLIP image embedding (the vision tower's final-normed CLS state times CLIP's visual projection,
as ``CLIPVisionModelWithProjection.image_embeds``) goes through an MLP with tanh between its layers
to ``prefix_length`` GPT-2 input embeddings; GPT-2 (no cross-attention) continues after them."""
from __future__ import annotations

import torch
from torch import nn

from ..config import CaptioningConfig
from ..layers import Linear
from .gpt2 import GPT2Decoder
from .vit import ViTEncoder


class ClipCap(nn.Module):
    def __init__(self, cfg: CaptioningConfig, device=None):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViTEncoder(cfg.encoder, device)
        self.projection = Linear(cfg.encoder.hidden_size, cfg.projection_dim, bias=False, device=device)
        sizes = cfg.mapper_sizes
        self.mapper = nn.ModuleList(Linear(a, b, device=device) for a, b in zip(sizes, sizes[1:]))
        self.decoder = GPT2Decoder(cfg.decoder, device)
        self.requires_grad_(False)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values [B, C, H, W]`` -> the GPT-2 prefix embeddings ``[B, prefix_length, D]``."""
        h = self.projection(self.encoder(pixel_values, pooled=True))  # (B, projection_dim)
        for i, layer in enumerate(self.mapper):
            h = layer(torch.tanh(h) if i else h)
        return h.view(h.shape[0], self.cfg.prefix_length, -1)
