"""Weight-only int8 linear: ``out = x (q * scale)^T + bias`` with the dequantization fused.

``x [..., K]`` (viewed as ``[M, K]``) in float32, float16 or bfloat16; ``q [N, K]`` int8 and
``scale`` float32 ``[N]`` (per output channel) or ``[N, ceil(K / G)]`` (groups of ``G`` input
columns), an :class:`mmgen_engine.ops.quant.Int8Weight`; ``bias [N]`` or None. The output is a new
``[..., N]`` in x's dtype; the spec is :func:`mmgen_engine.ops.linear.linear_int8_dequant`.

The launch shapes are those of :mod:`mmgen_engine.kernels.linear` (same :func:`plan`): few rows
split ``K`` over many programs and sum the fp32 partials in a second kernel; many rows run one
program per output tile. What differs is the weight tile: it is loaded as int8 (a quarter of
float32's bytes, half of fp16's) and dequantized in registers:

- per-channel scales: the int8 values are exact in every float dtype, so the tile goes to the dot
  as is and the accumulated row is multiplied by ``scale[n]`` once at the end;
- groups that are a multiple of ``BLOCK_K``: a K-block lies in one group, so each block's product
  is multiplied by that group's ``scale[n, g]`` before it is accumulated (again exact int8 in the
  dot);
- other group sizes: each element is multiplied by its scale before the dot.

Traffic, in bytes, for few rows: ``N K`` int8 + scales (``4 N`` or ``4 N K / G``) + ``x`` once per
column block + ``2 split_k M N`` fp32 partials x 4. ``2 M N K`` FLOPs. float32 activations use an
fp32 ("ieee") dot, fp16/bf16 ones a dot in their dtype with fp32 accumulation.

On CPU (Triton's interpreter, for tests) bfloat16 is refused, as in :mod:`mmgen_engine.kernels.linear`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

import triton
import triton.language as tl
from mmgen_engine.errors import BackendError
from mmgen_engine.kernels.linear import GROUP_M, REDUCE_BLOCK, _reduce_splits, grouped_tile, plan

if TYPE_CHECKING:
    from mmgen_engine.ops.quant import Int8Weight


@triton.jit
def _linear_int8_kernel(
    x_ptr, q_ptr, s_ptr, bias_ptr, out_ptr,
    m, n, k, k_per_split, group,  # k_per_split: a multiple of BLOCK_K; group: G (unused per channel)
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn,
    stride_os, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, GROUPED: tl.constexpr, BLOCK_SCALE: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(m, BLOCK_M), tl.cdiv(n, BLOCK_N), GROUP_M)
    split = tl.program_id(1)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < n
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k)

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        q = tl.load(q_ptr + cols[None, :] * stride_qn + ks[:, None] * stride_qk,
                    mask=k_ok[:, None] & col_ok[None, :], other=0)  # (BLOCK_K, BLOCK_N) int8: q^T
        w = q.to(tl.float32)
        if GROUPED and not BLOCK_SCALE:  # a block spans groups: scale each element
            w *= tl.load(s_ptr + cols[None, :] * stride_sn + (ks // group)[:, None],
                         mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_F32:
            part = tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            part = tl.dot(x, w.to(x.dtype))
        if GROUPED and BLOCK_SCALE:  # the whole block lies in group k0 // group
            part *= tl.load(s_ptr + cols * stride_sn + k0 // group, mask=col_ok, other=0.0)[None, :]
        acc += part
    if not GROUPED:
        acc *= tl.load(s_ptr + cols * stride_sn, mask=col_ok, other=0.0)[None, :]

    out_ptrs = out_ptr + split * stride_os + rows[:, None] * stride_om + cols[None, :] * stride_on
    if SPLIT:  # fp32 partial tile; _reduce_splits adds the bias and casts
        tl.store(out_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def linear_int8(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., K] @ (q * scale)[N, K]^T + bias [N]`` -> ``[..., N]`` in x's dtype."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        raise BackendError("linear_int8: Triton's interpreter cannot run tl.dot on bfloat16; "
                           "use float32 or float16 on CPU")
    q, s, g = weight.qweight, weight.scale, weight.group_size
    n, k = q.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    (block_m, block_n, block_k, warps, stages), split_k, k_per_split = plan(m, n, k)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), split_k)
    target = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    _linear_int8_kernel[grid](
        x2, q, s, bias, target,
        m, n, k, k_per_split, g or 1,
        *x2.stride(), *q.stride(), s.stride(0),
        target.stride(0) if split_k > 1 else 0, target.stride(-2), target.stride(-1),
        HAS_BIAS=bias is not None, SPLIT=split_k > 1, GROUPED=g is not None,
        BLOCK_SCALE=g is not None and g % block_k == 0, DOT_F32=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M,
        num_warps=warps, num_stages=stages,
    )
    if split_k > 1:
        _reduce_splits[(m, triton.cdiv(n, REDUCE_BLOCK))](
            target, bias, out, n, split_k, target.stride(0), target.stride(1), out.stride(0),
            HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK,
        )
    return out.view(*x.shape[:-1], n)
