"""Linear layer: ``out = x W^T + b`` with ``W [N, K]`` (torch's ``[out, in]`` layout), ``x [..., K]``.

On CPU, a product with few rows is a matrix-vector product bound by how fast ``W`` streams from
memory, and BLAS runs it on one thread. When ``W`` is stored column-major (``W^T`` contiguous, see
:mod:`mmgen_engine.runtime.layout`) the reference splits the reduction over ``K`` into one slice per
thread and runs the slices as one batched product, then adds the partial sums: same math, every
core streaming. Small weights (cache-resident, overhead-bound) and many rows keep BLAS's path. Measured
on the 2-core CPU box: GPT-2's 768x50257 head 23 -> 38 GB/s, 3072->768 14 -> 25 GB/s at batch 1.

Weights stored in fewer bytes - int8 with float32 scales (op ``linear_int8``) or bfloat16 under
float32 activations (op ``linear_bf16_weight``) - have a plain-torch spec (widen the weight, then
``F.linear``) and, at up to 16 rows on CPU, a native kernel (csrc/cpu/gemv.cpp) that widens them in
registers, so that the product streams only the stored bytes. Which CPU path runs is measured once
per process on the machine (:func:`int8_cpu_path`, :func:`bf16_weight_cpu_path`), not fixed.
"""
from __future__ import annotations

import threading
import time

import torch
import torch.nn.functional as F

from .quant import DEFAULT_GROUP_SIZE, Int8Weight, quantize_int8
from .registry import TRITON_DEVICES, dispatch, register, register_lazy


def _native_gemv():
    """``mmgen_engine._C`` when it holds the CPU few-row kernels (csrc/cpu/gemv.cpp), else None
    (no native build, or one from before the kernels)."""
    try:
        from .. import _native
    except ImportError:
        return None
    return _native._C if hasattr(_native._C, "gemv") else None


_GEMV = _native_gemv()
# CpuIsa codes of csrc/native.h: what the build and this CPU run (widest last), and its weight kinds
GEMV_ISAS: tuple[int, ...] = tuple(_GEMV.cpu_isas) if _GEMV is not None else ()
GEMV_MAX_ROWS = _GEMV.GEMV_MAX_ROWS if _GEMV is not None else 0
_GEMV_ISA = GEMV_ISAS[-1] if GEMV_ISAS else 0  # the widest: what the products run
_GEMV_INT8, _GEMV_BF16 = 0, 1

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
    # one per inference mode: a buffer made under torch.inference_mode() cannot be written outside it
    name = "inference_buf" if torch.is_inference_mode_enabled() else "buf"
    buf = getattr(_scratch, name, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel)
        setattr(_scratch, name, buf)
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


_GEMV_X_DTYPES = (torch.float32, torch.bfloat16)  # x of int8 products (bfloat16 widened first)


def gemv_supported(x, weight: torch.Tensor, scale: torch.Tensor | None = None) -> bool:
    """Whether the native few-row kernel can run ``x @ weight^T``: the kernels are built, x is a CPU
    tensor of at most 16 rows, and the weight - int8 with float32 or bfloat16 x, or bfloat16 with
    float32 x (``scale`` None) - and its scales are contiguous CPU tensors (the kernel streams W row
    by row)."""
    if _GEMV is None or not (x.is_cpu and weight.is_cpu and weight.is_contiguous()):
        return False
    if scale is None:
        ok = weight.dtype == torch.bfloat16 and x.dtype == torch.float32
    else:
        ok = weight.dtype == torch.int8 and x.dtype in _GEMV_X_DTYPES and scale.is_cpu and scale.is_contiguous()
    return ok and 0 < x.numel() // weight.shape[1] <= GEMV_MAX_ROWS


def _check_gemv(x, weight: torch.Tensor, scale, isa: int | None) -> None:
    """One-line errors for what the public native wrappers cannot run."""
    if not gemv_supported(x, weight, scale):
        raise ValueError(f"linear: the native kernel cannot take x {x.dtype} {tuple(x.shape)} on {x.device} with "
                         f"a {'contiguous' if weight.is_contiguous() else 'strided'} {weight.dtype} weight "
                         f"{tuple(weight.shape)} (see gemv_supported)")
    if isa is not None and isa not in GEMV_ISAS:
        raise ValueError(f"linear: instruction set {isa} not among this CPU's {GEMV_ISAS}")


def _gemv(x, weight: torch.Tensor, scale, group_size: int, bias, isa: int | None):
    """``x [..., K] @ weight[N, K]^T (+ bias)`` by csrc/cpu/gemv.cpp on torch's thread count, once
    :func:`gemv_supported` holds; here the checks of the operands' sizes the kernel relies on.
    float32 math; the result in x's dtype. Kept short: at GPT-2's smaller shapes the product takes
    20-30 us and every microsecond of Python shows.

    Under ``torch.jit.trace`` (the recorded decode steps, :mod:`mmgen_engine.runtime.recorded`) the
    call goes through the torch op ``mmgen::gemv`` instead, which the tracer records (a raw-pointer
    call would be invisible to it): a replay runs the same kernel, bitwise the eager step, for ~2 us
    of dispatcher per call."""
    if isa is None and torch.jit.is_tracing():
        return torch.ops.mmgen.gemv(x, weight, scale, group_size, bias)
    n, k = weight.shape
    shape = x.shape
    if shape[-1] != k:
        raise ValueError(f"linear: x has {shape[-1]} input features, the weight {k}")
    if x.dtype == torch.float32 and x.is_contiguous():  # the common case: x as it is
        x2, ldx = x, k
    else:
        x2 = x.reshape(-1, k)
        if x2.dtype != torch.float32 or x2.stride(1) != 1:
            x2 = x2.float().contiguous()
        ldx = x2.stride(0)
    if bias is not None and not (bias.dtype == torch.float32 and bias.is_cpu and bias.is_contiguous()
                                 and bias.shape == (n,)):
        if bias.shape != (n,) or not bias.is_cpu:
            raise ValueError(f"linear: bias must be a CPU tensor of shape ({n},), got {tuple(bias.shape)} on "
                             f"{bias.device}")
        bias = bias.float().contiguous()
    rows = x.numel() // k
    out = torch.empty(shape[:-1] + (n,))
    _GEMV.gemv(x2.data_ptr(), ldx, weight.data_ptr(), _GEMV_BF16 if scale is None else _GEMV_INT8,
               0 if scale is None else scale.data_ptr(), group_size, 0 if bias is None else bias.data_ptr(),
               out.data_ptr(), n, rows, n, k, torch.get_num_threads(), _GEMV_ISA if isa is None else isa)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


if _GEMV is not None:
    _LIB = torch.library.Library("mmgen", "FRAGMENT")
    _LIB.define("gemv(Tensor x, Tensor weight, Tensor? scale, int group_size, Tensor? bias) -> Tensor")
    _LIB.impl("gemv", lambda x, weight, scale, group_size, bias: _gemv(x, weight, scale, group_size, bias, None),
              "CPU")


def linear_int8_native(x, weight: Int8Weight, bias, isa: int | None = None):
    """CPU, at most 16 rows: csrc/cpu/gemv.cpp, which widens the int8 weights to float32 in
    registers (per-channel scales applied to each sum, group scales to each weight) and splits the
    output channels over torch's threads; ``isa`` picks an instruction set of :data:`GEMV_ISAS`
    (default the widest). bfloat16 x is widened to float32 first, the result rounded once."""
    _check_gemv(x, weight.qweight, weight.scale, isa)
    return _gemv(x, weight.qweight, weight.scale, weight.group_size or weight.shape[1], bias, isa)


INT8_CPU_PATHS = {"chunked": linear_int8_chunked, "pack": linear_int8_pack, "native": linear_int8_native}
_int8_cpu_choice: dict[tuple, str] = {}


def _fastest(paths: dict, supported, x, w, repeats: int = 9) -> str:
    """The name of the fastest of ``paths`` that ``supported(name)`` allows: each run on
    ``(x, w, None)`` once untimed, then the paths timed in turn, ``repeats`` rounds, best time each.
    Rounds rather than one path after the other, so that a burst of load from other processes (a
    shared 2-core box at load 8 stalls a 2-thread product for milliseconds) hits every path alike."""
    names = [name for name in paths if supported(name)]
    for name in names:
        paths[name](x, w, None)
    best = dict.fromkeys(names, float("inf"))
    for _ in range(repeats):
        for name in names:
            start = time.perf_counter()
            paths[name](x, w, None)
            best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.get)


def int8_cpu_path(dtype: torch.dtype, grouped: bool = False) -> str:
    """Which few-row CPU path runs int8 products of ``dtype`` (per-channel scales, or grouped ones)
    on this machine: the paths that can run it are timed once per process (dtype, scale layout,
    thread count) on a 1024 -> 4096 product at one row, the fastest kept. The choice differs by CPU
    and dtype: torch's int8 kernel (``pack``, per channel only) is vectorized for bfloat16 on x86
    only (and for every dtype on aarch64); ``native`` exists where the extension was built with its
    CPU kernels. Figures per path, GPT-2 shapes, on the 2-core box: benchmarks/RESULTS.md, "int8
    weight-only linear (CPU)"."""
    key = (dtype, grouped, torch.get_num_threads())
    if key not in _int8_cpu_choice:
        gen = torch.Generator().manual_seed(0)
        w = quantize_int8(torch.randn(4096, 1024, generator=gen), group_size=DEFAULT_GROUP_SIZE if grouped else None)
        x = torch.randn(1, 1024, generator=gen).to(dtype)
        supported = {"chunked": True, "pack": int8_pack_supported(x, w),
                     "native": gemv_supported(x, w.qweight, w.scale)}
        _int8_cpu_choice[key] = _fastest(INT8_CPU_PATHS, supported.get, x, w)
    return _int8_cpu_choice[key]


@register("linear_int8", "reference")
def linear_int8_reference(x, weight: Int8Weight, bias):
    """CPU: at most 16 rows, the path :func:`int8_cpu_path` measured fastest for x's dtype and the
    scale layout (native kernel, torch's int8 kernel or the chunked product) where it can run this
    product; more rows, the chunked product. Elsewhere the spec, :func:`linear_int8_dequant`."""
    if not x.is_cpu:
        return linear_int8_dequant(x, weight, bias)
    q, s, g = weight.qweight, weight.scale, weight.group_size
    if x.numel() <= SPLIT_MAX_ROWS * q.shape[1]:
        path = _int8_cpu_choice.get((x.dtype, g is not None, torch.get_num_threads())) or int8_cpu_path(
            x.dtype, g is not None)
        # native: what gemv_supported checks beyond the path's own measurement (x's dtype, the rows)
        if path == "native" and q.is_cpu and q.is_contiguous() and s.is_cpu and s.is_contiguous() and x.numel():
            return _gemv(x, q, s, g or q.shape[1], bias, None)
        if path == "pack" and int8_pack_supported(x, weight):
            return linear_int8_pack(x, weight, bias)
    return linear_int8_chunked(x, weight, bias)


if TRITON_DEVICES:
    register_lazy("linear_int8", "triton", "mmgen_engine.kernels.linear_int8:linear_int8", TRITON_DEVICES)


# ---------------------------------------------------------------------------------------------
# bfloat16 weights with float32 activations (bf16 storage, float32 compute, for CPUs without bf16
# arithmetic): the op ``linear_bf16_weight``.
# ---------------------------------------------------------------------------------------------

def linear_bf16_weight_spec(x, weight, bias):
    """The spec: the weight widened to float32 (exact), then ``F.linear`` in float32."""
    return F.linear(x, weight.float(), None if bias is None else bias.float())


def linear_bf16_weight_native(x, weight, bias, isa: int | None = None):
    """CPU, at most 16 rows, a row-major weight: csrc/cpu/gemv.cpp, each bf16 weight widened to
    float32 in a register (a 16-bit shift); half of float32's bytes streamed."""
    _check_gemv(x, weight, None, isa)
    return _gemv(x, weight, None, 0, bias, isa)


BF16_CPU_PATHS = {"upcast": linear_bf16_weight_spec, "native": linear_bf16_weight_native}
_bf16_cpu_choice: dict[int, str] = {}


def bf16_weight_cpu_path() -> str:
    """Which few-row CPU path runs float32 x bfloat16-weight products here, timed once per process
    and thread count on a 1024 -> 4096 product at one row (as :func:`int8_cpu_path`)."""
    key = torch.get_num_threads()
    if key not in _bf16_cpu_choice:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(4096, 1024, generator=gen).bfloat16()
        x = torch.randn(1, 1024, generator=gen)
        supported = {"upcast": True, "native": gemv_supported(x, w)}
        _bf16_cpu_choice[key] = _fastest(BF16_CPU_PATHS, supported.get, x, w)
    return _bf16_cpu_choice[key]


@register("linear_bf16_weight", "reference", dtypes=(torch.float32,))
def linear_bf16_weight_reference(x, weight, bias):
    """CPU, at most 16 rows: the native kernel where :func:`bf16_weight_cpu_path` measured it faster
    and it can run this product (row-major weight); otherwise the spec."""
    if gemv_supported(x, weight) and bf16_weight_cpu_path() == "native":
        return _gemv(x, weight, None, 0, bias, None)
    return linear_bf16_weight_spec(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor | Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T + bias [N]`` -> ``[..., N]`` in x's dtype. ``weight`` is a tensor
    of x's dtype (op ``linear``), a bfloat16 tensor with float32 x (op ``linear_bf16_weight``:
    float32 math on the widened weight) or an :class:`Int8Weight` (op ``linear_int8``:
    ``W = q * scale``)."""
    if isinstance(weight, Int8Weight):
        return dispatch("linear_int8", x)(x, weight, bias)
    if weight.dtype == torch.bfloat16 and x.dtype == torch.float32:
        return dispatch("linear_bf16_weight", x)(x, weight, bias)
    return dispatch("linear", x)(x, weight, bias)
