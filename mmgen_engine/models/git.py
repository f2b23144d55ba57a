"""GIT captioner (Wang et al. 2022; HF ``GitForCausalLM``): the CLIP vision tower's final states,
projected to the text width by a linear layer and a LayerNorm, are a bidirectional prefix of the
BERT-style text decoder (:class:`~mmgen_engine.models.bert.BertDecoder`), which the runtime prefills
into the self-attention cache once per image."""
from __future__ import annotations

import torch
from torch import nn

from ..config import CaptioningConfig
from ..layers import LayerNorm, Linear
from .bert import BertDecoder
from .vit import ViTEncoder


class Git(nn.Module):
    def __init__(self, cfg: CaptioningConfig, device=None):
        super().__init__()
        self.cfg = cfg
        enc, dec = cfg.encoder, cfg.decoder
        self.encoder = ViTEncoder(enc, device)
        self.projection = Linear(enc.hidden_size, dec.hidden_size, device=device)
        self.ln_projection = LayerNorm(dec.hidden_size, enc.layer_norm_eps, device)
        self.decoder = BertDecoder(dec, prefix_length=enc.num_patches + 1, device=device)
        self.requires_grad_(False)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values [B, C, H, W]`` -> the decoder's prefix ``[B, 1 + N, D_dec]``."""
        return self.ln_projection(self.projection(self.encoder(pixel_values)))
