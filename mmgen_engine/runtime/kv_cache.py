"""Preallocated caches owned by the runtime and handed to a decoder.

:class:`KVCache` holds self-attention keys/values of every layer in one static buffer
``[L, B, H, S, Dh]``: a decode step writes one slot per row and never reallocates, so its shapes are
fixed (what CUDA-graph capture needs). ``span`` tells the decoder how many leading slots any row may
read this step, so an eager step does not touch the unused tail of the buffer.

:class:`CrossKVCache` holds the encoder keys/values ``[L, B, H, S_enc, Dh]``, computed once at prefill
and only read afterwards, and the per-row encoder ``lengths [B]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    k: torch.Tensor  # (L, B, H, S, Dh)
    v: torch.Tensor
    span: int = 0

    @classmethod
    def allocate(cls, num_layers, batch, num_heads, max_len, head_dim, dtype, device) -> KVCache:
        shape = (num_layers, batch, num_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))


@dataclass
class CrossKVCache:
    k: torch.Tensor  # (L, B, H, S_enc, Dh)
    v: torch.Tensor
    lengths: torch.Tensor  # (B,) int64, valid encoder positions per row

    @classmethod
    def allocate(cls, num_layers, lengths, num_heads, enc_len, head_dim, dtype, device) -> CrossKVCache:
        shape = (num_layers, lengths.shape[0], num_heads, enc_len, head_dim)
        # zeros, not empty: rows padded to a batch bucket read slot 0 and must see finite values
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   lengths.to(device=device, dtype=torch.int64))
