"""Batched per-row token sampling.

For each row ``b`` of ``logits [B, V]`` (processing order as in Hugging Face's logits warpers):

1. ``do_sample[b]`` false: ``argmax(logits[b])`` (first index on ties, like ``torch.argmax``).
2. otherwise ``l = logits[b] / temperature[b]``; top-k keeps every token whose logit is >= the k-th
   largest (ties at the boundary are kept; ``top_k[b] == 0`` disables it); top-p removes the
   smallest-probability tokens whose cumulative probability (ascending) is <= ``1 - top_p[b]``,
   always keeping the most likely token; then the token is ``argmax(softmax(l) / noise[b])`` with
   ``noise`` i.i.d. Exponential(1) - an exact draw from the categorical distribution (the
   exponential race), which makes the randomness an explicit input so every backend given the same
   noise picks the same token.
"""
from __future__ import annotations

import torch

from .registry import dispatch, register


def filter_logits(logits, temperature, top_k, top_p):
    """Temperature, top-k and top-p of the sampling spec above; removed tokens become ``-inf``."""
    logits = logits.float() / temperature[:, None]
    vocab = logits.shape[-1]
    k = top_k.clamp(min=0, max=vocab)
    kth = torch.sort(logits, dim=-1, descending=True).values.gather(1, (k - 1).clamp(min=0)[:, None])
    logits = logits.masked_fill((logits < kth) & (k[:, None] > 0), float("-inf"))
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p)[:, None]
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


@register("sample", "reference")
def sample_reference(logits, temperature, top_k, top_p, do_sample, noise):
    greedy = logits.argmax(dim=-1)
    if noise is None:
        return greedy
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(do_sample, sampled, greedy)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           do_sample: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """Next tokens ``[B]`` from ``logits [B, V]`` and per-row ``temperature, top_k, top_p,
    do_sample [B]``; ``noise [B, V]`` Exponential(1) draws, or None when no row samples."""
    return dispatch("sample", logits)(logits, temperature, top_k, top_p, do_sample, noise)
