"""LayerNorm and fused residual add + LayerNorm.

``layer_norm``:     ``out = (x - mean) / sqrt(var + eps) * weight + bias`` over the last dim.
``add_layer_norm``: ``h = x + residual`` (rounded to the input dtype, as the reference does), then
                    ``(layer_norm(h), h)``.
``rms_norm``:       ``out = (x / sqrt(mean(x^2) + eps)).to(x.dtype) * weight`` (LLaMA's RMSNorm: the
                    normalized row is rounded to x's dtype before the weight multiplies it).

One program normalizes ``ROWS`` rows held whole in registers (``D`` up to 16384); statistics in fp32.
Bytes moved per row of width D and element size e: layer_norm reads x and writes out (2·D·e, plus
the weight and bias once per program); add_layer_norm reads x and residual and writes out and h
(4·D·e) — one pass instead of the three an unfused add + norm takes.
"""
from __future__ import annotations

import torch

import triton
import triton.language as tl


@triton.jit
def normalize(x, mask, cols, w_ptr, b_ptr, D, eps):
    """LayerNorm of the rows of ``x [ROWS, BLOCK_D]`` (``mask`` marks the real elements) in fp32."""
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    diff = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / D + eps)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    return diff * rstd[:, None] * w[None, :] + b[None, :]


@triton.jit
def rms_normalize(x, cols, w_ptr, D, eps):
    """RMSNorm of the rows of ``x [ROWS, BLOCK_D]`` (zeros past ``D``): statistics in fp32, the
    normalized row rounded to x's dtype, then times the weight."""
    h = x.to(tl.float32)
    h = (h * tl.rsqrt(tl.sum(h * h, axis=1) / D + eps)[:, None]).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0)
    return h.to(tl.float32) * w.to(tl.float32)[None, :]


@triton.jit
def _layer_norm_kernel(x_ptr, res_ptr, out_ptr, h_ptr, w_ptr, b_ptr, n_rows, D, eps,
                       HAS_RESIDUAL: tl.constexpr, RMS: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = x + tl.load(res_ptr + offs, mask=mask, other=0.0)  # in the input dtype, like the reference
        tl.store(h_ptr + offs, h, mask=mask)
        x = h
    if RMS:
        y = rms_normalize(x, cols, w_ptr, D, eps)
    else:
        y = normalize(x, mask, cols, w_ptr, b_ptr, D, eps)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, bias, eps, rms=False):
    d = x.shape[-1]
    x2 = x.contiguous().view(-1, d)
    out = torch.empty_like(x2)
    h = torch.empty_like(x2) if residual is not None else out
    res = residual.contiguous().view(-1, d) if residual is not None else x2
    block_d = triton.next_power_of_2(d)
    rows = max(1, min(16, 4096 // block_d))  # ~4096 elements per program
    n = x2.shape[0]
    _layer_norm_kernel[(triton.cdiv(n, rows),)](
        x2, res, out, h, weight, weight if rms else bias, n, d, eps, HAS_RESIDUAL=residual is not None, RMS=rms,
        ROWS=rows, BLOCK_D=block_d, num_warps=4 if block_d <= 2048 else 8)
    return out.view(x.shape), h.view(x.shape)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, bias, eps)[0]


def add_layer_norm(x, residual, weight, bias, eps):
    return _launch(x, residual, weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, None, eps, rms=True)[0]
