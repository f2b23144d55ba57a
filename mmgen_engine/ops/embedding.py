"""Embedding lookups.

``embedding``: token + position embedding, ``out[b, t] = wte[tokens[b, t]] + wpe[positions[b, t]]``,
followed by ``layer_norm(out, ln_weight, ln_bias, eps)`` when ``ln_weight`` is given (BERT-style).

``token_gather``: ``out[...] = table[tokens[...]] (+ bias)``, rows in the tokens' order - the input
of the token decoders: VQGAN's and the motion VQ-VAE's codebook lookups, and the OpenAI dVAE's first
layer (a 1x1 convolution over one-hot codes is a gather of its weight's rows plus its bias). For
``tokens [B, h, w]`` the result ``[B, h, w, D]`` is channels-last image memory.
"""
from __future__ import annotations

import torch

from .norm import layer_norm_reference
from .registry import CUDA_DEVICES, HALF_DTYPES, TRITON_DEVICES, dispatch, register, register_lazy


@register("embedding", "reference")
def embedding_reference(tokens, positions, wte, wpe, ln_weight=None, ln_bias=None, eps=1e-5):
    out = wte[tokens] + wpe[positions]
    return out if ln_weight is None else layer_norm_reference(out, ln_weight, ln_bias, eps)


register_lazy("embedding", "triton", "mmgen_engine.kernels.embedding:embedding", TRITON_DEVICES)


@register("token_gather", "reference")
def token_gather_reference(tokens, table, bias=None):
    out = table[tokens]
    return out if bias is None else out + bias


register_lazy("token_gather", "triton", "mmgen_engine.kernels.embedding:token_gather", TRITON_DEVICES)
register_lazy("token_gather", "cuda", "mmgen_engine.ops.cuda_ops:token_gather", CUDA_DEVICES, HALF_DTYPES)


def embedding(tokens: torch.Tensor, positions: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor,
              ln_weight: torch.Tensor | None = None, ln_bias: torch.Tensor | None = None,
              eps: float = 1e-5) -> torch.Tensor:
    """``tokens, positions [B, T]`` (or ``[B]``) int64, ``wte [V, D]``, ``wpe [P, D]``, optional
    LayerNorm ``ln_weight, ln_bias [D]`` -> ``[B, T, D]`` (or ``[B, D]``)."""
    return dispatch("embedding", wte)(tokens, positions, wte, wpe, ln_weight, ln_bias, eps)


def token_gather(tokens: torch.Tensor, table: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``tokens [...]`` int64 in ``[0, V)``, ``table [V, D]``, optional ``bias [D]`` -> ``[..., D]``."""
    return dispatch("token_gather", table)(tokens, table, bias)
