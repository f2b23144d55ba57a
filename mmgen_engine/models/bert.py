"""BERT-style post-LayerNorm text decoders: BLIP's (HF ``BlipTextLMHeadModel``, cross-attention to
the image) and GIT's (HF ``GitForCausalLM``'s text half, the image states as a prefix).

Embeddings: ``ln_emb(wte[token] + wpe[position])``. Block (post-LN, as BERT):
``h = ln_attn(h + attn(h)); (h = ln_cross(h + cross(h, encoder));) h = ln_mlp(h + mlp(h))``.
Head: (BLIP: ``h = ln_head(gelu(dense(h)))``,) ``logits = h W^T + b`` with ``W`` the word embeddings
when tied.

With a prefix (GIT) the runtime's cache slots ``0..P-1`` hold the projected image states, which
attend to each other bidirectionally; text token ``t`` sits in slot ``P + t`` and sees the whole
prefix and the text up to itself. Text position ids count the text only: ``position = slot - P``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..config import BertConfig
from ..layers import MLP, CrossAttention, LayerNorm, Linear, SelfAttention
from ..layers.mlp import GELU_FORMS
from .quantize import head_weight


class BertBlock(nn.Module):
    def __init__(self, cfg: BertConfig, device=None):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        scale = 1 / math.sqrt(cfg.head_dim)
        self.attn = SelfAttention(d, cfg.num_heads, scale, device=device)
        self.ln_attn = LayerNorm(d, eps, device)
        cross = cfg.encoder_hidden_size is not None
        self.cross = CrossAttention(d, cfg.num_heads, scale, kv_dim=cfg.encoder_hidden_size,
                                    device=device) if cross else None
        self.ln_cross = LayerNorm(d, eps, device) if cross else None
        self.mlp = MLP(d, cfg.intermediate_size, cfg.activation, device)
        self.ln_mlp = LayerNorm(d, eps, device)

    def forward(self, h, attend, ck, cv, lengths):
        """The block on ``h``; ``attend(h)`` is its self-attention (cache handling is the caller's)."""
        h = self.ln_attn.add(attend(h), h)[0]
        if self.cross is not None:
            h = self.ln_cross.add(self.cross(h, ck, cv, lengths), h)[0]
        return self.ln_mlp.add(self.mlp(h), h)[0]


class BertDecoder(nn.Module):
    def __init__(self, cfg: BertConfig, prefix_length: int = 0, device=None):
        """``prefix_length``: image states in front of the text (GIT; 0 with cross-attention)."""
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.wte = nn.Parameter(torch.empty(cfg.vocab_size, d, device=device))
        self.wpe = nn.Parameter(torch.empty(cfg.max_positions, d, device=device))
        self.ln_emb = LayerNorm(d, cfg.layer_norm_eps, device)
        self.layers = nn.ModuleList(BertBlock(cfg, device) for _ in range(cfg.num_layers))
        if cfg.head_transform:
            self.head_dense = Linear(d, d, device=device)
            self.ln_head = LayerNorm(d, cfg.layer_norm_eps, device)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, d, device=device))
        self.lm_bias = nn.Parameter(torch.empty(cfg.vocab_size, device=device))
        self.uses_prefix = cfg.encoder_hidden_size is None
        self.prefix_length = prefix_length
        self.requires_grad_(False)

    def cache_geometry(self) -> tuple[int, int, int, int]:
        """``(num_layers, num_heads, head_dim, cache slots)``: the prefix and the text positions."""
        c = self.cfg
        return c.num_layers, c.num_heads, c.head_dim, self.prefix_length + c.max_positions

    def _embed(self, tokens, positions):
        return ops.embedding(tokens, positions, self.wte, self.wpe, self.ln_emb.weight, self.ln_emb.bias,
                             self.ln_emb.eps)

    def _blocks(self, h, attend, cross):
        for i, layer in enumerate(self.layers):
            h = layer(h, lambda x: attend(i, layer.attn, x), cross.k[i], cross.v[i], cross.lengths)
        return h

    def _logits(self, h) -> torch.Tensor:
        if self.cfg.head_transform:
            dense = self.head_dense
            h = ops.bias_gelu(ops.linear(h, dense.op_weight, None), dense.bias, GELU_FORMS[self.cfg.activation])
            h = self.ln_head(h)
        return ops.linear(h, head_weight(self), self.lm_bias)

    def prefill(self, tokens: torch.Tensor, encoder_states: torch.Tensor, cache, cross) -> torch.Tensor:
        """Cross-attention: fill its cache from ``encoder_states [B, S, D_enc]``. Prefix: the states
        ``[B, P, D]`` take cache slots ``0..P-1``. Then the prompt ``tokens [B, T]`` (text positions
        ``0..T-1``). Returns logits ``[B, V]`` of the last position."""
        prefix = 0
        if self.uses_prefix:
            prefix = encoder_states.shape[1]
            if prefix != self.prefix_length:
                raise ValueError(f"expected {self.prefix_length} prefix states, got {prefix}")
        else:
            for i, layer in enumerate(self.layers):
                layer.cross.fill_cache(encoder_states, cross.k[i], cross.v[i])
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        h = self._embed(tokens, positions)  # (B, T, D)
        if prefix:
            h = torch.cat([encoder_states, h], dim=1)  # (B, P + T, D)
        h = self._blocks(h, lambda i, attn, x: attn.prefill(x, cache.k[i], cache.v[i], prefix), cross)
        return self._logits(h[:, -1])

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache, cross) -> torch.Tensor:
        """One token per row at cache slots ``positions [B]`` -> logits ``[B, V]``."""
        text_positions = positions - self.prefix_length if self.prefix_length else positions
        h = self._embed(tokens, text_positions)  # (B, D)
        lengths = positions + 1
        h = self._blocks(h, lambda i, attn, x: attn.decode(x, cache.k[i], cache.v[i], lengths, cache.span), cross)
        return self._logits(h)
