"""Linear layer: ``out = x W^T + b`` with ``W [N, K]`` (torch's ``[out, in]`` layout), ``x [..., K]``.

On CPU, a product with few rows is a matrix-vector product bound by how fast ``W`` streams from
memory, and BLAS runs it on one thread. When ``W`` is stored column-major (``W^T`` contiguous, see
:mod:`mmgen_engine.runtime.layout`) the reference splits the reduction over ``K`` into one slice per
thread and runs the slices as one batched product, then adds the partial sums: same math, every
core streaming. Small weights (cache-resident, overhead-bound) and many rows keep BLAS's path. Measured
on the 2-core CPU box: GPT-2's 768x50257 head 23 -> 38 GB/s, 3072->768 14 -> 25 GB/s at batch 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import TRITON_DEVICES, dispatch, register

# above this many rows the product is a matrix-matrix product that BLAS already spreads over threads
SPLIT_MAX_ROWS = 16
# below this many weight bytes the product is bound by call overhead, not by streaming the weight:
# the split's extra bmm + sum costs ~15 us, more than it saves (benchmarks/bench_linear.py)
SPLIT_MIN_BYTES = 1 << 20


@register("linear", "reference")
def linear_reference(x, weight, bias):
    n, k = weight.shape
    parts = torch.get_num_threads()
    rows = x.numel() // k
    if (x.device.type != "cpu" or parts < 2 or rows > SPLIT_MAX_ROWS or k % parts
            or weight.stride() != (1, n) or weight.numel() * weight.element_size() < SPLIT_MIN_BYTES):
        return F.linear(x, weight, bias)
    xs = x.reshape(rows, parts, k // parts).transpose(0, 1)  # (P, rows, K/P)
    out = torch.bmm(xs, weight.t().view(parts, k // parts, n)).sum(dim=0)  # (rows, N)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], n)


# Few-row products with small weights (K <= 1024 and N <= 4096: GPT-2's qkv, attention outputs and
# fc1) run faster through cuBLAS on CUDA: one launch, where the Triton split-K path needs two (H200,
# fp16, graph replays: 3.5-3.9 us against 4.3-4.8 us; Triton wins fc2's K=3072, 5.2 against 6.5 us,
# and the LM head, 21.5 against 31.1 us; benchmarks/RESULTS.md). The `triton` backend takes that
# route for them; the Triton kernel serves everything else (and every shape in the interpreter).
CUBLAS_MAX_K, CUBLAS_MAX_N = 1024, 4096


def linear_triton(x, weight, bias):
    n, k = weight.shape
    if x.is_cuda and x.numel() // k <= SPLIT_MAX_ROWS and k <= CUBLAS_MAX_K and n <= CUBLAS_MAX_N:
        return F.linear(x, weight, bias)
    from ..kernels.linear import linear
    return linear(x, weight, bias)


if TRITON_DEVICES:
    register("linear", "triton", TRITON_DEVICES)(linear_triton)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T + bias [N]`` -> ``[..., N]``."""
    return dispatch("linear", x)(x, weight, bias)
