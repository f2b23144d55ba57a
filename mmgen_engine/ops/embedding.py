"""Token + position embedding: ``out[b, t] = wte[tokens[b, t]] + wpe[positions[b, t]]``."""
from __future__ import annotations

import torch

from .registry import dispatch, register


@register("embedding", "reference")
def embedding_reference(tokens, positions, wte, wpe):
    return wte[tokens] + wpe[positions]


def embedding(tokens: torch.Tensor, positions: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor) -> torch.Tensor:
    """``tokens, positions [B, T]`` int64, ``wte [V, D]``, ``wpe [P, D]`` -> ``[B, T, D]``."""
    return dispatch("embedding", wte)(tokens, positions, wte, wpe)
