"""LLaVA-1.5 (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning"; HF
``LlavaForConditionalGeneration``): the CLIP vision tower's states after an inner block
(``llava.feature_layers``, transformers' ``vision_feature_layer``, -2 by default), without the CLS
state unless ``keep_cls`` ("full" strategy), go through the projector ``linear_2(gelu(linear_1(x)))``
to ``N`` input embeddings of a LLaMA-family decoder, where they replace the prompt's ``<image>``
placeholder. The runtime sees the prompt's text before the placeholder plus the image states as a
causal prefix (:meth:`Llava.prefix`), prefilled once per image, and the text after it as the
decoder prompt.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..config import CaptioningConfig
from ..layers import Linear
from ..layers.mlp import GELU_FORMS
from .llama import LlamaDecoder
from .vit import ViTEncoder


class Llava(nn.Module):
    def __init__(self, cfg: CaptioningConfig, device=None):
        super().__init__()
        self.cfg = cfg
        enc, dec, llava = cfg.encoder, cfg.decoder, cfg.llava
        self.encoder = ViTEncoder(enc, device)
        width = enc.hidden_size * len(llava.feature_layers)
        self.linear_1 = Linear(width, dec.hidden_size, bias=llava.projector_bias, device=device)
        self.linear_2 = Linear(dec.hidden_size, dec.hidden_size, bias=llava.projector_bias, device=device)
        self.decoder = LlamaDecoder(dec, device)
        self.requires_grad_(False)

    @property
    def image_tokens(self) -> int:
        """Input embeddings one image takes."""
        return self.cfg.encoder.num_patches + int(self.cfg.llava.keep_cls)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values [B, C, H, W]`` -> the image's input embeddings ``[B, N, D_dec]``."""
        llava = self.cfg.llava
        states = self.encoder.layer_states(pixel_values, llava.feature_layers)
        x = torch.cat(states, dim=-1) if len(states) > 1 else states[0]  # (B, 1 + N, D_enc * layers)
        if not llava.keep_cls:
            x = x[:, 1:]
        fc1 = self.linear_1
        bias = fc1.bias if fc1.bias is not None else x.new_zeros(fc1.out_features)
        h = ops.bias_gelu(ops.linear(x, fc1.op_weight, None), bias, GELU_FORMS[llava.projector_activation])
        return self.linear_2(h)

    def prefix(self, image: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's prefix: the embeddings of the prompt's text before the placeholder,
        ``text_ids [B, T]``, then the image's ``image [B, N, D]`` -> ``[B, T + N, D]``."""
        return torch.cat([self.decoder.embed(text_ids).to(image.dtype), image], dim=1)
