"""BLIP-2 captioner (Li et al. 2023; HF ``Blip2ForConditionalGeneration`` with an OPT language model).

``pixel_values`` -> BLIP-2's ViT (BLIP's vision model, the same math as
:class:`~mmgen_engine.models.vit.ViTEncoder`) -> image states ``[B, 1 + N, D_v]`` -> the Q-Former
on its inference path: the ``num_query_tokens`` learned queries, a LayerNorm, then BERT-style
post-LayerNorm layers (bidirectional self-attention among the queries; cross-attention to the image
states in every ``cross_attention_frequency``-th layer, starting with the first; the MLP of the
query path) -> the language projection -> ``[B, Q, D]``, which the OPT decoder
(:class:`~mmgen_engine.models.opt.OPTDecoder`) takes as a causal prefix of input embeddings, one
prefill per image, before the start token and the prompt (transformers puts ``Q`` image tokens and
the BOS in front of the text and overwrites the image tokens' embeddings with the projected queries:
the same sequence).

As transformers does for float16 weights (``_keep_in_fp32_modules``), the Q-Former and its queries
stay float32 in a half-precision model, bfloat16 included (``fp32_tensors``; a few percent of the
weights): the image states enter it as float32 and its output is cast back to the model's dtype
before the language projection.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import CaptioningConfig, QFormerConfig
from ..layers import MLP, CrossAttention, LayerNorm, Linear, SelfAttention
from ..layers.attention import split_heads
from .opt import OPTDecoder
from .vit import ViTEncoder


class QFormerLayer(nn.Module):
    """``h = ln_attn(h + attn(h)); (h = ln_cross(h + cross(h, image));) h = ln_mlp(h + mlp(h))``."""

    def __init__(self, cfg: QFormerConfig, cross: bool, device=None):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        scale = 1 / math.sqrt(cfg.head_dim)
        self.attn = SelfAttention(d, cfg.num_heads, scale, device=device)
        self.ln_attn = LayerNorm(d, eps, device)
        self.cross = CrossAttention(d, cfg.num_heads, scale, kv_dim=cfg.encoder_hidden_size,
                                    device=device) if cross else None
        self.ln_cross = LayerNorm(d, eps, device) if cross else None
        self.mlp = MLP(d, cfg.intermediate_size, cfg.activation, device)
        self.ln_mlp = LayerNorm(d, eps, device)

    def forward(self, h: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.ln_attn.add(self.attn(h), h)[0]
        if self.cross is not None:
            k, v = (split_heads(t, self.cross.num_heads) for t in self.cross.kv(image).chunk(2, dim=-1))
            h = self.ln_cross.add(self.cross(h, k, v, None), h)[0]
        return self.ln_mlp.add(self.mlp(h), h)[0]


class Blip2(nn.Module):
    def __init__(self, cfg: CaptioningConfig, device=None):
        super().__init__()
        self.cfg = cfg
        q = cfg.qformer
        self.encoder = ViTEncoder(cfg.encoder, device)
        self.query_tokens = nn.Parameter(torch.empty(q.num_query_tokens, q.hidden_size, device=device))
        self.ln_query = LayerNorm(q.hidden_size, q.layer_norm_eps, device)
        self.qformer = nn.ModuleList(QFormerLayer(q, i % q.cross_attention_frequency == 0, device)
                                     for i in range(q.num_layers))
        self.projection = Linear(q.hidden_size, cfg.decoder.hidden_size, device=device)
        self.decoder = OPTDecoder(cfg.decoder, device)
        self.fp32_tensors = frozenset(name for name, _ in self.named_parameters()
                                      if name.startswith(("query_tokens", "ln_query.", "qformer.")))
        self.requires_grad_(False)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values [B, C, H, W]`` -> the decoder's prefix embeddings ``[B, num_query_tokens, D]``."""
        image = self.encoder(pixel_values)  # (B, 1 + N, D_v)
        queries = self.query_tokens
        h = self.ln_query(queries.expand(image.shape[0], -1, -1))
        image = image.to(queries.dtype)
        for layer in self.qformer:
            h = layer(h, image)
        return self.projection(h.to(self.projection.weight.dtype))
