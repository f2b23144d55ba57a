"""Attention ops.

``attention`` (prefill / encoder): ``softmax(q k^T * scale + mask) v`` for whole sequences,
q ``[B, H, Tq, D]``, k/v ``[B, H, Tk, D]``. The mask removes key ``s`` from query ``t`` when
``causal and s > t`` (``causal`` requires ``Tq == Tk``) or when ``s >= key_lengths[b]``.

``decode_attention`` (one new query per row against a cache): for row ``b`` only keys
``0 .. lengths[b]-1`` take part:
``out[b, h] = sum_s softmax_s(q[b, h] . k[b, h, s] * scale) v[b, h, s]``, ``s < lengths[b]``.
The same op serves causal self-attention over the static KV cache (``lengths`` = tokens so far) and
cross-attention over cached encoder K/V (``lengths`` = encoder length of the row). Every row needs
``lengths[b] >= 1``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import dispatch, register


@register("attention", "reference")
def attention_reference(q, k, v, scale, causal, key_lengths):
    if key_lengths is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    keep = torch.arange(k.shape[2], device=q.device)[None, :] < key_lengths[:, None]  # (B, Tk)
    keep = keep[:, None, None, :]  # (B, 1, 1, Tk)
    if causal:
        keep = keep & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)


@register("decode_attention", "reference")
def decode_attention_reference(q, k, v, lengths, scale):
    # scores and softmax in fp32; k/v may be a view of the first S slots of a larger cache.
    # (explicit math: torch's CPU SDPA with a mask is ~100x slower for a single query)
    scores = (q.float()[:, :, None] @ k.float().transpose(-1, -2)) * scale  # (B, H, 1, S)
    pad = torch.arange(k.shape[2], device=q.device)[None, :] >= lengths[:, None]  # (B, S)
    probs = scores.masked_fill(pad[:, None, None, :], float("-inf")).softmax(dim=-1)
    return (probs @ v.float())[:, :, 0].to(q.dtype)  # (B, H, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
              key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Full attention, ``q [B, H, Tq, D]``, ``k, v [B, H, Tk, D]``, optional ``key_lengths [B]``
    -> ``[B, H, Tq, D]``."""
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs Tq == Tk, got {q.shape[2]} and {k.shape[2]}")
    return dispatch("attention", q)(q, k, v, scale, causal, key_lengths)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One query per row: ``q [B, H, D]``, ``k, v [B, H, S, D]``, ``lengths [B]`` -> ``[B, H, D]``."""
    return dispatch("decode_attention", q)(q, k, v, lengths, scale)
