"""Token + position embedding: ``out[b, t] = wte[tokens[b, t]] + wpe[positions[b, t]]``, followed by
``layer_norm(out, ln_weight, ln_bias, eps)`` when ``ln_weight`` is given (BERT-style embeddings)."""
from __future__ import annotations

import torch

from .norm import layer_norm_reference
from .registry import TRITON_DEVICES, dispatch, register, register_lazy


@register("embedding", "reference")
def embedding_reference(tokens, positions, wte, wpe, ln_weight=None, ln_bias=None, eps=1e-5):
    out = wte[tokens] + wpe[positions]
    return out if ln_weight is None else layer_norm_reference(out, ln_weight, ln_bias, eps)


register_lazy("embedding", "triton", "mmgen_engine.kernels.embedding:embedding", TRITON_DEVICES)


def embedding(tokens: torch.Tensor, positions: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor,
              ln_weight: torch.Tensor | None = None, ln_bias: torch.Tensor | None = None,
              eps: float = 1e-5) -> torch.Tensor:
    """``tokens, positions [B, T]`` (or ``[B]``) int64, ``wte [V, D]``, ``wpe [P, D]``, optional
    LayerNorm ``ln_weight, ln_bias [D]`` -> ``[B, T, D]`` (or ``[B, D]``)."""
    return dispatch("embedding", wte)(tokens, positions, wte, wpe, ln_weight, ln_bias, eps)
