"""Rotary position embedding (RoPE), transformers' rotate-half convention.

For ``x [B, H, T, Dh]`` and ``cos, sin [B, T, Dh / 2]`` float32 (each token's row of the table):
``out[..., i] = x[..., i] * cos[i] - x[..., i + Dh/2] * sin[i]`` and
``out[..., i + Dh/2] = x[..., i + Dh/2] * cos[i] + x[..., i] * sin[i]`` for ``i < Dh / 2``; math in
fp32, the output in x's dtype (the spec is :func:`mmgen_engine.ops.rotary.rotary_reference`).

:func:`rotate` is the per-row math, also used by the decode attention kernel to rotate the new
token's query and key on their way to the scores and the cache. One program of :func:`rotary` turns
the ``H`` heads of one token, so its table row is read once. Bytes moved: x read and the output
written once (``2 B H T Dh e``), plus the tables (``B T Dh * 4``).
"""
from __future__ import annotations

import torch

import triton
import triton.language as tl


@triton.jit
def rotate(x_ptr, d, D, cos_ptr, sin_ptr, mask):
    """The rows at ``x_ptr + d`` (``x_ptr`` a pointer per row, ``d`` the element offsets ``0 ..
    BLOCK_D``) rotated by the tables at ``cos_ptr, sin_ptr + d % (D / 2)``, in fp32. Each element is
    read with its partner ``d +- D / 2`` (a second, cached load) so that the row keeps its layout."""
    half = D // 2
    first = d < half
    x = tl.load(x_ptr + d, mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(x_ptr + tl.where(first, d + half, d - half), mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + d % half, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + d % half, mask=mask, other=0.0)
    return x * cos + tl.where(first, -partner, partner) * sin


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, T, D,
                   sx_b, sx_h, sx_t, sc_b, sc_t, ss_b, ss_t,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    bt = tl.program_id(0)  # token: batch row * T + position
    b = bt // T
    t = bt % T
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < H) & (d[None, :] < D)
    rows = x_ptr + b * sx_b + t * sx_t + h[:, None] * sx_h  # (BLOCK_H, 1) row pointers
    out = rotate(rows, d[None, :], D, cos_ptr + b * sc_b + t * sc_t, sin_ptr + b * ss_b + t * ss_t, mask)
    tl.store(out_ptr + ((b * H + h[:, None]) * T + t) * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, H, T, Dh]`` (any strides, unit last), ``cos, sin [B, T, Dh / 2]`` -> a new contiguous
    ``[B, H, T, Dh]``."""
    b, h, t, d = x.shape
    for name, tensor in (("x", x), ("cos", cos), ("sin", sin)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"rotary: {name} needs a unit last stride, got strides {tensor.stride()}")
    out = torch.empty(b, h, t, d, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_d = triton.next_power_of_2(d)
    block_h = min(triton.next_power_of_2(h), max(1, 4096 // block_d))
    _rotary_kernel[(b * t, triton.cdiv(h, block_h))](
        x, cos, sin, out, h, t, d, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
        sin.stride(0), sin.stride(1), BLOCK_H=block_h, BLOCK_D=block_d)
    return out
