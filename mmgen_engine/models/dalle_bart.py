"""min-dalle's BART (DALL·E Mega / Mini): a text encoder and an image-token decoder with
cross-attention, plus the image detokenizer that turns the token grid into pixels.

Both halves use bias-free attention between a pre- and a post-LayerNorm and min-dalle's GLU::

    h = ln_emb(wte[tokens] + wpe[positions])
    h += ln_post_attn(attn(ln_pre_attn(h)))
    h += ln_post_cross(cross(ln_pre_cross(h), encoder))     # decoder only
    h += glu(h)                                              # fc2(ln1(gelu(fc0(ln0 h)) * fc1(ln0 h)))
    out = ln_f(h)                                            # decoder: logits = lm_head(out)

The encoder masks padding keys (rows are ``<s> ... </s>`` then pad, so a length per row does);
the decoder's cross-attention K/V are computed once at prefill into the runtime's cross cache.
Residual adds are fused into the next LayerNorm (``LayerNorm.add``); the GLU's output is carried as
the pending ``delta`` into the next block, as in :mod:`.gpt2`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..config import BartConfig, TextToImageConfig
from ..layers import GLU, CrossAttention, LayerNorm, SelfAttention
from .detokenizers import build_detokenizer
from .quantize import head_weight


class BartBlock(nn.Module):
    def __init__(self, cfg: BartConfig, cross: bool, device=None):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        scale = 1 / math.sqrt(cfg.head_dim)
        self.ln_pre_attn = LayerNorm(d, eps, device)
        self.attn = SelfAttention(d, cfg.num_heads, scale, qkv_bias=False, out_bias=False, device=device)
        self.ln_post_attn = LayerNorm(d, eps, device)
        if cross:
            self.ln_pre_cross = LayerNorm(d, eps, device)
            self.cross = CrossAttention(d, cfg.num_heads, scale, bias=False, device=device)
            self.ln_post_cross = LayerNorm(d, eps, device)
        self.glu = GLU(d, cfg.glu_size, eps, device)

    def forward(self, h, delta, attend, cross=None):
        """The block on the residual stream ``h + delta`` (``delta`` None: just ``h``); ``attend(x)`` is
        the self-attention of the normalized input, ``cross`` None or ``(k, v, lengths)``. Returns
        ``(h', delta')`` whose sum is the block's output."""
        x, h = (self.ln_pre_attn(h), h) if delta is None else self.ln_pre_attn.add(delta, h)
        y = self.ln_post_attn(attend(x))
        if cross is not None:
            x, h = self.ln_pre_cross.add(y, h)
            y = self.ln_post_cross(self.cross(x, *cross))
        x, h = self.glu.ln0.add(y, h)
        return h, self.glu(x)


class _Bart(nn.Module):
    def __init__(self, cfg: BartConfig, cross: bool, device=None):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.wte = nn.Parameter(torch.empty(cfg.vocab_size, d, device=device))
        self.wpe = nn.Parameter(torch.empty(cfg.max_positions, d, device=device))
        self.ln_emb = LayerNorm(d, cfg.layer_norm_eps, device)
        self.layers = nn.ModuleList(BartBlock(cfg, cross, device) for _ in range(cfg.num_layers))
        self.ln_f = LayerNorm(d, cfg.layer_norm_eps, device)

    def _embed(self, tokens, positions):
        return ops.embedding(tokens, positions, self.wte, self.wpe, self.ln_emb.weight, self.ln_emb.bias,
                             self.ln_emb.eps)

    def _final(self, h, delta):
        return self.ln_f.add(delta, h)[0]


class BartEncoder(_Bart):
    def __init__(self, cfg: BartConfig, device=None):
        super().__init__(cfg, cross=False, device=device)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``tokens [B, T]`` whose first ``lengths[b]`` are real -> states ``[B, T, D]``."""
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        h, delta = self._embed(tokens, positions), None
        for layer in self.layers:
            h, delta = layer(h, delta, lambda x: layer.attn(x, lengths))
        return self._final(h, delta)


class BartDecoder(_Bart):
    """The image-token decoder, driven by the runtime (``cache_geometry``, ``prefill``,
    ``decode_step``; see :func:`mmgen_engine.runtime.generate`)."""

    uses_prefix = False  # the encoder states are cross-attended to

    def __init__(self, cfg: BartConfig, device=None):
        super().__init__(cfg, cross=True, device=device)
        self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, device=device))

    def cache_geometry(self) -> tuple[int, int, int, int]:
        c = self.cfg
        return c.num_layers, c.num_heads, c.head_dim, c.max_positions

    def _blocks(self, h, attend, cross):
        delta = None
        for i, layer in enumerate(self.layers):
            h, delta = layer(h, delta, lambda x: attend(i, layer.attn, x), (cross.k[i], cross.v[i], cross.lengths))
        return ops.linear(self._final(h, delta), head_weight(self), None)

    def prefill(self, tokens: torch.Tensor, encoder_states: torch.Tensor, cache, cross) -> torch.Tensor:
        """Fill the cross cache from ``encoder_states [B, S, D]``, run ``tokens [B, T]`` at positions
        ``0..T-1`` into cache slots ``0..T-1``; logits ``[B, V]`` of the last position."""
        for i, layer in enumerate(self.layers):
            layer.cross.fill_cache(encoder_states, cross.k[i], cross.v[i])
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        logits = self._blocks(self._embed(tokens, positions),
                              lambda i, attn, x: attn.prefill(x, cache.k[i], cache.v[i]), cross)
        return logits[:, -1]

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache, cross) -> torch.Tensor:
        """One token per row, ``tokens, positions [B]`` -> logits ``[B, V]``."""
        lengths = positions + 1
        return self._blocks(self._embed(tokens, positions),
                            lambda i, attn, x: attn.decode(x, cache.k[i], cache.v[i], lengths, cache.span), cross)


class DalleBart(nn.Module):
    def __init__(self, cfg: TextToImageConfig, device=None):
        super().__init__()
        self.cfg = cfg
        self.encoder = BartEncoder(cfg.encoder, device)
        self.decoder = BartDecoder(cfg.decoder, device)
        self.detokenizer = build_detokenizer(cfg.detokenizer, device)
        self.requires_grad_(False)
