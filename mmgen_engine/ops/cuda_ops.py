"""The ``cuda`` backend: Python wrappers of the native CUDA kernels (``csrc/kernels/*.cuh``).

Each wrapper has its op's reference signature, checks what the kernel assumes - devices, dtypes,
shapes, unit last strides, and the values that index memory (cache lengths, token ids) - with a
one-line error before anything is launched, allocates the outputs and any workspace with torch, and
passes raw pointers, sizes, strides and the tensors' device's current stream to ``mmgen_engine._C``
(no libtorch in the library), with that device current. The kernels are built for compute
capability 8.0 and newer (sm_80 code, with PTX for later GPUs, and sm_90a); an older GPU gets a
:class:`BackendError`. Whether 16-byte vector loads can be used (every pointer 16-byte aligned, every row
stride a multiple of 16 bytes) is decided here and passed down.

Value checks read the values back (one host sync): they run on every eager call and are skipped
while a CUDA graph is being captured, where a sync is not allowed - inside the engine's captured
decode step the lengths and tokens come from the engine itself. The kernels support float16 and
bfloat16 (sampling also float32 logits); see the registrations in the op modules.
"""
from __future__ import annotations

import functools

import torch

from .. import _native
from ..errors import BackendError, InputError
from .registry import HALF_DTYPES

_C = _native._C  # the tests swap in the CPU-emulated build of the same kernels (tests/native)

# element type codes of csrc/kernels/params.h (DType)
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.cache
def _check_capability(index: int) -> None:
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        raise BackendError(f"the cuda backend's kernels need compute capability 8.0 or newer (built for "
                           f"{', '.join(_C.cuda_archs)}); {torch.cuda.get_device_name(index)} has {major}.{minor}: "
                           "use MMGEN_BACKEND=triton")


def _launch(kernel: str, like: torch.Tensor, *args) -> None:
    """``_C.<kernel>(*args, stream)`` on ``like``'s device and its current stream."""
    if not like.is_cuda:  # the emulated build of the tests
        return getattr(_C, kernel)(*args, 0)
    _check_capability(like.device.index if like.device.index is not None else torch.cuda.current_device())
    with torch.cuda.device(like.device):
        getattr(_C, kernel)(*args, torch.cuda.current_stream(like.device).cuda_stream)


def _capturing(t: torch.Tensor) -> bool:
    if not t.is_cuda:
        return False
    with torch.cuda.device(t.device):  # the question is about t's device's current stream
        return torch.cuda.is_current_stream_capturing()


def _check(op: str, like: torch.Tensor, unit_stride=(), **tensors) -> None:
    """Every tensor on ``like``'s device; those named in ``unit_stride`` with a unit last stride."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device != like.device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {like.device}")
        if name in unit_stride and t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{op}: {name} needs a unit last stride, got strides {tuple(t.stride())}")


def _check_dtype(op: str, name: str, t: torch.Tensor, dtypes) -> None:
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: {name} must be {allowed}, got {str(t.dtype).removeprefix('torch.')}")


def _check_shape(op: str, name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_range(op: str, name: str, t: torch.Tensor, low: int, high: int, what: str) -> None:
    """Values of ``t`` in ``[low, high]`` (one sync; skipped during graph capture)."""
    if t.numel() == 0 or _capturing(t):
        return
    lo, hi = (int(v) for v in torch.aminmax(t))
    if lo < low or hi > high:
        bad = lo if lo < low else hi
        raise InputError(f"{op}: {name} holds {bad}, outside [{low}, {high}] ({what})")


def _vectorizable(tensors, strides) -> bool:
    """16-byte vector access: every base pointer 16-byte aligned, every stride a multiple of 16 bytes."""
    return all(t.data_ptr() % 16 == 0 for t in tensors if t is not None) and \
        all(s % 16 == 0 for s in strides)


def decode_attention(q, k, v, lengths, scale, new_k=None, new_v=None, group=1, cos=None, sin=None):
    op = "decode_attention"
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"{op}: group must be an int >= 1, got {group!r}")
    _check_dtype(op, "q", q, HALF_DTYPES)
    for name, t in (("k", k), ("v", v), ("new_k", new_k), ("new_v", new_v)):
        if t is not None and t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} is {t.dtype}, q is {q.dtype}")
    if q.dim() != 3 or k.dim() != 4:
        raise ValueError(f"{op}: q must be [B * group, H, D] and k, v [B, Hkv, S, D], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    b, hkv, s, d = k.shape
    hq = q.shape[1] if hkv and q.shape[1] % hkv == 0 else hkv  # query heads: a multiple of the K/V heads
    _check_shape(op, "q", q, (b * group, hq, d))
    _check_shape(op, "v", v, (b, hkv, s, d))
    if (new_k is None) != (new_v is None):
        raise ValueError(f"{op}: new_k and new_v go together")
    if new_k is not None:
        if group != 1:
            raise ValueError(f"{op}: group={group} with new_k/new_v: a cache write needs one query row per cache "
                             "row (group=1)")
        _check_shape(op, "new_k", new_k, (b, hkv, d))
        _check_shape(op, "new_v", new_v, (b, hkv, d))
        if new_k.stride() != new_v.stride():
            raise ValueError(f"{op}: new_k and new_v need the same strides")
    if (cos is None) != (sin is None):
        raise ValueError(f"{op}: cos and sin go together")
    if cos is not None:
        if d % 2:
            raise ValueError(f"{op}: rotary (cos, sin) needs an even head dim, got {d}")
        for name, t in (("cos", cos), ("sin", sin)):
            _check_shape(op, name, t, (b, d // 2))
            _check_dtype(op, name, t, (torch.float32,))
        cos, sin = cos.contiguous(), sin.contiguous()
    _check_shape(op, "lengths", lengths, (b,))
    _check_dtype(op, "lengths", lengths, (torch.int64,))
    if not 1 <= d <= _C.DECODE_MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim {d} outside [1, {_C.DECODE_MAX_HEAD_DIM}]")
    if b * hkv == 0 or s == 0:
        raise ValueError(f"{op}: empty batch, heads or cache, k has shape {tuple(k.shape)}")
    _check(op, q, unit_stride=("q", "k", "v", "new_k", "new_v"), q=q, k=k, v=v, new_k=new_k, new_v=new_v,
           lengths=lengths, cos=cos, sin=sin)
    lengths = lengths.contiguous()
    _check_range(op, "lengths", lengths, 1, s, f"every row attends to 1 to {s} cached positions")
    rows = b * group  # query rows
    out = torch.empty(rows, hq, d, dtype=q.dtype, device=q.device)
    splits = -(-s // _C.DECODE_CHUNK)
    partial = ml = None
    if splits > 1:
        partial = torch.empty(rows * hq * splits, d, dtype=torch.float32, device=q.device)
        ml = torch.empty(rows * hq * splits, 2, dtype=torch.float32, device=q.device)
    size = q.element_size()
    new_strides = tuple(new_k.stride()[:2]) if new_k is not None else (0, 0)
    strides = [x * size for x in (*q.stride()[:2], *k.stride()[:3], *v.stride()[:3], *new_strides)]
    vectorized = _vectorizable((q, k, v, new_k, new_v, out), strides)
    _launch("decode_attention", q,
            q.data_ptr(), k.data_ptr(), v.data_ptr(), new_k.data_ptr() if new_k is not None else 0,
            new_v.data_ptr() if new_v is not None else 0, lengths.data_ptr(), out.data_ptr(),
            partial.data_ptr() if partial is not None else 0, ml.data_ptr() if ml is not None else 0,
            DTYPES[q.dtype], b, group, hq, s, d, splits, tuple(q.stride()[:2]), tuple(k.stride()[:3]),
            tuple(v.stride()[:3]), new_strides, float(scale), hkv, cos.data_ptr() if cos is not None else 0,
            sin.data_ptr() if sin is not None else 0, vectorized)
    return out


def _layer_norm(op, x, residual, weight, bias, eps):
    _check_dtype(op, "x", x, HALF_DTYPES)
    d = x.shape[-1]
    if residual is not None:
        _check_shape(op, "residual", residual, x.shape)
        if residual.dtype != x.dtype:
            raise TypeError(f"{op}: residual is {residual.dtype}, x is {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        _check_shape(op, name, t, (d,))
        if t.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"{op}: {name} must be float32 or {x.dtype}, got {t.dtype}")
    if weight.dtype != bias.dtype:
        raise TypeError(f"{op}: weight and bias dtypes differ ({weight.dtype}, {bias.dtype})")
    _check(op, x, residual=residual, weight=weight, bias=bias)
    if not 1 <= d <= _C.NORM_MAX_DIM:
        raise ValueError(f"{op}: row width {d} outside [1, {_C.NORM_MAX_DIM}]")
    rows = x.numel() // d
    x2 = x.contiguous().view(rows, d)
    res = residual.contiguous().view(rows, d) if residual is not None else None
    out = torch.empty_like(x2)
    h = torch.empty_like(x2) if residual is not None else None
    vectorized = _vectorizable((x2, res, out, h), [d * x.element_size()])
    if rows:
        weight, bias = weight.contiguous(), bias.contiguous()  # held until the launch is queued
        _launch("layer_norm", x, x2.data_ptr(), res.data_ptr() if res is not None else 0, out.data_ptr(),
                h.data_ptr() if h is not None else 0, weight.data_ptr(), bias.data_ptr(),
                DTYPES[x.dtype], weight.dtype == torch.float32, rows, d, float(eps), vectorized)
    return out.view(x.shape), (h.view(x.shape) if h is not None else None)


def layer_norm(x, weight, bias, eps):
    return _layer_norm("layer_norm", x, None, weight, bias, eps)[0]


def add_layer_norm(x, residual, weight, bias, eps):
    return _layer_norm("add_layer_norm", x, residual, weight, bias, eps)


def token_gather(tokens, table, bias=None):
    op = "token_gather"
    _check_dtype(op, "table", table, HALF_DTYPES)
    _check_dtype(op, "tokens", tokens, (torch.int64,))
    if table.dim() != 2:
        raise ValueError(f"{op}: table must be [V, D], got shape {tuple(table.shape)}")
    vocab, d = table.shape
    if bias is not None:
        _check_shape(op, "bias", bias, (d,))
        if bias.dtype != table.dtype:
            raise TypeError(f"{op}: bias is {bias.dtype}, table is {table.dtype}")
    if vocab == 0 or d == 0:
        raise ValueError(f"{op}: empty table of shape {tuple(table.shape)}")
    _check(op, table, tokens=tokens, bias=bias)
    if table.stride(-1) != 1:
        table = table.contiguous()
    bias = bias.contiguous() if bias is not None else None
    flat = tokens.reshape(-1).contiguous()
    _check_range(op, "tokens", flat, 0, vocab - 1, f"the codebook has {vocab} entries")
    out = torch.empty(flat.numel(), d, dtype=table.dtype, device=table.device)
    if flat.numel():
        vectorized = _vectorizable((table, bias, out), [table.stride(0) * table.element_size(),
                                                        d * table.element_size()])
        _launch("token_gather", table, flat.data_ptr(), table.data_ptr(), bias.data_ptr() if bias is not None else 0,
                out.data_ptr(), DTYPES[table.dtype], flat.numel(), vocab, table.stride(0), d, vectorized)
    return out.view(*tokens.shape, d)


def sample(logits, temperature, top_k, top_p, do_sample, seeds, offset, guidance=None, vocab_limit=None,
           greedy=False, rows=None):
    """Shapes are checked by ``ops.sample`` (again here for ``offset`` and ``rows``, which the kernel
    indexes by row); values are not (that would sync every step). ``offset`` ``[1]`` (every row) or
    ``[B]`` (per row) and ``rows`` (None: ``0..B-1``) are read on the device."""
    op = "sample"
    _check_dtype(op, "logits", logits, tuple(DTYPES))
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    batch = seeds.shape[0]
    _check_dtype(op, "offset", offset, (torch.int64,))
    if tuple(offset.shape) not in {(1,), (batch,)}:
        raise ValueError(f"{op}: offset must have shape (1,) or ({batch},), got {tuple(offset.shape)}")
    offset = offset.contiguous()  # a copy (captured with the rest) only for a strided view
    if rows is not None:
        _check_dtype(op, "rows", rows, (torch.int64,))
        _check_shape(op, "rows", rows, (batch,))
        rows = rows.contiguous()
    n = logits.shape[1] if vocab_limit is None else vocab_limit
    inv_t = temperature.float().reciprocal().contiguous()  # one reciprocal, as every backend uses
    top_k = top_k.to(torch.int64).contiguous()
    top_p = top_p.float().contiguous()
    do_sample = do_sample.to(torch.bool).contiguous()
    seeds = seeds.to(torch.int64).contiguous()
    guidance = guidance.float().contiguous() if guidance is not None else None
    _check(op, logits, inv_t=inv_t, top_k=top_k, top_p=top_p, do_sample=do_sample, seeds=seeds, offset=offset,
           rows=rows, guidance=guidance)
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    _launch("sample", logits, logits.data_ptr(), logits.stride(0), guidance.data_ptr() if guidance is not None else 0,
            inv_t.data_ptr(), top_k.data_ptr(), top_p.data_ptr(), do_sample.data_ptr(), seeds.data_ptr(),
            offset.data_ptr(), 0 if offset.numel() == 1 else 1, rows.data_ptr() if rows is not None else 0,
            out.data_ptr(), DTYPES[logits.dtype], batch, n, bool(greedy))
    return out
