"""Fused bias + GELU: ``out = gelu(x + bias)``, erf form or tanh form (see ``ops.activation``).

Elementwise over ``x [..., N]`` with ``bias [N]`` broadcast: reads x once and writes out once
(2·numel·e bytes) instead of the add's and the GELU's two passes. Math in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _bias_gelu_kernel(x_ptr, b_ptr, out_ptr, numel, N, TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x = (x + tl.load(b_ptr + offs % N, mask=mask, other=0.0)).to(tl.float32)
    if TANH:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        # tanh(y) = 1 - 2 / (exp(2y) + 1): exact at both tails (exp overflow -> 1, underflow -> -1)
        y = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))
    else:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    numel = x.numel()
    _bias_gelu_kernel[(triton.cdiv(numel, BLOCK),)](x, bias, out, numel, x.shape[-1],
                                                    TANH=approximate == "tanh", BLOCK=BLOCK)
    return out
