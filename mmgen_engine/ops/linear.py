"""Linear layer: ``out = x W^T + b`` with ``W [N, K]`` (torch's ``[out, in]`` layout), ``x [..., K]``.

On CPU, a product with few rows is a matrix-vector product bound by how fast ``W`` streams from
memory, and BLAS runs it on one thread. When ``W`` is stored column-major (``W^T`` contiguous, see
:mod:`mmgen_engine.runtime.layout`) the reference splits the reduction over ``K`` into one slice per
thread and runs the slices as one batched product, then adds the partial sums: same math, every
core streaming. Small weights (cache-resident, overhead-bound) and many rows keep BLAS's path. Measured
on the 2-core CPU box: GPT-2's 768x50257 head 23 -> 38 GB/s, 3072->768 14 -> 25 GB/s at batch 1.
"""
from __future__ import annotations

import threading
import time

import torch
import torch.nn.functional as F

from .quant import Int8Weight, quantize_int8
from .registry import TRITON_DEVICES, dispatch, register, register_lazy

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




# ---------------------------------------------------------------------------------------------
# Weight-only int8 (``weight`` an :class:`~mmgen_engine.ops.quant.Int8Weight`): the op
# ``linear_int8``, dispatched on x's device and dtype like every op.
# ---------------------------------------------------------------------------------------------

def linear_int8_dequant(x, weight: Int8Weight, bias):
    """The spec: dequantize ``W = q * scale`` to x's dtype (float32 math, one rounding), then
    ``F.linear``. What a model that dequantized its weights at load time would compute."""
    return F.linear(x, weight.dequantize(x.dtype), bias)


# Dequantized rows of W per chunk of the CPU path: about this many bytes of float32. Each chunk
# costs three or four torch calls, each a barrier of the thread pool, so fewer, larger chunks win
# while they still sit in the last-level cache (32 MiB L3 on the CPU box). Measured there, one row,
# float32, 2 threads, idle: 3072->768 in 1047 / 643 / 450 / 322 us with chunks of 0.25 / 1 / 2 /
# 8 MiB, 768->3072 in 1245 / 833 / 644 / 562 us, 768->50257 in 19.8 / 13.0 / 10.1 / 8.5 ms.
INT8_CHUNK_BYTES = 8 << 20
_scratch = threading.local()  # per thread: the chunk buffer, kept (a fresh one page-faults every call)


def _chunk_buffer(numel: int) -> torch.Tensor:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch.buf = torch.empty(numel)
    return buf[:numel]


def linear_int8_chunked(x, weight: Int8Weight, bias):
    """CPU: ``W`` dequantized a chunk of output rows at a time into one buffer of about
    :data:`INT8_CHUNK_BYTES` that stays in cache, each chunk multiplied as :func:`linear_reference`
    does (few rows: the reduction split over threads as one batched product; many rows: BLAS's
    threaded GEMM). Per-channel scales are
    applied once to the output; group scales while dequantizing. Never materializes all of W.
    Computes in float32 whatever x's dtype (rounded once at the end): with the chunk in bfloat16
    torch's CPU GEMMs made it 4-7x slower on the CPU box (no AMX there)."""
    q, s, g = weight.qweight, weight.scale, weight.group_size
    n, k = q.shape
    x2 = x.reshape(-1, k).float()
    rows = x2.shape[0]
    parts = torch.get_num_threads()
    if rows > SPLIT_MAX_ROWS or k % parts:
        parts = 1
    out = torch.empty(rows, n, dtype=torch.float32, device=x.device)
    chunk = max(1, INT8_CHUNK_BYTES // (k * 4))
    if rows > SPLIT_MAX_ROWS:
        chunk = max(chunk, 16 * SPLIT_MAX_ROWS)  # GEMM: wide enough tiles for BLAS's threads
    buf = _chunk_buffer(min(chunk, n) * k).view(-1, k)
    xs = x2.view(rows, parts, k // parts).transpose(0, 1)  # (P, rows, K/P)
    full = k - k % g if g else k
    for n0 in range(0, n, chunk):
        n1 = min(n, n0 + chunk)
        w = buf[: n1 - n0]
        if g is None:
            w.copy_(q[n0:n1])  # exact: |q| <= 127 fits every float dtype
        else:
            torch.mul(q[n0:n1, :full].view(n1 - n0, -1, g), s[n0:n1, : full // g, None],
                      out=w[:, :full].view(n1 - n0, -1, g))
            if full < k:
                torch.mul(q[n0:n1, full:], s[n0:n1, -1:], out=w[:, full:])
        if parts > 1:
            torch.sum(torch.bmm(xs, w.view(n1 - n0, parts, k // parts).permute(1, 2, 0)), 0,
                      out=out[:, n0:n1])
        else:
            out[:, n0:n1] = x2 @ w.t()
    if g is None:
        out *= s
    if bias is not None:
        out += bias
    return out.to(x.dtype).view(*x.shape[:-1], n)


def linear_int8_pack(x, weight: Int8Weight, bias):
    """CPU, per-channel scales: torch's ``_weight_int8pack_mm`` (dequantizes in registers, threads
    over blocks of output columns). Its vectorized x86 kernels exist for bfloat16 only (float32 and
    float16 run a scalar loop there) and read 16 K-elements at a time with aligned loads, hence the
    checks of :func:`int8_pack_supported`; the scales are rounded to x's dtype."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous() or x2.data_ptr() % 64:
        x2 = x2.clone(memory_format=torch.contiguous_format)  # fresh: 64-byte aligned
    out = torch._weight_int8pack_mm(x2, weight.qweight, weight.scale.to(x.dtype))
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], n)


def int8_pack_supported(x, weight: Int8Weight) -> bool:
    """Whether :func:`linear_int8_pack` can run: per-channel scales, K a multiple of 16 and an
    aligned, contiguous int8 weight (the kernel's aligned 16-byte loads; a misaligned one faults)."""
    q = weight.qweight
    return (weight.group_size is None and x.device.type == "cpu" and q.shape[1] % 16 == 0
            and q.is_contiguous() and q.data_ptr() % 64 == 0 and hasattr(torch, "_weight_int8pack_mm"))


INT8_CPU_PATHS = {"chunked": linear_int8_chunked, "pack": linear_int8_pack}
_int8_cpu_choice: dict[tuple, str] = {}


def int8_cpu_path(dtype: torch.dtype) -> str:
    """Which few-row CPU path runs per-channel int8 products of ``dtype`` on this machine: both are
    timed once per process (dtype, thread count) on a 1024 -> 4096 product at one row, the faster
    kept. The choice differs by CPU and dtype: torch's int8 kernel is vectorized for bfloat16 on
    x86 only (and for every dtype on aarch64). On the 2-core box (benchmarks/RESULTS.md, "int8
    weight-only linear (CPU)"), one row, GPT-2 shapes: bfloat16 ``pack`` 53-195 us against
    ``chunked`` 165-504 us (LM head 3.0 against 7.5 ms); float32 ``pack`` 257-997 us (scalar loop)
    against ``chunked`` 162-524 us (LM head 16.1 against 7.8 ms)."""
    key = (dtype, torch.get_num_threads())
    if key not in _int8_cpu_choice:
        gen = torch.Generator().manual_seed(0)
        w = quantize_int8(torch.randn(4096, 1024, generator=gen), group_size=None)
        x = torch.randn(1, 1024, generator=gen).to(dtype)
        times = {}
        for name, fn in INT8_CPU_PATHS.items():
            if name == "pack" and not int8_pack_supported(x, w):
                continue
            fn(x, w, None)
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                fn(x, w, None)
                best = min(best, time.perf_counter() - start)
            times[name] = best
        _int8_cpu_choice[key] = min(times, key=times.get)
    return _int8_cpu_choice[key]


@register("linear_int8", "reference")
def linear_int8_reference(x, weight: Int8Weight, bias):
    """CPU: the chunked product, or for per-channel scales and few rows torch's int8 kernel where
    :func:`int8_cpu_path` measured it faster. Elsewhere the spec, :func:`linear_int8_dequant`."""
    if x.device.type != "cpu":
        return linear_int8_dequant(x, weight, bias)
    if (x.numel() // weight.shape[1] <= SPLIT_MAX_ROWS and int8_pack_supported(x, weight)
            and int8_cpu_path(x.dtype) == "pack"):
        return linear_int8_pack(x, weight, bias)
    return linear_int8_chunked(x, weight, bias)


if TRITON_DEVICES:
    register_lazy("linear_int8", "triton", "mmgen_engine.kernels.linear_int8:linear_int8", TRITON_DEVICES)


def linear(x: torch.Tensor, weight: torch.Tensor | Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T + bias [N]`` -> ``[..., N]`` in x's dtype. ``weight`` is a tensor
    (op ``linear``) or an :class:`Int8Weight` (op ``linear_int8``: ``W = q * scale``)."""
    if isinstance(weight, Int8Weight):
        return dispatch("linear_int8", x)(x, weight, bias)
    return dispatch("linear", x)(x, weight, bias)
