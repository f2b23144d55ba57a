"""LLaMA-family decoder (Touvron et al. 2023; HF ``LlamaForCausalLM``), the language model of LLaVA.

Block: ``h += attn(rms1(h)); h += mlp(rms2(h))`` with grouped-query attention and rotary positions
(:class:`~mmgen_engine.layers.GroupedQueryAttention`), the SwiGLU MLP, then ``norm`` and the head
(untied unless ``tie_word_embeddings``). No learned positions: a token's position is its cache slot,
so image states in front of the text (LLaVA) are a causal prefix whose positions count, as
transformers runs them.

The runtime hands in the self-attention cache ``cache.k[i], cache.v[i] [B, Hkv, S, Dh]`` (``Hkv``
heads, not ``Hq``: :meth:`cache_geometry` says so) with ``cache.span``; there is no
cross-attention (``uses_prefix``). The rotary tables of a step are computed once and shared by all
layers; the decode step hands them to ``ops.decode_attention``, which rotates the new query and key
and writes the key into the cache in one call.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..config import LlamaConfig
from ..layers import GroupedQueryAttention, RMSNorm, RotaryTable, SwiGLU
from .quantize import head_weight


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig, device=None):
        super().__init__()
        d = cfg.hidden_size
        self.rms1 = RMSNorm(d, cfg.rms_norm_eps, device)
        self.attn = GroupedQueryAttention(d, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.attention_bias,
                                          device)
        self.rms2 = RMSNorm(d, cfg.rms_norm_eps, device)
        self.mlp = SwiGLU(d, cfg.intermediate_size, cfg.mlp_bias, device)

    def forward(self, h: torch.Tensor, attend) -> torch.Tensor:
        """The block on ``h``; ``attend(x)`` is its self-attention of the normalized input."""
        h = h + attend(self.rms1(h))
        return h + self.mlp(self.rms2(h))


class LlamaDecoder(nn.Module):
    uses_prefix = True  # no cross-attention: encoder states are input embeddings in front of the prompt

    def __init__(self, cfg: LlamaConfig, device=None):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, device=device))
        self.layers = nn.ModuleList(LlamaBlock(cfg, device) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, device=device))
        self.rotary = RotaryTable(cfg.rope, cfg.head_dim)
        self.requires_grad_(False)

    def cache_geometry(self) -> tuple[int, int, int, int]:
        """``(num_layers, num_kv_heads, head_dim, max_positions)``: the cache holds the K/V heads only."""
        c = self.cfg
        return c.num_layers, c.num_kv_heads, c.head_dim, c.max_positions

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[..., D]`` of ``tokens [...]``."""
        return ops.token_gather(tokens, self.wte)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return ops.linear(self.norm(h), head_weight(self), None)

    def prefill(self, tokens: torch.Tensor, encoder_states: torch.Tensor, cache, cross) -> torch.Tensor:
        """The prefix ``encoder_states [B, S, D]`` (input embeddings, ``S`` may be 0) at positions
        ``0..S-1``, then the prompt ``tokens [B, T]`` at ``S..S+T-1``, filling cache slots
        ``0..S+T-1``. Returns logits ``[B, V]`` of the last position."""
        h = torch.cat([encoder_states, self.embed(tokens).to(encoder_states.dtype)], dim=1)  # (B, S + T, D)
        b, t = h.shape[:2]
        cos, sin = (x.expand(b, -1, -1).contiguous() for x in self.rotary(torch.arange(t, device=h.device)))
        for i, layer in enumerate(self.layers):
            h = layer(h, lambda x: layer.attn.prefill(x, cache.k[i], cache.v[i], cos, sin))
        return self._logits(h[:, -1])

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache, cross) -> torch.Tensor:
        """One token per row at cache slots (= positions) ``positions [B]`` -> logits ``[B, V]``."""
        h = self.embed(tokens)  # (B, D)
        cos, sin = self.rotary(positions)  # (B, Dh / 2) each
        lengths = positions + 1
        for i, layer in enumerate(self.layers):
            h = layer(h, lambda x: layer.attn.decode(x, cache.k[i], cache.v[i], lengths, cache.span, cos, sin))
        return self._logits(h)
