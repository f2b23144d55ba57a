"""OPT decoder (Zhang et al. 2022; HF ``OPTForCausalLM``), pre-LayerNorm as every published OPT but
350m, BLIP-2's language models included.

Embeddings: ``project_in(wte[token]) + wpe[position]`` (``project_in`` only when the embeddings are
narrower than the hidden width). OPT's learned position table has two extra leading rows (position
``p`` reads row ``p + 2``); the converter drops them, so here position ``p`` reads ``wpe[p]``.
Block: ``h += attn(ln1(h)); h += mlp(ln2(h))`` with biases everywhere, the MLP ``fc2(relu(fc1(x)))``.
Head: ``ln_f``, ``project_out`` (when ``project_in`` exists), then the token embeddings (tied) or
``lm_head``.

Input embeddings in front of the text (BLIP-2's projected queries) are ``encoder_states [B, P, E]``
at the embedding width ``E``: they go through ``project_in`` and take positions (and cache slots)
``0..P-1`` as token embeddings would, attending causally as OPT's input embeddings do; the prompt
follows at ``P..``. Positions are cache slots.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..config import OPTConfig
from ..layers import MLP, LayerNorm, Linear, SelfAttention
from .quantize import head_weight


class OPTBlock(nn.Module):
    def __init__(self, cfg: OPTConfig, device=None):
        super().__init__()
        d = cfg.hidden_size
        self.ln1 = LayerNorm(d, cfg.layer_norm_eps, device)
        self.attn = SelfAttention(d, cfg.num_heads, 1 / math.sqrt(cfg.head_dim), device=device)
        self.ln2 = LayerNorm(d, cfg.layer_norm_eps, device)
        self.mlp = MLP(d, cfg.intermediate_size, cfg.activation, device)

    def forward(self, h, delta, attend):
        """The block on the residual stream ``h + delta`` (``delta`` None: just ``h``); ``attend(x)``
        is the self-attention of the normalized input. Returns ``(h', delta')`` whose sum is the
        block's output (the MLP's residual add is fused into the next LayerNorm)."""
        x, h = (self.ln1(h), h) if delta is None else self.ln1.add(delta, h)
        x, h = self.ln2.add(attend(x), h)
        return h, self.mlp(x)


class OPTDecoder(nn.Module):
    uses_prefix = True  # no cross-attention: encoder states are input embeddings in front of the text

    def __init__(self, cfg: OPTConfig, device=None):
        super().__init__()
        self.cfg = cfg
        d, e = cfg.hidden_size, cfg.embed_dim
        self.wte = nn.Parameter(torch.empty(cfg.vocab_size, e, device=device))
        self.wpe = nn.Parameter(torch.empty(cfg.max_positions, d, device=device))
        self.project_in = Linear(e, d, bias=False, device=device) if e != d else None
        self.layers = nn.ModuleList(OPTBlock(cfg, device) for _ in range(cfg.num_layers))
        self.ln_f = LayerNorm(d, cfg.layer_norm_eps, device)
        self.project_out = Linear(d, e, bias=False, device=device) if e != d else None
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, e, device=device))
        self.requires_grad_(False)

    def cache_geometry(self) -> tuple[int, int, int, int]:
        """``(num_layers, num_heads, head_dim, max_positions)``; a prefix takes positions too."""
        c = self.cfg
        return c.num_layers, c.num_heads, c.head_dim, c.max_positions

    def _embed(self, tokens, positions):
        if self.project_in is None:
            return ops.embedding(tokens, positions, self.wte, self.wpe)
        return self.project_in(ops.token_gather(tokens, self.wte)) + self.wpe[positions]

    def _blocks(self, h, attend):
        delta = None
        for i, layer in enumerate(self.layers):
            h, delta = layer(h, delta, lambda x: attend(i, layer.attn, x))
        return h, delta

    def _logits(self, h, delta) -> torch.Tensor:
        h = self.ln_f.add(delta, h)[0]
        if self.project_out is not None:
            h = self.project_out(h)
        return ops.linear(h, head_weight(self), None)

    def prefill(self, tokens: torch.Tensor, encoder_states: torch.Tensor, cache, cross) -> torch.Tensor:
        """Input embeddings ``encoder_states [B, P, E]`` at positions ``0..P-1`` (``P`` may be 0), then
        the prompt ``tokens [B, T]`` at ``P..P+T-1`` (``T`` may be 0 when ``P`` is not), filling cache
        slots ``0..P+T-1``. Returns logits ``[B, V]`` of the last position. ``cross`` is unused."""
        start = encoder_states.shape[1]
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
        h = self._embed(tokens, positions)  # (B, T, D)
        if start:
            prefix = encoder_states.to(h.dtype)
            if self.project_in is not None:
                prefix = self.project_in(prefix)
            h = torch.cat([prefix + self.wpe[:start], h], dim=1)  # (B, P + T, D)
        h, delta = self._blocks(h, lambda i, attn, x: attn.prefill(x, cache.k[i], cache.v[i]))
        return self._logits(h[:, -1], delta[:, -1])

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache, cross) -> torch.Tensor:
        """One token per row, ``tokens, positions [B]`` (cache slots) -> logits ``[B, V]``; reads the
        first ``cache.span`` slots."""
        h = self._embed(tokens, positions)  # (B, D)
        lengths = positions + 1
        h, delta = self._blocks(h, lambda i, attn, x: attn.decode(x, cache.k[i], cache.v[i], lengths, cache.span))
        return self._logits(h, delta)
