"""GPT-2 decoder (Radford et al.; HF ``GPT2LMHeadModel``), the text decoder of ViT-GPT2 captioners
(with cross-attention, ``add_cross_attention=True``) and of ClipCap (without: the encoder states are
input embeddings in front of the text, a causal prefix whose positions count).

Block: ``h += attn(ln_1(h)); (h += cross(ln_cross(h), encoder);) h += mlp(ln_2(h))``, then ``ln_f``
and the LM head (tied to ``wte`` unless the checkpoint has its own; int8 when quantized, see
:mod:`.quantize`). The runtime hands in the caches:
``cache.k[i], cache.v[i] [B, H, S, Dh]`` with ``cache.span`` (slots any row may read this step) and
``cross.k[i], cross.v[i] [B, H, S_enc, Dh]`` with ``cross.lengths [B]``; ``positions`` are cache
slots, which for GPT-2 are also its position ids.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..config import GPT2Config
from ..layers import MLP, CrossAttention, LayerNorm, SelfAttention
from ..ops.decoder_step import StepSpec, native_step
from .quantize import head_weight


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int, device=None):
        super().__init__()
        d = cfg.hidden_size
        scale = 1 / math.sqrt(cfg.head_dim) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.ln1 = LayerNorm(d, cfg.layer_norm_eps, device)
        self.attn = SelfAttention(d, cfg.num_heads, scale, device=device)
        self.ln_cross = LayerNorm(d, cfg.layer_norm_eps, device) if cfg.cross_attention else None
        self.cross = CrossAttention(d, cfg.num_heads, scale, device=device) if cfg.cross_attention else None
        self.ln2 = LayerNorm(d, cfg.layer_norm_eps, device)
        self.mlp = MLP(d, cfg.intermediate_size, cfg.activation, device)

    def forward(self, h, delta, attend, ck, cv, lengths):
        """The block on the residual stream ``h + delta`` (``delta`` None: just ``h``); ``attend(x)``
        is the self-attention of the normalized input. Returns ``(h', delta')`` whose sum is the
        block's output: the MLP's residual add is left to the next LayerNorm, which fuses it."""
        x, h = (self.ln1(h), h) if delta is None else self.ln1.add(delta, h)
        if self.cross is None:
            x, h = self.ln2.add(attend(x), h)
        else:
            x, h = self.ln_cross.add(attend(x), h)
            x, h = self.ln2.add(self.cross(x, ck, cv, lengths), h)
        return h, self.mlp(x)


class GPT2Decoder(nn.Module):
    def __init__(self, cfg: GPT2Config, device=None):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, device=device))
        self.wpe = nn.Parameter(torch.empty(cfg.max_positions, cfg.hidden_size, device=device))
        self.layers = nn.ModuleList(GPT2Block(cfg, i, device) for i in range(cfg.num_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, device)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, device=device))
        self.uses_prefix = not cfg.cross_attention  # the runtime's question: prefix or cross-attention?
        self.requires_grad_(False)

    def cache_geometry(self) -> tuple[int, int, int, int]:
        """``(num_layers, num_heads, head_dim, max_positions)`` for the runtime's cache allocation."""
        c = self.cfg
        return c.num_layers, c.num_heads, c.head_dim, c.max_positions

    def _blocks(self, h, attend, cross):
        """All blocks; ``attend(i, attn, x)`` runs layer ``i``'s self-attention. Returns ``(h, delta)``."""
        delta = None
        for i, layer in enumerate(self.layers):
            h, delta = layer(h, delta, lambda x: attend(i, layer.attn, x), cross.k[i], cross.v[i], cross.lengths)
        return h, delta

    def _logits(self, h, delta) -> torch.Tensor:
        return ops.linear(self.ln_f.add(delta, h)[0], head_weight(self), None)

    def prefill(self, tokens: torch.Tensor, encoder_states: torch.Tensor, cache, cross) -> torch.Tensor:
        """Fill the cross-attention cache from ``encoder_states [B, S, D]`` and run the prompt
        ``tokens [B, T]`` (positions ``0..T-1``), filling cache slots ``0..T-1``. Without
        cross-attention the encoder states are input embeddings at positions ``0..S-1`` and the
        prompt follows at ``S..S+T-1`` (``T`` may be 0). Returns logits ``[B, V]`` of the last position."""
        start = encoder_states.shape[1] if self.uses_prefix else 0
        if not self.uses_prefix:
            for i, layer in enumerate(self.layers):
                layer.cross.fill_cache(encoder_states, cross.k[i], cross.v[i])
            step = native_step(self, self._step_spec, tokens, cache.k) if tokens.shape[1] else None
            if step is not None:  # the prompt a token at a time: causal attention over the slots so far
                positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
                for t in range(tokens.shape[1]):
                    logits = step(tokens[:, t], positions[:, t], cache.k, cache.v, t + 1, cross.k, cross.v,
                                  cross.lengths)
                return logits
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
        h = ops.embedding(tokens, positions, self.wte, self.wpe)  # (B, T, D); T may be 0 (ClipCap)
        if self.uses_prefix:
            h = torch.cat([encoder_states + self.wpe[:start], h], dim=1)  # (B, S + T, D)
        h, delta = self._blocks(h, lambda i, attn, x: attn.prefill(x, cache.k[i], cache.v[i]), cross)
        return self._logits(h[:, -1], delta[:, -1])

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache, cross) -> torch.Tensor:
        """One token per row, ``tokens, positions [B]`` -> logits ``[B, V]``; ``cache.span`` bounds
        the slots read (the whole cache when it equals its length)."""
        step = native_step(self, self._step_spec, tokens, cache.k)  # CPU, small, float32: one native call
        if step is not None:
            return step(tokens, positions, cache.k, cache.v, cache.span, cross.k, cross.v, cross.lengths)
        h = ops.embedding(tokens, positions, self.wte, self.wpe)  # (B, D)
        lengths = positions + 1
        h, delta = self._blocks(h, lambda i, attn, x: attn.decode(x, cache.k[i], cache.v[i], lengths, cache.span),
                                cross)
        return self._logits(h, delta)

    def _step_spec(self) -> StepSpec | None:
        """This decoder as :mod:`mmgen_engine.ops.decoder_step` takes it; None where a layer holds int8
        weights (the native step runs float weights only)."""
        head = head_weight(self)
        if not isinstance(head, torch.Tensor):
            return None
        layers = []
        for layer in self.layers:
            linears = {"qkv": layer.attn.qkv, "out": layer.attn.out, "fc1": layer.mlp.fc1, "fc2": layer.mlp.fc2}
            norms = {"ln1": layer.ln1, "ln2": layer.ln2}
            if layer.cross is not None:
                linears |= {"cross_q": layer.cross.q, "cross_out": layer.cross.out}
                norms["lnx"] = layer.ln_cross
            if not all(isinstance(lin.op_weight, torch.Tensor) for lin in linears.values()):
                return None
            spec = {name: lin.weight for name, lin in linears.items()}
            spec |= {f"{name}_b": lin.bias for name, lin in linears.items() if lin.bias is not None}
            for name, ln in norms.items():
                spec |= {f"{name}_w": ln.weight, f"{name}_b": ln.bias}
            layers.append(spec | {"scale": layer.attn.scale})
        mlp = self.layers[0].mlp
        return StepSpec(self.cfg.num_heads, self.cfg.layer_norm_eps, mlp.approximate, self.wte, self.wpe,
                        head, (self.ln_f.weight, self.ln_f.bias), layers)
