"""The decode loop shared by every autoregressive pipeline.

``prefill`` (cross-attention K/V + prompt) once; then one :func:`decode_step` per token
until every row has produced ``eos`` or ``max_new_tokens`` are out; rows that finished are padded.

A decode step reads and writes only the device tensors of a :class:`DecodeState` (tokens, positions,
caches, sampler counters, the output buffer, done flags) and never syncs with the host, so on CUDA
it can be captured once per batch bucket as a graph and replayed, and so can the prefill with the
first pick (:mod:`.graphs`). Eager and graph decoding run the same calls on the same shapes: on CUDA
a batch is padded to its bucket in both modes (padding rows are marked done from the start), so both
give identical tokens. On CPU the same host-sync-free step is what a
:class:`~.recorded.RecordedSteps` records whole (the decoder's step, the pick and the bookkeeping)
and replays without Python, the sampler's random numbers drawn ahead for the request
(:meth:`~.sampler.Sampler.draw_ahead`).

A decoder either cross-attends to the encoder states (their K/V in the cross cache) or, when its
``uses_prefix`` is true (GIT, ClipCap), takes them as a prefix of input embeddings in front of the
prompt: then they fill the first self-attention cache slots at prefill and there is no cross cache.
``positions`` are cache slots either way.

With guidance (classifier-free / min-dalle's supercondition) the decoder runs ``2B`` rows, the
unconditioned copies of the B requests first, and the sampler combines each pair into one token that
both rows are fed next.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .. import ops
from ..errors import InputError
from .decoder import Decoder
from .kv_cache import CrossKVCache, KVCache
from .limits import MAX_NEW_TOKENS, check_int, check_new_tokens
from .recorded import RecordedSteps
from .sampler import Sampler, SamplingParams, check_sampling

# on CUDA, host reads of "all rows done?" happen every this many steps (each read is a sync)
CHECK_EVERY = 8
# on CPU with recordings the output buffer's length is a multiple of this (its shape is in the key)
OUT_BUCKET = 32


def batch_bucket(batch: int) -> int:
    """The padded batch a CUDA decode runs at: the next power of two."""
    return 1 << (batch - 1).bit_length()


@dataclass
class DecodeState:
    """Every tensor a decode step touches, for ``batch`` rows (a bucket on CUDA)."""

    cache: KVCache
    cross: CrossKVCache
    sampler: Sampler
    tokens: torch.Tensor     # (R,) the tokens fed to the next step (R = B, or 2B with guidance)
    positions: torch.Tensor  # (R,) their positions
    done: torch.Tensor       # (B,) bool
    step: torch.Tensor       # (B,) each row's index of its next output token; the sampler's Philox offsets
    min_new: torch.Tensor    # (B,) eos is suppressed while step < min_new
    out: torch.Tensor        # (B, N + 1) output tokens; done rows write their padding into the last column
    eos: int | None          # None: rows never stop early
    pad: int
    history: torch.Tensor | None = None      # (B, W + 1) prompt + output tokens (the repetition controls' input)
    history_len: torch.Tensor | None = None  # (B,) tokens in each row's history

    @classmethod
    def allocate(cls, decoder: Decoder, batch: int, cache_len: int, enc_len: int, out_len: int, dtype, device,
                 eos: int | None, pad: int, guided: bool = False, vocab_limit: int | None = None) -> DecodeState:
        layers, heads, head_dim, _ = decoder.cache_geometry()
        rows = 2 * batch if guided else batch
        if decoder.uses_prefix:  # the encoder states live in the self-attention cache
            enc_len = 0

        def ints(*shape):
            return torch.zeros(shape, dtype=torch.int64, device=device)

        lengths = torch.ones(rows, dtype=torch.int64, device=device)
        sampler = Sampler(SamplingParams(guidance_scale=1.0) if guided else None, batch, device, guided, vocab_limit)
        return cls(KVCache.allocate(layers, rows, heads, cache_len, head_dim, dtype, device),
                   CrossKVCache.allocate(layers, lengths, heads, enc_len, head_dim, dtype, device),
                   sampler, ints(rows), ints(rows),
                   torch.zeros(batch, dtype=torch.bool, device=device), ints(batch), ints(batch),
                   ints(batch, out_len + 1), eos, pad, ints(batch, cache_len + 2), ints(batch))

    @property
    def groups(self) -> int:
        """Decoder rows per output row: 2 with guidance, else 1."""
        return self.tokens.shape[0] // self.done.shape[0]

    def head(self, n: int) -> DecodeState:
        """The first ``n`` output rows, as views of these tensors (no guidance): a continuous batch
        whose occupied slots are ``0..n-1`` steps only them."""
        if self.groups != 1:
            raise ValueError("a guided state cannot be cut to its first rows")
        cache = KVCache(self.cache.k[:, :n], self.cache.v[:, :n], self.cache.span)
        cross = CrossKVCache(self.cross.k[:, :n], self.cross.v[:, :n], self.cross.lengths[:n])
        return DecodeState(cache, cross, self.sampler.view(slice(0, n)), self.tokens[:n], self.positions[:n],
                           self.done[:n], self.step[:n], self.min_new[:n], self.out[:n], self.eos, self.pad,
                           self.history[:n], self.history_len[:n])


def pick(logits: torch.Tensor, st: DecodeState) -> None:
    """Choose the next token of every row from ``logits [R, V]`` and record it (device ops only).
    In transformers' order: the repetition controls (over each row's history), the ``min_new``
    eos mask, then the sampler."""
    if st.sampler.penalize:
        s = st.sampler
        logits = ops.penalize(logits, st.history, st.history_len, s.repetition_penalty, s.no_repeat_ngram_size)
    if st.eos is not None:
        logits[:, st.eos].masked_fill_((st.step < st.min_new).repeat(st.groups), float("-inf"))
    tokens = torch.where(st.done, st.pad, st.sampler(logits, st.step))
    st.out.scatter_(1, torch.where(st.done, st.out.shape[1] - 1, st.step)[:, None], tokens[:, None])
    if st.history is not None:  # done rows write into the last column
        st.history.scatter_(1, torch.where(st.done, st.history.shape[1] - 1, st.history_len)[:, None],
                            tokens[:, None])
        st.history_len += ~st.done
    if st.eos is not None:
        st.done |= tokens == st.eos
    st.tokens.view(-1, tokens.shape[0]).copy_(tokens)  # with guidance: both rows of a pair
    st.step += 1


def decode_step(decoder: Decoder, st: DecodeState, forward=None) -> torch.Tensor:
    """Feed ``st.tokens`` at ``st.positions``, pick the next tokens; what a CUDA graph captures.
    Returns the step's logits ``[R, V]`` (what beam search continues from). ``forward``: what runs
    the decoder's step in place of ``decoder.decode_step`` (a :class:`~.recorded.RecordedSteps`)."""
    logits = (decoder.decode_step if forward is None else forward)(st.tokens, st.positions, st.cache, st.cross)
    pick(logits, st)
    st.positions += (~st.done).repeat(st.groups)  # done rows stay where they are (a free slot at 0)
    return logits


# the sampler's tensors a recorded pick reads (with penalize off: the repetition controls' are not read)
_PICK_FIELDS = ("temperature", "top_k", "top_p", "do_sample", "seeds", "rows", "guidance", "drawn")


def _state_tensors(st: DecodeState) -> tuple[torch.Tensor, ...]:
    """Every tensor of ``st`` that a step and its pick read or write, in :func:`_rebuild`'s order."""
    s = st.sampler
    own = (st.cache.k, st.cache.v, st.cross.k, st.cross.v, st.cross.lengths, st.tokens, st.positions, st.done,
           st.step, st.min_new, st.out, st.history, st.history_len)
    return own + tuple(getattr(s, name) for name in _PICK_FIELDS if getattr(s, name) is not None)


def _rebuild(st: DecodeState, tensors: tuple[torch.Tensor, ...], span: int) -> DecodeState:
    """``st`` with the tensors of :func:`_state_tensors` put in place (what a recording's inputs are)."""
    k, v, cross_k, cross_v, lengths, tokens, positions, done, step, min_new, out, history, history_len = tensors[:13]
    rest = iter(tensors[13:])
    sampler = copy.copy(st.sampler)
    for name in _PICK_FIELDS:
        if getattr(sampler, name) is not None:
            setattr(sampler, name, next(rest))
    return DecodeState(KVCache(k, v, span), CrossKVCache(cross_k, cross_v, lengths), sampler, tokens, positions, done,
                       step, min_new, out, st.eos, st.pad, history, history_len)


def _recorded_loop(decoder: Decoder, st: DecodeState, recorded: RecordedSteps, prompt: torch.Tensor,
                   encoder_states: torch.Tensor):
    """``(prefill(), step(span))``: the prefill with its pick and :func:`decode_step` (the decoder's
    step, the pick and the bookkeeping), each one call of ``recorded`` on the state's tensors, so a
    replay runs a whole step without Python. The pick must make no host call: no repetition
    controls, and a sampled pick looks its uniforms up in ``st.sampler.drawn``."""
    s = st.sampler
    tensors = _state_tensors(st)
    # what the pick decides on the host, baked into a recording: the sampler's CPU shortcuts
    # (ops.sampling.filter_logits: is any top-k / top-p on, and the largest k)
    n = s.drawn.shape[2] if s.drawn is not None else None
    filters = None if s.greedy else (int(s.top_k.clamp(0, n).max()), bool((s.top_p < 1).any()))
    extra = (st.eos, st.pad, s.greedy, s.vocab_limit, filters)

    def make_step(span):
        def step(*tensors):
            return decode_step(decoder, _rebuild(st, tensors, span))
        return step

    def make_prefill(span):
        def prefill(prompt, encoder_states, *tensors):
            view = _rebuild(st, tensors, span)
            logits = decoder.prefill(prompt, encoder_states, view.cache, view.cross)
            pick(logits, view)
            return logits
        return prefill

    run_step = recorded.bind("step+pick", make_step, tensors, extra)
    run_prefill = recorded.bind("prefill+pick", make_prefill, (prompt, encoder_states) + tensors, extra)
    return lambda: run_prefill(st.cache.span), run_step


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def check_fits(prefix: int, prompt_len: int, max_new_tokens: int, max_positions: int) -> int:
    """The positions a row feeds the model (the last new token is never fed back): ``prefix +
    prompt_len + max_new_tokens - 1``; InputError if that exceeds ``max_positions`` or there is
    nothing to condition on."""
    fed = prefix + prompt_len + max_new_tokens - 1
    if fed > max_positions:
        with_prefix = f" after a prefix of {prefix}" if prefix else ""
        raise InputError(f"prompt of {prompt_len}{with_prefix} + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's {max_positions} positions")
    if prefix + prompt_len == 0:
        raise InputError("nothing to condition on: an empty prompt and no prefix")
    return fed


def _pad_rows(x: torch.Tensor, rows: int, groups: int = 1) -> torch.Tensor:
    """``x`` (``groups`` equal blocks of rows) with each block padded to ``rows`` by copies of its
    first row (so padding rows compute on real data)."""
    blocks = x.chunk(groups)
    extra = rows - blocks[0].shape[0]
    if extra == 0:
        return x
    return torch.cat([torch.cat([b, b[:1].expand(extra, *b.shape[1:])]) for b in blocks])


def generate(*args, **kwargs) -> torch.Tensor:
    """The tokens :func:`generate_stream` ends with (no partial results): ``[B, max_new_tokens]``."""
    for tokens in generate_stream(*args, **kwargs):
        pass
    return tokens


@torch.inference_mode()
def generate_stream(decoder: Decoder, prompt: torch.Tensor, encoder_states: torch.Tensor, encoder_lengths: torch.Tensor,
                    max_new_tokens: int, *, eos_token_id: int | None, pad_token_id: int, min_new_tokens: int = 0,
                    sampling: SamplingParams | None = None, graphs=None, guided: bool = False,
                    vocab_limit: int | None = None, every: int | None = None, context: torch.Tensor | None = None,
                    recorded: RecordedSteps | None = None):
    """Generate ``[B, max_new_tokens]`` token ids after ``prompt [R, T]`` (prompt excluded), a generator.

    ``decoder``: a :class:`~mmgen_engine.runtime.decoder.Decoder`. ``encoder_states [R, S, D]`` with
    valid lengths ``encoder_lengths [R]`` (a prefix takes S cache slots before the prompt, which may
    then be empty). R = B, or with ``guided`` R = 2B: the unconditioned rows of the B
    requests, then the conditioned ones (``sampling.guidance_scale`` combines them). ``eos_token_id``
    (None: no early stop) is suppressed until ``min_new_tokens`` tokens exist; after a row emits it
    the row continues with ``pad_token_id``. ``vocab_limit``: tokens are drawn from ``0..n-1`` only.
    Yields the tokens so far ``[B, n]`` after every ``every`` tokens (None: never) and last all
    ``[B, max_new_tokens]``. ``graphs``: a :class:`~mmgen_engine.runtime.graphs.CUDAGraphs` of
    this decoder (made with the same ``guided`` and ``vocab_limit``) to replay the prefill and the
    steps from (CUDA only). ``context [B, C]``: ids the repetition controls see before the prompt
    (LLaVA's text before the image and its placeholder ids, which transformers counts in the input
    ids), none by default; at most as long as the prefix. ``recorded``: a
    :class:`~mmgen_engine.runtime.recorded.RecordedSteps` of this decoder that runs the CPU prefill
    and decode steps, replayed from recordings where it has them, ignored on CUDA. Greedy, or
    sampling over a ``vocab_limit`` slice, and without repetition controls, it records each whole
    step with its pick; otherwise the decoder's step alone. With its ``span_bucket`` of 1 the tokens
    are bitwise those without it; a larger bucket rounds the spans read (see its module).
    """
    groups = 2 if guided else 1
    if prompt.shape[0] % groups:
        raise InputError(f"guided generation needs an even number of rows, got {prompt.shape[0]}")
    batch, prompt_len = prompt.shape[0] // groups, prompt.shape[1]
    prefix = encoder_states.shape[1] if decoder.uses_prefix else 0
    _, _, _, max_positions = decoder.cache_geometry()
    max_new_tokens, min_new_tokens = check_new_tokens(max_new_tokens, min_new_tokens)
    check_sampling(sampling)
    if every is not None:
        check_int("every", every, 1, MAX_NEW_TOKENS)
    fed = check_fits(prefix, prompt_len, max_new_tokens, max_positions)
    seen = 0 if context is None else context.shape[1]
    if seen > prefix:  # the history holds the positions fed and a few more, not an unbounded context
        raise ValueError(f"a context of {seen} ids needs a prefix at least as long, got {prefix}")
    device, dtype = encoder_states.device, encoder_states.dtype
    cuda = device.type == "cuda"
    rows = batch_bucket(batch) if cuda else batch
    prompt, encoder_states = _pad_rows(prompt, rows, groups), _pad_rows(encoder_states, rows, groups)
    recorded = None if cuda or graphs is not None else recorded
    cache_len, out_len, span_bucket = fed, max_new_tokens, 1
    if recorded is not None:
        # requests of other lengths share the recordings: the output buffer (and with a span bucket
        # the cache and the spans read) sized in buckets
        span_bucket = recorded.span_bucket
        cache_len, out_len = _round_up(fed, span_bucket), _round_up(max_new_tokens, OUT_BUCKET)
    if graphs is not None:
        bucket = graphs.get(rows, encoder_states.shape[1], eos_token_id, pad_token_id)
        st = bucket.state
    else:
        st = DecodeState.allocate(decoder, rows, cache_len, encoder_states.shape[1], out_len, dtype, device,
                                  eos_token_id, pad_token_id, guided, vocab_limit)
    st.sampler.load(sampling)  # on the graph path its greedy flag picks the graphs' variant
    if graphs is not None:  # get (capture on first use) the graphs before the state is reset
        run_prefill, run_step = bucket.prefill(prompt, encoder_states), bucket.step()
    elif recorded is not None and not st.sampler.penalize and (
            st.sampler.greedy or (vocab_limit is not None and st.sampler.draw_ahead(max_new_tokens, vocab_limit,
                                                                                   out_len))):
        # the whole step recorded; the sampled pick's uniforms drawn up front (a vocabulary slice is
        # small; a whole text vocabulary is drawn only where the filters keep a token, per step)
        run_prefill, fused_step = _recorded_loop(decoder, st, recorded, prompt, encoder_states)

        def run_step():
            fused_step(st.cache.span)
    else:
        prefill = decoder.prefill if recorded is None else recorded.prefill

        def run_prefill():
            pick(prefill(prompt, encoder_states, st.cache, st.cross), st)

        def run_step():
            decode_step(decoder, st, recorded)
    # CUDA steps see the whole cache (static shapes for graphs; the kernels stop at each row's length);
    # CPU steps read only the slots in use (rounded up to the recordings' span bucket), set per step below
    st.cache.span = st.cache.k.shape[3]
    st.done.zero_()
    st.done[batch:] = True
    st.step.zero_()
    st.min_new.fill_(min_new_tokens)
    st.positions.fill_(prefix + prompt_len)
    st.out.fill_(pad_token_id)
    st.cross.lengths.copy_(_pad_rows(encoder_lengths.to(device), rows, groups))
    if seen:
        st.history[:, :seen] = _pad_rows(context.to(device), rows)
    st.history[:, seen:seen + prompt_len] = prompt[:rows]  # the conditioned rows' prompts (no guidance: all)
    st.history_len.fill_(seen + prompt_len)

    run_prefill()
    for step in range(1, max_new_tokens):
        if every is not None and step % every == 0:
            yield st.out[:batch, :step].clone()
        if eos_token_id is not None and (not cuda or step % CHECK_EVERY == 0) and bool(st.done.all()):
            break
        if not cuda:
            st.cache.span = min(_round_up(prefix + prompt_len + step, span_bucket), cache_len)
        run_step()
    yield st.out[:batch, :max_new_tokens].clone()
