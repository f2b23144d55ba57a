"""Linear layer: ``out = x W^T + bias`` as a tiled Triton GEMM with fp32 accumulation.

``x [..., K]`` (viewed as ``[M, K]``), ``W [N, K]`` either row-major (torch's layout) or column-major
(``W^T`` contiguous, see :mod:`mmgen_engine.runtime.layout`): the kernel reads both through their
strides. ``bias [N]`` or None; the output is a new ``[..., N]`` in x's dtype (the spec is
:func:`mmgen_engine.ops.linear.linear_reference`).

Each program computes a ``BLOCK_M x BLOCK_N`` tile of the output over a range of ``K``. Traffic, in
elements: ``W`` read once (``N K``) as long as all rows fit in one row block, otherwise once per row
block; ``x`` read once per column block (``M K ceil(N / BLOCK_N)``); the output written once
(``M N``). ``2 M N K`` FLOPs.

Two shapes of launch:

- many rows (``M > SMALL_M``, prefill and encoders): one program per output tile, walking all of
  ``K``, bias added and the result cast in the epilogue. Programs are numbered in groups of
  ``GROUP_M`` row blocks, so the tiles running together share columns of ``W`` in L2.
- few rows (``M <= SMALL_M``, decode): the product is a matrix-vector product bound by streaming
  ``W`` from memory, and one program per column block would leave most of the GPU idle (12 programs
  for a 768x768 weight). So ``K`` is split too: ``split_k`` programs per column block each write an
  fp32 partial tile, and a second small kernel sums the partials in a fixed order (deterministic, no
  atomics), adds the bias and casts. The partials cost ``2 split_k M N`` fp32 elements of traffic,
  small next to ``W`` when ``M`` is small.

On CPU (Triton's interpreter, for tests) bfloat16 is refused: the interpreter stores it as uint16 and
``tl.dot`` multiplies the bit patterns (triton-lang/triton#11584).
"""
from __future__ import annotations

import torch

import triton
import triton.language as tl
from mmgen_engine.errors import BackendError

SMALL_M = 16  # up to this many rows use one row block and split K
TARGET_PROGRAMS = 256  # programs a split-K launch aims for (an H100 has 132 SMs)
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per launch shape
SMALL_M_CONFIG = (16, 64, 64, 4, 4)
LARGE_M_CONFIG = (64, 128, 32, 4, 4)
GROUP_M = 8
REDUCE_BLOCK = 256  # output columns per program of the split-K reduction


@triton.jit
def grouped_tile(pid, blocks_m, blocks_n, GROUP_M: tl.constexpr):
    """``(row block, column block)`` of program ``pid`` in grouped ordering: consecutive programs walk
    ``GROUP_M`` row blocks before the next column block, so the tiles running together share
    weight columns and input rows in L2."""
    group = pid // (GROUP_M * blocks_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * blocks_n)) % group_size
    pid_n = (pid % (GROUP_M * blocks_n)) // group_size
    return pid_m, pid_n


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    m, n, k, k_per_split,  # k_per_split: a multiple of BLOCK_K
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_os, stride_om, stride_on,  # stride_os: between the partial tiles of the splits
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
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
        w = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N): W^T
        # "ieee" keeps fp32 inputs out of TF32, like torch's default (ignored for fp16/bf16)
        acc = tl.dot(x, w, acc, input_precision="ieee")

    out_ptrs = out_ptr + split * stride_os + rows[:, None] * stride_om + cols[None, :] * stride_on
    if SPLIT:  # fp32 partial tile; _reduce_splits adds the bias and casts
        tl.store(out_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _reduce_splits(partial_ptr, bias_ptr, out_ptr, n, splits, stride_ps, stride_pm, stride_om,
                   HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # one program per (row, BLOCK columns): out = sum over splits, in split order, + bias
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < n
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(splits):
        acc += tl.load(partial_ptr + s * stride_ps + row * stride_pm + cols, mask=col_ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def plan(m: int, n: int, k: int) -> tuple[tuple[int, int, int, int, int], int, int]:
    """Launch shape for an ``[m, k] x [k, n]`` product: ``(config, split_k, k_per_split)``.
    Few rows split ``K`` until about :data:`TARGET_PROGRAMS` programs run."""
    if m > SMALL_M:
        return LARGE_M_CONFIG, 1, k
    config = SMALL_M_CONFIG
    _, block_n, block_k, _, _ = config
    k_blocks = triton.cdiv(k, block_k)
    wanted = min(k_blocks, triton.cdiv(TARGET_PROGRAMS, triton.cdiv(n, block_n)))
    k_per_split = triton.cdiv(k_blocks, wanted) * block_k
    return config, triton.cdiv(k, k_per_split), k_per_split


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T + bias [N]`` -> ``[..., N]``."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        raise BackendError("linear: Triton's interpreter cannot run tl.dot on bfloat16; "
                           "use float32 or float16 on CPU")
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    (block_m, block_n, block_k, warps, stages), split_k, k_per_split = plan(m, n, k)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), split_k)
    target = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    _linear_kernel[grid](
        x2, weight, bias, target,
        m, n, k, k_per_split,
        *x2.stride(), *weight.stride(),
        target.stride(0) if split_k > 1 else 0, target.stride(-2), target.stride(-1),
        HAS_BIAS=bias is not None, SPLIT=split_k > 1,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M,
        num_warps=warps, num_stages=stages,
    )
    if split_k > 1:
        _reduce_splits[(m, triton.cdiv(n, REDUCE_BLOCK))](
            target, bias, out, n, split_k, target.stride(0), target.stride(1), out.stride(0),
            HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK,
        )
    return out.view(*x.shape[:-1], n)
