"""Weight-only int8 linear: quantization, the spec against float64 math, every fast path against
the spec (the native CPU kernel under each instruction set this CPU runs and odd thread counts),
the quantized layer, and the Triton kernel (Triton's interpreter on CPU, small shapes); and the
native kernel's bfloat16-weight product against its spec.

Shapes are awkward on purpose: K not a multiple of the group (200, 300) nor of the vector width
(15, 301), N of 1, 1-17 rows, 3-D x.
"""
from __future__ import annotations

import importlib
import importlib.util
import platform
from pathlib import Path

import pytest
import torch
from test_ops import relative_error

from mmgen_engine import BackendError, ops
from mmgen_engine._native import CPU_ISA_NAMES
from mmgen_engine.errors import InputError
from mmgen_engine.layers import MLP, Linear, QuantizedLinear, quantize_linears
from mmgen_engine.ops.quant import Int8Weight, dequantize_int8, quantize_int8

L = importlib.import_module("mmgen_engine.ops.linear")  # the module; `ops.linear` is the function

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
needs_gemv = pytest.mark.skipif(L._GEMV is None, reason="mmgen_engine._C lacks the CPU gemv kernels (not built, "
                                "or built before them: `make install`)")
GROUPS = [None, 128, 48]  # per channel, the default group, a group that does not divide BLOCK_K
DTYPES = [torch.float32, torch.bfloat16]


def operands(rows, n, k, group_size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + rows * n + k)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(rows, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return x, quantize_int8(w, group_size), b, w


def exact(x, weight: Int8Weight, bias):
    """float64 ``x (q * scale)^T + bias``."""
    out = x.double() @ dequantize_int8(weight, torch.float64).t()
    return out if bias is None else out + bias.double()


def assert_no_worse_than_spec(out, x, weight, bias):
    """float32: within 1e-5 relative of float64 math. Low precision: error at most twice the spec's
    run in the same dtype (the flash-attention rule), plus what rounding a partial sum or two costs:
    the dtype's epsilon times the size of the terms, ``|x| |W|^T`` (a split product rounds each
    part, and the parts of a sum that cancels are larger than the sum)."""
    ref = exact(x, weight, bias)
    assert out.dtype == x.dtype and out.shape == ref.shape
    if x.dtype == torch.float32:
        assert relative_error(out, ref) < 1e-5
    else:
        spec = L.linear_int8_dequant(x, weight, bias)
        terms = (x.double().abs() @ dequantize_int8(weight, torch.float64).abs().t()).norm()
        error, spec_error = (out.double() - ref).norm(), (spec.double() - ref).norm()
        assert error <= 2 * spec_error + torch.finfo(x.dtype).eps * terms, (float(error), float(spec_error))


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("n,k", [(1, 64), (37, 200), (5, 300)])
def test_quantize_round_trip_within_half_a_step(group_size, n, k):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 3
    w[n // 2] = 0  # a zero row: scale 0, q 0, no NaN
    q = quantize_int8(w, group_size)
    groups = 1 if group_size is None else -(-k // group_size)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (n, k) and q.qweight.abs().max() <= 127
    assert q.scale.dtype == torch.float32 and q.scale.reshape(n, groups).shape == (n, groups)
    step = q.scale.reshape(n, groups).repeat_interleave(group_size or k, dim=1)[:, :k]
    err = (q.dequantize() - w).abs()
    assert (err <= step / 2 * (1 + 1e-6) + 1e-7).all()
    assert (q.qweight[n // 2] == 0).all() and (q.scale.reshape(n, groups)[n // 2] == 0).all()
    # the largest magnitude of each channel / group maps to +-127 exactly
    assert (q.qweight.abs().amax(dim=1)[torch.arange(n) != n // 2] == 127).all()


def test_int8_weight_checks_its_parts():
    q = torch.zeros(4, 10, dtype=torch.int8)
    with pytest.raises(InputError, match="scale must be float32"):
        Int8Weight(q, torch.zeros(4, 2), None)
    with pytest.raises(InputError, match="scale must be float32"):
        Int8Weight(q, torch.zeros(4, 2), 4)  # ceil(10 / 4) = 3 groups
    with pytest.raises(InputError, match="int8"):
        Int8Weight(q.float(), torch.zeros(4), None)
    assert Int8Weight(q, torch.zeros(4, 3), 4).nbytes() == 40 + 48


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_spec_matches_float64(group_size, dtype):
    x, w, b, _ = operands(3, 37, 200, group_size, dtype)
    out = L.linear_int8_dequant(x, w, b)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and relative_error(out, exact(x, w, b)) < tol


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 16, 17])
@pytest.mark.parametrize("n,k", [(1, 64), (97, 200), (40, 256), (33, 301)])
def test_chunked_matches_spec(group_size, dtype, rows, n, k, two_threads, monkeypatch):
    """Several chunks with a short last one (small chunk bytes), the split over two threads (K even)
    and BLAS's path (K odd, or more than 16 rows)."""
    monkeypatch.setattr(L, "INT8_CHUNK_BYTES", 8 * k * torch.finfo(dtype).bits // 8)  # 8 rows of W
    x, w, b, _ = operands(rows, n, k, group_size, dtype)
    bias = b if (rows + n) % 2 else None
    assert_no_worse_than_spec(L.linear_int8_chunked(x, w, bias), x, w, bias)


def test_chunked_keeps_leading_dims(two_threads):
    x, w, b, _ = operands(6, 97, 256, 128, torch.float32)
    out = L.linear_int8_chunked(x.view(2, 3, 256), w, b)
    assert out.shape == (2, 3, 97)
    assert_no_worse_than_spec(out.view(6, 97), x, w, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("n,k", [(1, 64), (97, 256), (4, 48)])
def test_pack_matches_spec(dtype, rows, n, k):
    x, w, b, _ = operands(rows, n, k, None, dtype)
    assert L.int8_pack_supported(x, w)
    bias = b if rows % 2 else None
    assert_no_worse_than_spec(L.linear_int8_pack(x, w, bias), x, w, bias)


def test_pack_takes_strided_and_misaligned_inputs():
    """x a slice starting 2 elements into its storage: copied to an aligned buffer, not faulted on."""
    x, w, b, _ = operands(4, 32, 64, None, torch.bfloat16)
    wide = torch.cat([x, x], dim=1)[:, 2:66]
    assert wide.data_ptr() % 64
    assert_no_worse_than_spec(L.linear_int8_pack(wide, w, b), wide, w, b)


def test_pack_refuses_what_it_cannot_run():
    x, w, _, _ = operands(1, 8, 200, None, torch.bfloat16)
    assert not L.int8_pack_supported(x, w)  # K not a multiple of 16
    x, w, _, _ = operands(1, 8, 256, 128, torch.bfloat16)
    assert not L.int8_pack_supported(x, w)  # grouped
    q = torch.zeros(8 * 64 + 1, dtype=torch.int8)[1:].view(8, 64)  # misaligned storage
    assert not L.int8_pack_supported(x, Int8Weight(q, torch.ones(8), None))


def _spy_paths(monkeypatch, table):
    calls = []
    for name, fn in dict(table).items():
        monkeypatch.setitem(table, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    return calls


@pytest.mark.parametrize("grouped", [False, True])
def test_cpu_path_is_measured_once_per_dtype_and_scale_layout(grouped, monkeypatch):
    monkeypatch.setattr(L, "_int8_cpu_choice", {})
    calls = _spy_paths(monkeypatch, L.INT8_CPU_PATHS)
    choice = L.int8_cpu_path(torch.bfloat16, grouped)
    # pack runs per-channel scales only; native wherever the kernels are built
    timed = {"chunked"} | ({"pack"} if not grouped else set()) | ({"native"} if L._GEMV is not None else set())
    assert choice in timed and set(calls) == timed
    calls.clear()
    assert L.int8_cpu_path(torch.bfloat16, grouped) == choice and not calls


def test_bf16_weight_path_is_measured_once(monkeypatch):
    monkeypatch.setattr(L, "_bf16_cpu_choice", {})
    calls = _spy_paths(monkeypatch, L.BF16_CPU_PATHS)
    choice = L.bf16_weight_cpu_path()
    assert set(calls) == {"upcast"} | ({"native"} if L._GEMV is not None else set()) and choice in calls
    calls.clear()
    assert L.bf16_weight_cpu_path() == choice and not calls


@pytest.mark.parametrize("path", ["native", "pack", "chunked"])
def test_dispatch_takes_the_measured_path(path, monkeypatch):
    """Few rows go where the measurement said, when that path can run the product; 17 rows chunked."""
    if path == "native" and L._GEMV is None:
        pytest.skip("no native kernels in this build")
    x, w, b, _ = operands(2, 40, 64, None, torch.float32)
    monkeypatch.setattr(L, "_int8_cpu_choice", {(torch.float32, False, torch.get_num_threads()): path})
    calls = []
    for name, attr in (("native", "_gemv"), ("pack", "linear_int8_pack"), ("chunked", "linear_int8_chunked")):
        fn = getattr(L, attr)  # what linear_int8_reference calls
        monkeypatch.setattr(L, attr, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    assert_no_worse_than_spec(L.linear_int8_reference(x, w, b), x, w, b)
    assert calls == [path]
    calls.clear()
    x17 = torch.randn(17, 64)
    assert_no_worse_than_spec(L.linear_int8_reference(x17, w, b), x17, w, b)
    assert calls == ["chunked"]


# --- the native CPU kernel (csrc/cpu/gemv.cpp) ------------------------------------------------

ISAS = [pytest.param(isa, id=CPU_ISA_NAMES[isa]) for isa in L.GEMV_ISAS] or [pytest.param(0, id="none")]
ROWS = [1, 2, 3, 4, 5, 7, 16]
# (N, K): N of 1, K below one vector and not a multiple of 8 or 16, N not a multiple of the column
# tile (4); the last two large enough (> 64 KiB of int8 per thread) for the kernel to split them
GEMV_SHAPES = [(1, 64), (97, 200), (8, 15), (1001, 301), (523, 520)]
GEMV_GROUPS = [None, 128, 48, 50, 7]  # per channel, the default, a multiple of 16, neither, tiny
THREADS = torch.get_num_threads()


@needs_gemv
def test_native_kernels_are_built_here():
    """The installed extension holds the CPU kernels, with OpenMP threads (Linux: GCC's libgomp),
    and on x86-64 the vector code this CPU can run."""
    assert L.GEMV_ISAS[0] == 0 and L.GEMV_MAX_ROWS == L.SPLIT_MAX_ROWS == 16
    if platform.system() == "Linux":
        assert L._GEMV.cpu_openmp
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() == "x86_64" and cpuinfo.exists():
        flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
        assert (1 in L.GEMV_ISAS) == ({"avx2", "fma"} <= flags)
        assert (2 in L.GEMV_ISAS) == ({"avx512f", "avx512bw", "avx512vl"} <= flags)


@pytest.mark.skipif(L._GEMV is not None, reason="the kernels are built")
def test_without_native_kernels_the_torch_paths_run():
    x, w, b, _ = operands(1, 40, 64, None, torch.float32)
    assert not L.gemv_supported(x, w.qweight, w.scale)
    assert L.int8_cpu_path(torch.float32) in ("chunked", "pack")
    assert_no_worse_than_spec(ops.linear(x, w, b), x, w, b)


@needs_gemv
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group_size", GEMV_GROUPS)
@pytest.mark.parametrize("n,k", GEMV_SHAPES)
def test_native_int8_matches_spec(isa, group_size, n, k):
    x, w, b, _ = operands(16, n, k, group_size, torch.float32)
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            for rows in ROWS:
                bias = b if (rows + threads) % 2 else None
                xr = x[:rows]
                assert_no_worse_than_spec(L.linear_int8_native(xr, w, bias, isa=isa), xr, w, bias)
        finally:
            torch.set_num_threads(THREADS)


@needs_gemv
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group_size", [None, 50])
def test_native_int8_bfloat16_activations(isa, group_size):
    for rows in (1, 3, 16):
        x, w, b, _ = operands(rows, 97, 301, group_size, torch.bfloat16)
        assert_no_worse_than_spec(L.linear_int8_native(x, w, b, isa=isa), x, w, b)


@needs_gemv
def test_native_int8_takes_strided_rows_and_leading_dims():
    """x a column slice (row stride 2K: passed as is) and a 3-D view; the bias as float32."""
    x, w, b, _ = operands(6, 97, 128, 128, torch.float32)
    wide = torch.cat([x, x], dim=1)[:, 3:131]
    assert wide.stride() == (256, 1)
    assert_no_worse_than_spec(L.linear_int8_native(wide, w, b), wide, w, b)
    out = L.linear_int8_native(x.view(2, 3, 128), w, b)
    assert out.shape == (2, 3, 97)
    assert_no_worse_than_spec(out.view(6, 97), x, w, b)


@needs_gemv
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("bf16", [False, True])
def test_native_path_is_recorded_by_the_tracer(bf16, monkeypatch):
    """``torch.jit.trace`` (the recorded decode steps) sees the native product as the op
    ``mmgen::gemv``: the replay on new inputs is bitwise the eager call."""
    monkeypatch.setattr(L, "_int8_cpu_choice", {(torch.float32, True, torch.get_num_threads()): "native"})
    monkeypatch.setattr(L, "_bf16_cpu_choice", {torch.get_num_threads(): "native"})
    x, w, b, _ = operands(3, 97, 200, 48, torch.float32)
    if bf16:
        w = torch.randn(97, 200).bfloat16()

    def step(x):
        return ops.linear(x * 2, w, b).relu()

    traced = torch.jit.trace(step, (x,), check_trace=False)
    assert "mmgen::gemv" in str(traced.graph)
    fresh = torch.randn(3, 200)
    assert torch.equal(traced(fresh), step(fresh))


def bf16_operands(rows, n, k, seed=0):
    g = torch.Generator().manual_seed(seed + 31 * n + k)
    return (torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g).bfloat16(),
            torch.randn(n, generator=g))


@needs_gemv
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k", GEMV_SHAPES)
def test_native_bf16_weight_matches_spec(isa, n, k):
    """float32 x bfloat16 weight: float64 math on the widened weight within 1e-5 (float32 sums)."""
    x, w, b = bf16_operands(16, n, k)
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            for rows in ROWS:
                bias = (b, b.bfloat16(), None)[(rows + threads) % 3]
                xr = x[:rows]
                out = L.linear_bf16_weight_native(xr, w, bias, isa=isa)
                ref = xr.double() @ w.double().t() + (0 if bias is None else bias.double())
                assert out.dtype == torch.float32 and relative_error(out, ref) < 1e-5
        finally:
            torch.set_num_threads(THREADS)


@pytest.mark.parametrize("layout", ["row-major", "column-major"])
def test_ops_linear_dispatches_a_bf16_weight(layout, monkeypatch):
    """``ops.linear`` with float32 x and a bfloat16 weight: op ``linear_bf16_weight``, whose CPU
    path (native where it can run and was measured faster, else the spec) matches the spec."""
    monkeypatch.setenv("MMGEN_BACKEND", "reference")
    x, w, b = bf16_operands(3, 97, 200)
    if layout == "column-major":
        w = w.t().contiguous().t()  # the native kernel reads rows of W: this one runs the spec
        assert not L.gemv_supported(x, w)
    out = ops.linear(x.view(1, 3, 200), w, b)
    ref = x.double() @ w.double().t() + b.double()
    assert out.shape == (1, 3, 97) and relative_error(out.view(3, 97), ref) < 1e-5
    x17 = torch.randn(17, 200)
    assert relative_error(ops.linear(x17, w, b), x17.double() @ w.double().t() + b.double()) < 1e-5
    monkeypatch.setenv("MMGEN_BACKEND", "linear_bf16_weight=cuda")
    with pytest.raises(BackendError, match="linear_bf16_weight"):
        ops.linear(x, w, b)


@needs_gemv
def test_native_refuses_what_it_cannot_run():
    x, w, b, _ = operands(1, 8, 64, None, torch.float32)
    strided = Int8Weight(torch.zeros(64, 8, dtype=torch.int8).t(), w.scale, None)
    assert not L.gemv_supported(x, strided.qweight, strided.scale)
    with pytest.raises(ValueError, match="native kernel cannot take"):
        L.linear_int8_native(x, strided, b)
    with pytest.raises(ValueError, match="native kernel cannot take"):
        L.linear_int8_native(torch.randn(17, 64), w, b)  # more rows than the kernel's tiles
    with pytest.raises(ValueError, match="native kernel cannot take"):
        L.linear_int8_native(x.half(), w, b)
    with pytest.raises(ValueError, match="input features"):
        L.linear_int8_native(torch.randn(2, 63), w, b)
    with pytest.raises(ValueError, match="bias must be"):
        L.linear_int8_native(x, w, torch.zeros(9))
    with pytest.raises(ValueError, match="instruction set 7"):
        L.linear_int8_native(x, w, b, isa=7)
    # the library checks its own arguments too (a C++ caller has no Python wrapper)
    y = torch.empty(17, 8)
    with pytest.raises(ValueError, match="gemv: rows must be 1..16, got 17"):
        L._GEMV.gemv(x.data_ptr(), 64, w.qweight.data_ptr(), 0, w.scale.data_ptr(), 64, 0, y.data_ptr(), 8, 17, 8,
                     64, 1, 0)
    with pytest.raises(ValueError, match="gemv: int8 weight without scales"):
        L._GEMV.gemv(x.data_ptr(), 64, w.qweight.data_ptr(), 0, 0, 64, 0, y.data_ptr(), 8, 1, 8, 64, 1, 0)


@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_linear_dispatches_an_int8_weight(group_size, dtype, monkeypatch):
    monkeypatch.setenv("MMGEN_BACKEND", "reference")
    x, w, b, _ = operands(2, 97, 256, group_size, dtype)
    assert_no_worse_than_spec(ops.linear(x.view(1, 2, 256), w, b).view(2, 97), x, w, b)
    monkeypatch.setenv("MMGEN_BACKEND", "linear_int8=cuda")
    with pytest.raises(BackendError, match="linear_int8"):
        ops.linear(x, w, b)


@pytest.mark.parametrize("group_size", [None, 128])
def test_quantized_linear_close_to_linear(group_size):
    torch.manual_seed(0)
    dense = Linear(300, 97).requires_grad_(False)
    x = torch.randn(5, 300)
    layer = QuantizedLinear.from_linear(dense, group_size)
    ref = dense(x).double()
    # int8 rounding of a Gaussian weight: ~0.5-1% relative; groups of 128 track the range closer
    assert relative_error(layer(x), ref) < (1e-2 if group_size is None else 7e-3)
    state = layer.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == {
        "weight": (torch.int8, (97, 300)),
        "weight_scale": (torch.float32, (97,) if group_size is None else (97, 3)),
        "bias": (torch.float32, (97,))}
    fresh = QuantizedLinear(300, 97, group_size=group_size)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), layer(x))


def test_quantized_linear_keeps_float32_scales_when_cast():
    layer = QuantizedLinear.from_linear(Linear(64, 8), None).to(torch.bfloat16)
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


def test_quantize_linears_replaces_in_place():
    torch.manual_seed(0)
    mlp = MLP(64, 128, "gelu")
    x = torch.randn(3, 64)
    ref = mlp(x)
    assert quantize_linears(mlp, include=lambda name, _: name != "fc2") == ["fc1"]
    assert isinstance(mlp.fc1, QuantizedLinear) and isinstance(mlp.fc2, Linear)
    assert quantize_linears(mlp) == ["fc2"]
    h = ops.linear(x, mlp.fc1.op_weight, mlp.fc1.bias)
    assert relative_error(mlp.fc2(torch.nn.functional.gelu(h)), ref.double()) < 2e-2


# --- Triton (interpreter on CPU) -------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,n,k,group_size", [
    (1, 97, 200, 128),   # split K, a short last group
    (3, 64, 97, None),   # per channel, K not a block multiple
    (5, 1, 130, 48),     # N = 1, groups that straddle K-blocks
    (20, 70, 256, 128),  # many rows: the tiled launch
    (17, 33, 300, 48),
])
def test_triton_matches_float64(dtype, rows, n, k, group_size):
    kernel = importlib.import_module("mmgen_engine.kernels.linear_int8")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, b, _ = operands(rows, n, k, group_size, torch.float32)
    w = Int8Weight(w.qweight.to(device), w.scale.to(device), group_size)
    x, b = x.to(device, dtype), b.to(device, dtype)
    bias = b if rows % 2 else None
    out = kernel.linear_int8(x, w, bias)
    ref = exact(x.cpu(), Int8Weight(w.qweight.cpu(), w.scale.cpu(), group_size), None if bias is None else b.cpu())
    assert out.dtype == dtype and out.shape == ref.shape
    assert relative_error(out.cpu(), ref) < (1e-6 if dtype == torch.float32 else 2e-3)


@needs_triton
def test_triton_registered_as_the_backend(monkeypatch):
    monkeypatch.setenv("MMGEN_BACKEND", "linear_int8=triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, b, _ = operands(2, 40, 96, 32, torch.float32)
    out = ops.linear(x.to(device), Int8Weight(w.qweight.to(device), w.scale.to(device), 32), b.to(device))
    assert_no_worse_than_spec(out.cpu(), x, w, b)


@needs_triton
def test_triton_refuses_bfloat16_in_the_interpreter():
    kernel = importlib.import_module("mmgen_engine.kernels.linear_int8")
    x, w, b, _ = operands(1, 8, 32, None, torch.bfloat16)
    with pytest.raises(BackendError, match="bfloat16"):
        kernel.linear_int8(x, w, b)
