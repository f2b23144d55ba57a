"""Repetition controls of text generation: a repetition penalty, then a ban on repeated n-grams.

``penalize(logits, history, lengths, repetition_penalty, no_repeat_ngram_size) -> [R, V] float32``

- ``logits [R, V]`` fp32/fp16/bf16, one row per sequence being decoded.
- ``history [R, T]`` int64: row r's sequence so far is ``h = history[r, :L]``, ``L = lengths[r]``
  (``lengths [R]`` int64, clamped to ``[0, T]``; the columns from ``L`` on are never read as tokens).
  It is transformers' ``input_ids`` of the row: for a decoder-only model the prompt and the tokens
  generated so far; for an encoder-decoder model the decoder start token, the decoder prompt and the
  generated tokens. The caller builds it so.
- ``repetition_penalty [R]`` float32, ``p`` (1.0 = off; transformers requires ``p > 0``),
  ``no_repeat_ngram_size [R]`` int64, ``n`` (``n <= 0`` = off).

Per row r, in fp32: ``s = logits[r].float()``, then

1. Repetition penalty (transformers' ``RepetitionPenaltyLogitsProcessor``): every vocabulary id ``v``
   that occurs in ``h`` gets ``s[v] < 0 ? s[v] * p : s[v] / p`` (one IEEE fp32 multiply or division)
   computed from the original ``s[v]``: a token occurring several times is penalized once.
2. No repeated n-grams (transformers' ``NoRepeatNGramLogitsProcessor``): if ``n >= 1`` and
   ``L + 1 >= n``, the next token must not complete an n-gram already in ``h``: for every window
   start ``0 <= i <= L - n`` whose first ``n - 1`` tokens equal the last ``n - 1`` tokens of ``h``
   (``h[i + j] == h[L - n + 1 + j]`` for ``j < n - 1``; always true for ``n == 1``, which bans every
   token of ``h``), token ``h[i + n - 1]`` gets ``-inf``. (No window exists unless ``L >= n``, so with
   ``L == n - 1`` nothing is banned, as in transformers' ``_calc_banned_ngram_tokens``.) ``-inf``
   overrides the penalty.

Ids outside ``[0, V)`` in ``h`` are never penalized or banned (transformers ignores ids past the
lm head's vocabulary too) but take part in the n-gram comparisons as they are. A row with ``p == 1``
and ``n <= 0`` is its logits cast to fp32. The result is always a new tensor.

Equal to transformers' processors applied in this order to the fp32 scores (transformers' generate
casts the logits to fp32 before its processors) on CPU; on CUDA, torch divides by a Python scalar as
a multiply by its reciprocal, so transformers' ``s / p`` there can differ from this op's by an ulp.

The CPU path skips the work no row needs (the checks wait for their values: CUDA graphs forbid
them); on other devices every step has a shape known from the arguments' shapes alone, and nothing is
read back to the host, so a call can be captured in a CUDA graph and replayed with new values.
"""
from __future__ import annotations

import torch

from .registry import TRITON_DEVICES, dispatch, register, register_lazy

# elements of one block of the n-gram comparison ([R, T, chunk] gathered int64 tokens: 32 MiB)
_MATCH_ELEMENTS = 1 << 22


def _ngram_banned(history, lengths, n, vocab, max_n):
    """``[R, V] bool``: the tokens step 2 bans. ``max_n`` bounds ``n`` (the loop over the compared
    positions ``j < n - 1`` stops below ``max_n - 1``)."""
    rows, length = history.shape
    device = history.device
    i = torch.arange(length, device=device)  # window starts
    start = lengths - n + 1  # where the last n - 1 tokens start
    match = torch.ones(rows, length, dtype=torch.bool, device=device)
    span = max(0, min(length, max_n) - 1)  # positions j compared: j < n - 1 <= L - 1 <= T - 1
    chunk = max(1, min(span, _MATCH_ELEMENTS // max(1, rows * length)))
    for j0 in range(0, span, chunk):
        j = torch.arange(j0, min(j0 + chunk, span), device=device)
        window = history.gather(1, (i[:, None] + j).clamp(max=length - 1).view(1, -1).expand(rows, -1))
        suffix = history.gather(1, (start[:, None] + j).clamp(min=0, max=length - 1))
        equal = window.view(rows, length, -1) == suffix[:, None, :]
        match &= (equal | (j >= (n - 1)[:, None])[:, None, :]).all(dim=-1)
    token = history.gather(1, (i + n[:, None] - 1).clamp(min=0, max=length - 1))
    ban = match & (n[:, None] >= 1) & (i <= (lengths - n)[:, None]) & (token >= 0) & (token < vocab)
    banned = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=device)
    banned.scatter_(1, torch.where(ban, token, vocab), True)  # the others to a spare column
    return banned[:, :vocab]


def _host_shortcuts(device: torch.device) -> bool:
    """Whether the reference may read values back to the host to skip work: on CPU only (the tests
    patch this to run the fixed-shape path of the other devices on CPU)."""
    return device.type == "cpu"


@register("penalize", "reference")
def penalize_reference(logits, history, lengths, repetition_penalty, no_repeat_ngram_size):
    out = logits.to(torch.float32, copy=True)
    rows, vocab = out.shape
    cpu = _host_shortcuts(out.device)
    lengths = lengths.clamp(min=0, max=history.shape[1])
    p, n = repetition_penalty.float(), no_repeat_ngram_size
    if cpu:  # only the history every row reads; nothing at all when no row needs it
        history = history[:, :int(lengths.max())]
        if history.shape[1] == 0 or not bool(((p != 1) | (n > 0)).any()):
            return out
    positions = torch.arange(history.shape[1], device=out.device)
    # 1. the repetition penalty, from the original scores; every occurrence writes the same value
    if not cpu or bool((p != 1).any()):
        occurs = (positions < lengths[:, None]) & (history >= 0) & (history < vocab)
        seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=out.device)
        seen.scatter_(1, torch.where(occurs, history, vocab), True)
        penalized = torch.where(out < 0, out * p[:, None], out / p[:, None])
        out = torch.where(seen[:, :vocab] & (p != 1)[:, None], penalized, out)
    # 2. -inf for the tokens that would complete an n-gram of the history
    if not cpu or bool((n > 0).any()):
        max_n = history.shape[1] if not cpu else int(n.max())
        out = out.masked_fill(_ngram_banned(history, lengths, n, vocab, max_n), float("-inf"))
    return out


register_lazy("penalize", "triton", "mmgen_engine.kernels.penalties:penalize", TRITON_DEVICES)
# No ``cuda`` implementation: on a GPU the Triton kernel is the default, and MMGEN_BACKEND=cuda (every
# op) fails loudly for this op, as for every op without a CUDA kernel; force others per op instead.


def penalize(logits: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor, repetition_penalty: torch.Tensor,
             no_repeat_ngram_size: torch.Tensor) -> torch.Tensor:
    """The fp32 logits ``[R, V]`` with the repetition penalty and the n-gram ban of each row applied,
    see the module docstring. Shapes, dtypes and devices are checked here; values are not (that would
    sync with the device)."""
    if logits.dim() != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"logits must be [R, V] with R, V >= 1, got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    rows = logits.shape[0]
    if history.dim() != 2 or history.shape[0] != rows:
        raise ValueError(f"history must be [R, T] with R = {rows} (logits' rows), got shape {tuple(history.shape)}")
    for name, t, dtype in [("history", history, torch.int64), ("lengths", lengths, torch.int64),
                           ("repetition_penalty", repetition_penalty, torch.float32),
                           ("no_repeat_ngram_size", no_repeat_ngram_size, torch.int64)]:
        if name != "history" and tuple(t.shape) != (rows,):
            raise ValueError(f"{name} must have shape [R] = ({rows},), got {tuple(t.shape)}")
        if t.dtype != dtype or t.device != logits.device:
            raise ValueError(f"{name} must be a tensor of {str(dtype).removeprefix('torch.')} on {logits.device}, "
                             f"got {str(t.dtype).removeprefix('torch.')} on {t.device}")
    return dispatch("penalize", logits)(logits, history, lengths, repetition_penalty, no_repeat_ngram_size)
