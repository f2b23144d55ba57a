"""BLIP captioner (Li et al. 2022; HF ``BlipForConditionalGeneration``): a ViT (BLIP's vision model,
the same math as :class:`~mmgen_engine.models.vit.ViTEncoder`) whose final states the BERT text
decoder cross-attends to."""
from __future__ import annotations

import torch
from torch import nn

from ..config import CaptioningConfig
from .bert import BertDecoder
from .vit import ViTEncoder


class Blip(nn.Module):
    def __init__(self, cfg: CaptioningConfig, device=None):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViTEncoder(cfg.encoder, device)
        self.decoder = BertDecoder(cfg.decoder, device=device)
        self.requires_grad_(False)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values [B, C, H, W]`` -> the states the decoder cross-attends to ``[B, 1 + N, D_enc]``."""
        return self.encoder(pixel_values)
