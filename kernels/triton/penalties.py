"""Repetition penalty and the no-repeat-n-gram ban, in three launches.

Computes :func:`mmgen_engine.ops.penalize` (spec in :mod:`mmgen_engine.ops.penalties`). Each launch
writes what the previous one left, so the order of the writes to one column is the launch order,
never a race between programs:

1. ``_copy_kernel``, grid ``(R, cdiv(V, BLOCK_V))``: ``out = logits.float()`` (reads ``V`` logits,
   writes ``4 V`` bytes per row).
2. ``_penalty_kernel``, grid ``(R, cdiv(T, BLOCK_T))``, one program per row and block of history
   positions ``t < L``: gathers ``s = logits[r, h[t]]`` from the ORIGINAL row and writes ``s < 0 ? s * p
   : s / p`` to ``out[r, h[t]]``. A token occurring at several positions is written by each of them,
   with the same value (every write starts from the original score), so it is penalized once.
   Rows with ``p == 1`` return at once.
3. ``_ngram_kernel``, the same grid, over window starts ``i <= L - n``: compares the window's first
   ``n - 1`` tokens with the last ``n - 1`` (``n - 1`` loads of the block per program) and writes
   ``-inf`` to ``out[r, h[i + n - 1]]`` for each match. After launch 2, so ``-inf`` always wins;
   several windows banning one token write the same value. Rows with ``n <= 0`` or ``L < n`` (no
   window) return at once.

Launches 2 and 3 move ``O(L)`` and ``O(L n)`` bytes per row (L history ids, L gathered logits), next
to launch 1's ``O(V)``. Everything per step (logits, history, lengths, penalties, n-gram sizes) is
read from device memory and the grids depend on the shapes only, so a call can be captured in a
CUDA graph and replayed with new values. Bit for bit the reference: one fp32 multiply (exact under
any rounding of one operation) or an IEEE division (``div_rn``; Triton's ``/`` is approximate on
NVIDIA GPUs) per penalized element, and ``-inf``.
"""
from __future__ import annotations

import torch

import triton
import triton.language as tl

BLOCK_V = 1024  # columns per copy program
BLOCK_T = 256  # history positions (window starts) per penalty / n-gram program


@triton.jit
def _copy_kernel(logits_ptr, stride, out_ptr, V, BLOCK_V: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    x = tl.load(logits_ptr + r * stride + cols, mask=mask)
    tl.store(out_ptr + r * V + cols, x.to(tl.float32), mask=mask)


@triton.jit
def _length(lengths_ptr, r, T):
    """Row ``r``'s sequence length, clamped to ``[0, T]``."""
    return tl.minimum(tl.maximum(tl.load(lengths_ptr + r), 0), T)


@triton.jit
def _penalty_kernel(logits_ptr, stride, out_ptr, history_ptr, h_stride, lengths_ptr, penalty_ptr, V, T,
                    BLOCK_T: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * BLOCK_T
    p = tl.load(penalty_ptr + r)
    L = _length(lengths_ptr, r, T)
    if (p != 1.0) & (first < L):
        pos = first + tl.arange(0, BLOCK_T)
        tok = tl.load(history_ptr + r * h_stride + pos, mask=pos < L, other=-1)
        ok = (tok >= 0) & (tok < V)
        s = tl.load(logits_ptr + r * stride + tok, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + r * V + tok, tl.where(s < 0, s * p, tl.math.div_rn(s, p)), mask=ok)


@triton.jit
def _ngram_kernel(history_ptr, h_stride, out_ptr, lengths_ptr, ngram_ptr, V, T, BLOCK_T: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * BLOCK_T
    n = tl.load(ngram_ptr + r)
    L = _length(lengths_ptr, r, T)
    if (n >= 1) & (first <= L - n):  # then 1 <= n <= L <= T: n fits 32 bits
        row = history_ptr + r * h_stride
        i = first + tl.arange(0, BLOCK_T)  # window starts
        valid = i <= L - n
        match = valid
        start = L - n + 1  # the last n - 1 tokens, h[start:L]
        for j in range(0, n.to(tl.int32) - 1):
            match = match & (tl.load(row + i + j, mask=valid, other=0) == tl.load(row + start + j))
        tok = tl.load(row + i + (n - 1), mask=valid, other=-1)
        tl.store(out_ptr + r * V + tok, float("-inf"), mask=match & (tok >= 0) & (tok < V))


def penalize(logits, history, lengths, repetition_penalty, no_repeat_ngram_size):
    """Launcher with the reference's signature (shapes, dtypes and devices already checked by
    ``ops.penalize``)."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if history.stride(1) != 1:
        history = history.contiguous()
    lengths, penalty, ngram = (t.contiguous() for t in (lengths, repetition_penalty, no_repeat_ngram_size))
    rows, vocab = logits.shape
    length = history.shape[1]
    out = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
    _copy_kernel[(rows, triton.cdiv(vocab, BLOCK_V))](logits, logits.stride(0), out, vocab, BLOCK_V=BLOCK_V,
                                                     num_warps=4)
    if length == 0:  # no history: nothing to penalize or ban
        return out
    grid = (rows, triton.cdiv(length, BLOCK_T))
    _penalty_kernel[grid](logits, logits.stride(0), out, history, history.stride(0), lengths, penalty, vocab, length,
                          BLOCK_T=BLOCK_T, num_warps=4, enable_fp_fusion=False)
    _ngram_kernel[grid](history, history.stride(0), out, lengths, ngram, vocab, length, BLOCK_T=BLOCK_T,
                        num_warps=4)
    return out
