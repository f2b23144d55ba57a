"""The interface the runtime drives a decoder through; models implement it, the runtime's signatures
name it. A decoder knows nothing of batching, sampling or graphs: it fills the caches it is handed
and returns logits."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .kv_cache import CrossKVCache, KVCache


@runtime_checkable
class Decoder(Protocol):
    """An autoregressive decoder (GPT-2, the BERT-style text decoders, min-dalle's BART decoder).

    ``uses_prefix``: the encoder states are a prefix of input embeddings filling the first
    self-attention cache slots (GIT, ClipCap) instead of being cross-attended to through ``cross``.
    """

    uses_prefix: bool

    def cache_geometry(self) -> tuple[int, int, int, int]:
        """``(num_layers, num_heads, head_dim, max_positions)``: what the runtime allocates caches for."""
        ...

    def prefill(self, tokens: torch.Tensor, encoder_states: torch.Tensor, cache: KVCache,
                cross: CrossKVCache) -> torch.Tensor:
        """Fill the cross-attention cache from ``encoder_states [B, S, D]`` (or the prefix slots) and run
        the prompt ``tokens [B, T]``; returns the logits ``[B, V]`` of the last position."""
        ...

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                    cross: CrossKVCache) -> torch.Tensor:
        """One token per row, ``tokens, positions [B]`` (cache slots) -> logits ``[B, V]``; writes the
        rows' K/V into ``cache`` at ``positions`` and reads slots below ``cache.span``."""
        ...
