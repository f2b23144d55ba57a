"""Embedding lookups: token + position embedding, optionally followed by LayerNorm (BERT/BLIP-style
embeddings), and the image decoders' code gather (``token_gather``, at the end).

``out[r] = wte[tokens[r]] + wpe[positions[r]]`` (the add in the table dtype, as the reference does),
then, when ``ln_weight`` is given, LayerNorm over the row in fp32.

One program per ``ROWS`` rows: gathers two table rows each and writes one (3·D·e bytes per row).
Token and position ids must be in range (the pipelines validate them before generation; the
sampler only produces in-range ids).
"""
from __future__ import annotations

import torch

import triton
import triton.language as tl

from .norm import normalize


@triton.jit
def _embedding_kernel(tok_ptr, pos_ptr, wte_ptr, wpe_ptr, lnw_ptr, lnb_ptr, out_ptr, n_rows, D,
                      stride_wte, stride_wpe, eps, HAS_LN: tl.constexpr, ROWS: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < D)
    tok = tl.load(tok_ptr + rows, mask=row_ok, other=0)
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=0)
    x = tl.load(wte_ptr + tok[:, None] * stride_wte + cols[None, :], mask=mask, other=0.0)
    x += tl.load(wpe_ptr + pos[:, None] * stride_wpe + cols[None, :], mask=mask, other=0.0)
    if HAS_LN:
        x = normalize(x, mask, cols, lnw_ptr, lnb_ptr, D, eps)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)


def embedding(tokens, positions, wte, wpe, ln_weight=None, ln_bias=None, eps=1e-5):
    d = wte.shape[1]
    if wte.stride(1) != 1 or wpe.stride(1) != 1:  # column-major tables (CPU layout) gather badly
        wte, wpe = wte.contiguous(), wpe.contiguous()
    tok = tokens.reshape(-1).contiguous()
    pos = positions.reshape(-1).contiguous()
    n = tok.numel()
    out = torch.empty(n, d, dtype=wte.dtype, device=wte.device)
    if n == 0:  # an empty prompt (ClipCap's): nothing to launch
        return out.view(*tokens.shape, d)
    block_d = triton.next_power_of_2(d)
    rows = max(1, min(16, 4096 // block_d))
    has_ln = ln_weight is not None
    _embedding_kernel[(triton.cdiv(n, rows),)](
        tok, pos, wte, wpe, ln_weight if has_ln else wte, ln_bias if has_ln else wte, out, n, d,
        wte.stride(0), wpe.stride(0), eps, HAS_LN=has_ln, ROWS=rows, BLOCK_D=block_d)
    return out.view(*tokens.shape, d)


@triton.jit
def _token_gather_kernel(tok_ptr, table_ptr, bias_ptr, out_ptr, n_rows, D, stride_table,
                         HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < D)
    tok = tl.load(tok_ptr + rows, mask=row_ok, other=0)
    x = tl.load(table_ptr + tok[:, None] * stride_table + cols[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=cols < D, other=0.0)[None, :]  # in the table dtype
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], x, mask=mask)


def token_gather(tokens, table, bias=None):
    """``out[r] = table[tokens[r]] (+ bias)``: the image decoders' code lookup (ops.token_gather);
    one program per ``ROWS`` rows, ``2·D·e`` bytes per row. Ids must be in range (checked by the
    pipelines, which decode only tokens they sampled or validated)."""
    d = table.shape[1]
    if table.stride(1) != 1:
        table = table.contiguous()
    tok = tokens.reshape(-1).contiguous()
    n = tok.numel()
    out = torch.empty(n, d, dtype=table.dtype, device=table.device)
    if n:
        block_d = triton.next_power_of_2(d)
        rows = max(1, min(16, 4096 // block_d))
        _token_gather_kernel[(triton.cdiv(n, rows),)](
            tok, table, bias if bias is not None else table, out, n, d, table.stride(0),
            HAS_BIAS=bias is not None, ROWS=rows, BLOCK_D=block_d)
    return out.view(*tokens.shape, d)
