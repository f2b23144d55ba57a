"""Beam search, as transformers' ``generate(num_beams=K)`` (its vectorized ``_beam_search``).

Every request keeps ``K`` running beams (rows ``b * K .. b * K + K - 1`` of the decoder batch) and
its ``K`` best finished hypotheses. A step turns the beams' logits into fp32 log-probabilities
(``log_softmax``), applies the repetition controls and the ``min_new_tokens`` eos mask, adds each
beam's running score and takes the ``2K`` best (beam, token) continuations over all ``K * V``; the
best ``K`` that do not end (eos, or the length limit) run on, and those of the first ``K`` that end
join the finished hypotheses with the score ``sum of log-probs / new_tokens ** length_penalty``.
A request stops when ``early_stopping`` says so (True: ``K`` finished hypotheses; False: the best
running beam, normalized at its current length, cannot beat the worst finished one; ``"never"``:
the same at the longest possible length when ``length_penalty > 0``) or at ``max_new_tokens``; the
loop ends when every request has stopped (a stopped request's hypotheses can no longer change, as in
transformers, so running on for the others is harmless). The same operations in the same order as
transformers' give the same beams (``torch.topk`` breaks ties the same way).

Caches: the prompt is prefilled once per request; its self-attention slots are copied to the
request's ``K`` rows, while the cross-attention K/V stay one copy per request that the beams share
(``ops.decode_attention(..., group=K)``). After each step the rows' self-attention slots in use (and
only those) are gathered into their new beams' order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..errors import InputError
from .decoder import Decoder
from .kv_cache import CrossKVCache, KVCache
from .limits import check_new_tokens
from .sampler import SamplingParams

NEG = -1.0e9  # transformers' "impossible" score


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor [B, N, ...]`` at ``index [B, M]`` along dim 1 (transformers' ``_gather_beams``)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


@torch.inference_mode()
def beam_search(decoder: Decoder, prompt: torch.Tensor, encoder_states: torch.Tensor, encoder_lengths: torch.Tensor,
                max_new_tokens: int, *, eos_token_id: int | None, pad_token_id: int, min_new_tokens: int = 0,
                params: SamplingParams) -> torch.Tensor:
    """``[B * num_return_sequences, max_new_tokens]`` token ids after ``prompt [B, T]`` (excluded),
    the best hypotheses of each row first; after a hypothesis' eos its row holds ``pad_token_id``.
    Arguments as :func:`~mmgen_engine.runtime.generate.generate_stream` (no guidance)."""
    k, nrs = params.num_beams, params.num_return_sequences
    if params.do_sample:
        raise InputError("beam search samples no tokens: use num_beams > 1 with do_sample=False")
    max_new_tokens, min_new_tokens = check_new_tokens(max_new_tokens, min_new_tokens)
    batch, prompt_len = prompt.shape
    prefix = encoder_states.shape[1] if decoder.uses_prefix else 0
    layers, heads, head_dim, max_positions = decoder.cache_geometry()
    fed = prefix + prompt_len + max_new_tokens - 1
    if fed > max_positions:
        with_prefix = f" after a prefix of {prefix}" if prefix else ""
        raise InputError(f"prompt of {prompt_len}{with_prefix} + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's {max_positions} positions")
    if prefix + prompt_len == 0:
        raise InputError("nothing to condition on: an empty prompt and no prefix")
    device, dtype = encoder_states.device, encoder_states.dtype
    rows = batch * k

    # prefill once per request; its self-attention slots go to all K rows, the cross cache is shared
    width = prefix + prompt_len
    first = KVCache.allocate(layers, batch, heads, width, head_dim, dtype, device)
    cross = CrossKVCache.allocate(layers, encoder_lengths.to(device), heads, 0 if prefix else encoder_states.shape[1],
                                  head_dim, dtype, device)
    logits = decoder.prefill(prompt, encoder_states, first, cross).repeat_interleave(k, dim=0)
    cache = KVCache.allocate(layers, rows, heads, max(fed, width), head_dim, dtype, device)
    cache.k[:, :, :, :width] = first.k.repeat_interleave(k, dim=1)
    cache.v[:, :, :, :width] = first.v.repeat_interleave(k, dim=1)
    del first

    # transformers' state, per request and beam
    max_length = prompt_len + max_new_tokens
    running = torch.full((batch, k, max_length), pad_token_id, dtype=torch.int64, device=device)
    running[:, :, :prompt_len] = prompt[:, None]
    sequences = running.clone()
    running_scores = torch.zeros(batch, k, dtype=torch.float32, device=device)
    running_scores[:, 1:] = NEG
    scores = torch.full((batch, k), NEG, dtype=torch.float32, device=device)
    finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    keep = 2 * k  # candidates per request: enough that K of them do not end
    top_k_mask = torch.arange(keep, device=device) < k
    penalize = params.repetition_penalty != 1 or params.no_repeat_ngram_size > 0
    if penalize:
        penalty = torch.full((rows,), params.repetition_penalty, dtype=torch.float32, device=device)
        ngram = torch.full((rows,), params.no_repeat_ngram_size, dtype=torch.int64, device=device)
    offsets = (torch.arange(batch, device=device) * k)[:, None]
    positions = torch.empty(rows, dtype=torch.int64, device=device)

    cur_len = prompt_len
    while True:
        log_probs = F.log_softmax(logits.float(), dim=-1)
        if penalize:
            history_len = torch.full((rows,), cur_len, dtype=torch.int64, device=device)
            log_probs = ops.penalize(log_probs, running.view(rows, -1), history_len, penalty, ngram)
        if eos_token_id is not None and cur_len - prompt_len < min_new_tokens:
            log_probs[:, eos_token_id] = float("-inf")
        vocab = log_probs.shape[-1]
        log_probs = (log_probs.view(batch, k, vocab) + running_scores[:, :, None]).view(batch, k * vocab)

        # the 2K best continuations over all beams
        top_scores, top_index = torch.topk(log_probs, keep)
        top_beam = top_index // vocab
        top_sequences = _gather(running, top_beam)
        top_tokens = top_index % vocab
        top_sequences[:, :, cur_len] = top_tokens
        ends = torch.full_like(top_tokens, cur_len + 1 >= max_length, dtype=torch.bool)
        if eos_token_id is not None:
            ends |= top_tokens == eos_token_id

        # the K best that go on
        go_on = top_scores + ends.to(torch.float32) * NEG
        chosen = torch.topk(go_on, k)[1]
        running = _gather(top_sequences, chosen)
        running_scores = _gather(go_on, chosen)
        source = (_gather(top_beam, chosen) + offsets).view(-1)  # each new beam's row before the step

        # the finished hypotheses: the best K of the old ones and those of the first K that just ended
        just_ended = ends & top_k_mask[None, :]
        normalized = top_scores / ((cur_len + 1 - prompt_len) ** params.length_penalty)
        full = torch.all(finished, dim=-1, keepdim=True) & (params.early_stopping is True)
        normalized += full.to(torch.float32) * NEG
        normalized += (~improvable).to(torch.float32) * NEG
        normalized += (~just_ended) * NEG
        best = torch.topk(torch.cat((scores, normalized), dim=1), k)[1]
        sequences = _gather(torch.cat((sequences, top_sequences), dim=1), best)
        scores = _gather(torch.cat((scores, normalized), dim=1), best)
        finished = _gather(torch.cat((finished, just_ended), dim=1), best)

        cur_len += 1
        if params.early_stopping == "never" and params.length_penalty > 0.0:
            best_length = max_length - prompt_len
        else:
            best_length = cur_len - prompt_len
        best_running = running_scores[:, :1] / (best_length ** params.length_penalty)
        worst_finished = torch.where(finished, torch.min(scores, dim=1, keepdim=True)[0], NEG)
        improvable = improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        open_beams = ~(torch.all(finished) & (params.early_stopping is True))
        if not bool(torch.any(improvable) & open_beams & ~torch.all(ends)):
            break

        # the new beams' caches (the slots in use), then the step that feeds their last tokens
        used = prefix + cur_len - 1
        for buffer in (cache.k, cache.v):
            buffer[:, :, :, :used] = buffer[:, :, :, :used].index_select(1, source)
        positions.fill_(used)
        cache.span = used + 1
        logits = decoder.decode_step(running[:, :, cur_len - 1].reshape(rows), positions, cache, cross)

    out = sequences[:, :nrs, prompt_len:].reshape(batch * nrs, max_new_tokens)
    if eos_token_id is not None:  # after its eos a hypothesis holds padding
        after = (out == eos_token_id).int().cumsum(dim=1) - (out == eos_token_id).int() > 0
        out = out.masked_fill(after, pad_token_id)
    return out
