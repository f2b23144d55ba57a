"""Fused bias + GELU: ``out = gelu(x + bias)``, erf, tanh or sigmoid form, the gated GELU
``gelu(x[..., :H]) * x[..., H:]``, and bias + ReLU ``max(x + bias, 0)`` (see ``ops.activation``).

Elementwise over ``x [..., N]`` with ``bias [N]`` broadcast: reads x once and writes out once
(2·numel·e bytes) instead of the add's and the GELU's two passes. The gated form reads ``2H`` and
writes ``H`` per row, where unfused it would write and re-read the GELU's output. Math in fp32.
"""
from __future__ import annotations

import torch

import triton
import triton.language as tl

BLOCK = 1024
FORMS = {"none": 0, "tanh": 1, "sigmoid": 2}  # ops.activation approximations


@triton.jit
def _bias_gelu_kernel(x_ptr, b_ptr, out_ptr, numel, N, FORM: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x = (x + tl.load(b_ptr + offs % N, mask=mask, other=0.0)).to(tl.float32)
    if FORM == 1:  # tanh
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        # tanh(y) = 1 - 2 / (exp(2y) + 1): exact at both tails (exp overflow -> 1, underflow -> -1)
        y = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))
    elif FORM == 2:  # sigmoid: x / (1 + exp(-1.702 x)), exact at both tails
        y = x / (1.0 + tl.exp(-1.702 * x))
    else:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_relu_kernel(x_ptr, b_ptr, out_ptr, numel, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x + tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, tl.maximum(y, 0.0).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_mul_kernel(x_ptr, out_ptr, numel, H, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    src = (offs // H) * 2 * H + offs % H  # row r, column c of the output reads x[r, c] and x[r, H + c]
    a = tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + src + H, mask=mask, other=0.0).to(tl.float32)
    y = 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476)) * b
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def gelu_mul(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    h = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], h, dtype=x.dtype, device=x.device)
    numel = out.numel()
    _gelu_mul_kernel[(triton.cdiv(numel, BLOCK),)](x, out, numel, h, BLOCK=BLOCK)
    return out


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    numel = x.numel()
    _bias_gelu_kernel[(triton.cdiv(numel, BLOCK),)](x, bias, out, numel, x.shape[-1],
                                                    FORM=FORMS[approximate], BLOCK=BLOCK)
    return out


def bias_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    numel = x.numel()
    _bias_relu_kernel[(triton.cdiv(numel, BLOCK),)](x, bias, out, numel, x.shape[-1], BLOCK=BLOCK)
    return out
