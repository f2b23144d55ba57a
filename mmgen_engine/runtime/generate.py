"""The decode loop shared by every autoregressive pipeline.

``prefill`` (cross-attention K/V + prompt) once, then ``decode_step`` one token per row until every
row has produced ``eos`` or ``max_new_tokens`` are out. Rows that finished are padded.
"""
from __future__ import annotations

import torch

from ..errors import InputError
from .kv_cache import CrossKVCache, KVCache
from .sampler import Sampler, SamplingParams


@torch.inference_mode()
def generate(decoder, prompt: torch.Tensor, encoder_states: torch.Tensor, encoder_lengths: torch.Tensor,
             max_new_tokens: int, *, eos_token_id: int, pad_token_id: int, min_new_tokens: int = 0,
             sampling: SamplingParams | None = None) -> torch.Tensor:
    """Generate ``[B, max_new_tokens]`` token ids after ``prompt [B, T]`` (prompt excluded).

    ``decoder`` exposes ``cache_geometry()``, ``prefill(tokens, encoder_states, cache, cross)`` and
    ``decode_step(tokens, positions, cache, cross)``. ``encoder_states [B, S, D]`` with valid lengths
    ``encoder_lengths [B]``. ``eos_token_id`` is suppressed until ``min_new_tokens`` tokens exist;
    after a row emits it the row continues with ``pad_token_id``.
    """
    batch, prompt_len = prompt.shape
    num_layers, num_heads, head_dim, max_positions = decoder.cache_geometry()
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(min_new_tokens, int) or not 0 <= min_new_tokens <= max_new_tokens:
        raise InputError(f"min_new_tokens must be an integer in [0, max_new_tokens], got {min_new_tokens!r}")
    # the last new token is never fed back, so the model sees prompt_len + max_new_tokens - 1 positions
    fed = prompt_len + max_new_tokens - 1
    if fed > max_positions:
        raise InputError(f"prompt of {prompt_len} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"{max_positions} positions")
    device, dtype = encoder_states.device, encoder_states.dtype
    cache = KVCache.allocate(num_layers, batch, num_heads, fed, head_dim, dtype, device)
    cross = CrossKVCache.allocate(num_layers, encoder_lengths, num_heads, encoder_states.shape[1], head_dim,
                                  dtype, device)
    sampler = Sampler(sampling, batch, device)

    out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.int64, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    positions = torch.full((batch,), prompt_len, dtype=torch.int64, device=device)
    logits = decoder.prefill(prompt, encoder_states, cache, cross)
    for step in range(max_new_tokens):
        if step < min_new_tokens:
            logits[:, eos_token_id] = float("-inf")
        tokens = torch.where(done, pad_token_id, sampler(logits))
        out[:, step] = tokens
        done |= tokens == eos_token_id
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        cache.span = prompt_len + step + 1
        logits = decoder.decode_step(tokens, positions, cache, cross)
        positions += 1
    return out
