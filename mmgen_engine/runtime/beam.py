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
only those) are gathered into their new beams' order. On CUDA the decoder step can be replayed from
a CUDA graph; the beam bookkeeping (a few dozen small ops) runs eagerly and reads one flag back per
step (has every request stopped?).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..errors import InputError
from .decoder import Decoder
from .generate import check_fits
from .graphs import capture
from .kv_cache import CrossKVCache, KVCache
from .limits import check_new_tokens
from .sampler import SamplingParams

NEG = -1.0e9  # transformers' "impossible" score


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor [B, N, ...]`` at ``index [B, M]`` along dim 1 (transformers' ``_gather_beams``)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


class Beams:
    """The beam-search state of ``batch`` requests of ``K = params.num_beams`` beams each
    (transformers' running and finished hypotheses, per request), on the device.

    :meth:`step` takes the logits of the ``batch * K`` beam rows (request-major) and returns each
    row's next token and the row it continues (the caller feeds those tokens and gathers its caches
    by those rows), or None when every request has stopped; :meth:`result` gives the best
    hypotheses. ``prompt [batch, T]`` (the decoder's input ids so far) starts every beam.
    """

    def __init__(self, prompt: torch.Tensor, max_new_tokens: int, eos_token_id: int | None, pad_token_id: int,
                 min_new_tokens: int, params: SamplingParams):
        if params.do_sample:
            raise InputError("beam search samples no tokens: use num_beams > 1 with do_sample=False")
        self.params, self.eos, self.pad, self.min_new = params, eos_token_id, pad_token_id, min_new_tokens
        device = prompt.device
        self.batch, self.prompt_len = prompt.shape
        k = self.k = params.num_beams
        self.max_length = self.prompt_len + max_new_tokens
        self.running = torch.full((self.batch, k, self.max_length), pad_token_id, dtype=torch.int64, device=device)
        self.running[:, :, :self.prompt_len] = prompt[:, None]
        self.sequences = self.running.clone()
        self.running_scores = torch.zeros(self.batch, k, dtype=torch.float32, device=device)
        self.running_scores[:, 1:] = NEG
        self.scores = torch.full((self.batch, k), NEG, dtype=torch.float32, device=device)
        self.finished = torch.zeros(self.batch, k, dtype=torch.bool, device=device)
        self.improvable = torch.ones(self.batch, 1, dtype=torch.bool, device=device)
        self.top_k_mask = torch.arange(2 * k, device=device) < k  # of the 2K candidates, the first K may finish
        self.penalize = params.repetition_penalty != 1 or params.no_repeat_ngram_size > 0
        rows = self.batch * k
        self.penalty = torch.full((rows,), params.repetition_penalty, dtype=torch.float32, device=device)
        self.ngram = torch.full((rows,), params.no_repeat_ngram_size, dtype=torch.int64, device=device)
        self.offsets = (torch.arange(self.batch, device=device) * k)[:, None]
        self.cur_len = self.prompt_len

    @property
    def new_tokens(self) -> int:
        """Tokens each running beam has generated."""
        return self.cur_len - self.prompt_len

    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Advance every request by one token from ``logits [batch * K, V]``; returns ``(tokens,
        source)``, both ``[batch * K]``: row ``r`` continues row ``source[r]`` with ``tokens[r]``;
        None once no request can change any more."""
        batch, k, p, cur_len = self.batch, self.k, self.params, self.cur_len
        log_probs = F.log_softmax(logits.float(), dim=-1)
        if self.penalize:
            history_len = torch.full((batch * k,), cur_len, dtype=torch.int64, device=logits.device)
            log_probs = ops.penalize(log_probs, self.running.view(batch * k, -1), history_len, self.penalty, self.ngram)
        if self.eos is not None and cur_len - self.prompt_len < self.min_new:
            log_probs[:, self.eos] = float("-inf")
        vocab = log_probs.shape[-1]
        log_probs = (log_probs.view(batch, k, vocab) + self.running_scores[:, :, None]).view(batch, k * vocab)

        # the 2K best continuations over all beams
        top_scores, top_index = torch.topk(log_probs, 2 * k)
        top_beam = top_index // vocab
        top_sequences = _gather(self.running, top_beam)
        top_tokens = top_index % vocab
        top_sequences[:, :, cur_len] = top_tokens
        ends = torch.full_like(top_tokens, cur_len + 1 >= self.max_length, dtype=torch.bool)
        if self.eos is not None:
            ends |= top_tokens == self.eos

        # the K best that go on
        go_on = top_scores + ends.to(torch.float32) * NEG
        chosen = torch.topk(go_on, k)[1]
        self.running = _gather(top_sequences, chosen)
        self.running_scores = _gather(go_on, chosen)
        source = (_gather(top_beam, chosen) + self.offsets).view(-1)  # each new beam's row before the step

        # the finished hypotheses: the best K of the old ones and those of the first K that just ended
        just_ended = ends & self.top_k_mask[None, :]
        normalized = top_scores / ((cur_len + 1 - self.prompt_len) ** p.length_penalty)
        full = torch.all(self.finished, dim=-1, keepdim=True) & (p.early_stopping is True)
        normalized += full.to(torch.float32) * NEG
        normalized += (~self.improvable).to(torch.float32) * NEG
        normalized += (~just_ended) * NEG
        best = torch.topk(torch.cat((self.scores, normalized), dim=1), k)[1]
        self.sequences = _gather(torch.cat((self.sequences, top_sequences), dim=1), best)
        self.scores = _gather(torch.cat((self.scores, normalized), dim=1), best)
        self.finished = _gather(torch.cat((self.finished, just_ended), dim=1), best)

        self.cur_len = cur_len = cur_len + 1
        if p.early_stopping == "never" and p.length_penalty > 0.0:
            best_length = self.max_length - self.prompt_len
        else:
            best_length = cur_len - self.prompt_len
        best_running = self.running_scores[:, :1] / (best_length ** p.length_penalty)
        worst_finished = torch.where(self.finished, torch.min(self.scores, dim=1, keepdim=True)[0], NEG)
        self.improvable = self.improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        open_beams = ~(torch.all(self.finished) & (p.early_stopping is True))
        if not bool(torch.any(self.improvable) & open_beams & ~torch.all(ends)):
            return None
        return self.running[:, :, cur_len - 1].reshape(batch * k), source

    def result(self) -> torch.Tensor:
        """The best ``num_return_sequences`` hypotheses of each request, ``[batch * n, max_new_tokens]``
        (prompt excluded), best first; after its eos a hypothesis holds padding."""
        nrs = self.params.num_return_sequences
        out = self.sequences[:, :nrs, self.prompt_len:].reshape(self.batch * nrs, -1)
        if self.eos is not None:
            after = (out == self.eos).int().cumsum(dim=1) - (out == self.eos).int() > 0
            out = out.masked_fill(after, self.pad)
        return out


@torch.inference_mode()
def beam_search(decoder: Decoder, prompt: torch.Tensor, encoder_states: torch.Tensor, encoder_lengths: torch.Tensor,
                max_new_tokens: int, *, eos_token_id: int | None, pad_token_id: int, min_new_tokens: int = 0,
                params: SamplingParams, cuda_graphs: bool = False, context: torch.Tensor | None = None) -> torch.Tensor:
    """``[B * num_return_sequences, max_new_tokens]`` token ids after ``prompt [B, T]`` (excluded),
    the best hypotheses of each row first; after a hypothesis' eos its row holds ``pad_token_id``.
    Arguments as :func:`~mmgen_engine.runtime.generate.generate_stream` (no guidance). With
    ``cuda_graphs`` on a CUDA device the beams' decoder step (all layers and the head, over the
    whole cache: the kernels stop at each row's length) is captured once per call and replayed.
    ``context [B, C]``: ids before the prompt that the repetition controls see (see ``generate_stream``)."""
    max_new_tokens, min_new_tokens = check_new_tokens(max_new_tokens, min_new_tokens)
    seen = prompt if context is None else torch.cat([context.to(prompt.device), prompt], dim=1)
    beams = Beams(seen, max_new_tokens, eos_token_id, pad_token_id, min_new_tokens, params)
    k = params.num_beams
    batch, prompt_len = prompt.shape
    prefix = encoder_states.shape[1] if decoder.uses_prefix else 0
    layers, heads, head_dim, max_positions = decoder.cache_geometry()
    fed = check_fits(prefix, prompt_len, max_new_tokens, max_positions)
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
    positions = torch.full((rows,), width, dtype=torch.int64, device=device)
    fed_tokens = torch.zeros(rows, dtype=torch.int64, device=device)
    graphed = cuda_graphs and device.type == "cuda"
    if graphed:  # the warm-up writes slot `width` only, which the first real step rewrites
        cache.span = cache.k.shape[3]
        replay, step_logits = capture(lambda: decoder.decode_step(fed_tokens, positions, cache, cross), device)
    while (picked := beams.step(logits)) is not None:
        tokens, source = picked
        # the new beams' caches (the slots in use, and only those), then the step that feeds their tokens
        used = width + beams.new_tokens - 1
        for buffer in (cache.k, cache.v):
            buffer[:, :, :, :used] = buffer[:, :, :, :used].index_select(1, source)
        positions.fill_(used)
        fed_tokens.copy_(tokens)
        if graphed:
            replay()
            logits = step_logits
        else:
            cache.span = used + 1
            logits = decoder.decode_step(fed_tokens, positions, cache, cross)
    return beams.result()
