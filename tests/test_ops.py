"""Reference ops against their written-out math, and the dispatch table's selection rules."""
from __future__ import annotations

import math

import pytest
import torch

from mmgen_engine import BackendError, ops
from mmgen_engine.ops import registry

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def relative_error(x, ref) -> float:
    """``|x - ref| / |ref|`` (Frobenius norms), ``ref`` in float64."""
    return float((x.double() - ref).norm() / ref.norm())


def linear_operands(m, n, k, dtype, layout, device="cpu"):
    """Seeded ``x [m, k], W [n, k], b [n]``; W row-major or column-major (``W^T`` contiguous)."""
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    if layout == "column-major":
        w = w.t().contiguous().t()
    return x.to(device), w.to(device), b.to(device)


def naive_attention(q, k, v, scale, mask):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,s,d", [(1, 1, 1, 8), (3, 5, 7, 16), (2, 3, 97, 64)])
def test_decode_attention_matches_masked_softmax(dtype, b, h, s, d):
    g = torch.Generator().manual_seed(s)
    q = torch.randn(b, h, d, generator=g).to(dtype)
    k = torch.randn(b, h, s, d, generator=g).to(dtype)
    v = torch.randn(b, h, s, d, generator=g).to(dtype)
    lengths = torch.randint(1, s + 1, (b,), generator=g)
    scale = 1 / math.sqrt(d)
    out = ops.decode_attention(q, k, v, lengths, scale)
    mask = (torch.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
    ref = naive_attention(q[:, :, None], k, v, scale, mask)[:, :, 0]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_attention_masks(causal, with_lengths):
    g = torch.Generator().manual_seed(0)
    b, h, t, d = 3, 2, 9, 16
    q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
    lengths = torch.tensor([9, 4, 1]) if with_lengths else None
    mask = torch.ones(b, 1, t, t, dtype=torch.bool)
    if causal:
        mask &= torch.ones(t, t, dtype=torch.bool).tril()
    if with_lengths:
        mask &= (torch.arange(t)[None, :] < lengths[:, None])[:, None, None, :]
    if causal and with_lengths:  # a query whose every key is masked has no defined output
        keep = mask.any(-1, keepdim=True)
    out = ops.attention(q, k, v, 0.25, causal=causal, key_lengths=lengths)
    ref = naive_attention(q, k, v, 0.25, mask)
    if causal and with_lengths:
        out, ref = out * keep, torch.nan_to_num(ref) * keep
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_lengths", [False, True])
def test_causal_queries_are_the_last_positions(with_lengths):
    """Tq < Tk: query t sees keys s <= t + Tk - Tq (a prompt after a prefix of keys)."""
    g = torch.Generator().manual_seed(1)
    b, h, tq, tk, d = 2, 2, 5, 12, 8
    q = torch.randn(b, h, tq, d, generator=g)
    k, v = (torch.randn(b, h, tk, d, generator=g) for _ in range(2))
    lengths = torch.tensor([12, 10]) if with_lengths else None
    mask = (torch.arange(tk)[None, :] <= torch.arange(tq)[:, None] + tk - tq).expand(b, 1, tq, tk)
    if with_lengths:
        mask = mask & (torch.arange(tk)[None, :] < lengths[:, None])[:, None, None, :]
    out = ops.attention(q, k, v, 0.3, causal=True, key_lengths=lengths)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, 0.3, mask), atol=1e-5, rtol=1e-5)
    full = ops.attention(torch.cat([torch.randn(b, h, tk - tq, d, generator=g), q], 2), k, v, 0.3, causal=True,
                         key_lengths=lengths)
    torch.testing.assert_close(out, full[:, :, tk - tq:], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        ops.attention(k, q, q, 0.3, causal=True)


def test_decode_attention_equals_last_row_of_causal_attention():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    full = ops.attention(q, k, v, 0.3, causal=True)
    step = ops.decode_attention(q[:, :, -1], k, v, torch.tensor([7, 7]), 0.3)
    torch.testing.assert_close(step, full[:, :, -1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 8, 769])
def test_layer_norm_and_fused_add(dtype, dim):
    g = torch.Generator().manual_seed(dim)
    x, r = (torch.randn(3, 5, dim, generator=g).to(dtype) for _ in range(2))
    w, bias = torch.randn(dim, generator=g).to(dtype), torch.randn(dim, generator=g).to(dtype)
    h = (x + r).double()
    ref = (h - h.mean(-1, keepdim=True)) / torch.sqrt(
        h.var(-1, unbiased=False, keepdim=True) + 1e-5
    ) * w.double() + bias.double()
    normed, summed = ops.add_layer_norm(x, r, w, bias, 1e-5)
    assert normed.dtype == dtype and torch.equal(summed, x + r)
    torch.testing.assert_close(normed.double(), ref, atol=TOL[dtype] * 4, rtol=TOL[dtype])
    torch.testing.assert_close(ops.layer_norm(x + r, w, bias, 1e-5), normed)


@pytest.mark.parametrize("approximate", ["none", "tanh", "sigmoid"])
def test_bias_gelu_formulas(approximate):
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64).view(7, 143)
    bias = torch.linspace(-1, 1, 143, dtype=torch.float64)
    y = x + bias
    if approximate == "none":
        ref = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    elif approximate == "sigmoid":  # OpenAI CLIP's quick_gelu
        ref = y * torch.sigmoid(1.702 * y)
    else:
        ref = 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))
    torch.testing.assert_close(ops.bias_gelu(x.float(), bias.float(), approximate).double(), ref,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        ops.bias_gelu(x, bias, "quick")


def test_embedding_sums_token_and_position_rows():
    wte, wpe = torch.randn(11, 4), torch.randn(6, 4)
    tokens, positions = torch.tensor([[3, 10], [0, 5]]), torch.tensor([[0, 1], [4, 5]])
    out = ops.embedding(tokens, positions, wte, wpe)
    assert torch.equal(out[1, 0], wte[0] + wpe[4]) and out.shape == (2, 2, 4)


def test_every_op_has_a_reference_and_forcing_works(monkeypatch):
    backends = ops.available_backends()
    assert {"attention", "decode_attention", "layer_norm", "add_layer_norm", "bias_gelu", "embedding",
            "linear", "sample"} <= set(backends)
    assert all("reference" in b for b in backends.values())
    x = torch.randn(2, 8)
    monkeypatch.setenv("MMGEN_BACKEND", "reference")
    assert registry.dispatch("layer_norm", x) is registry._TABLE["layer_norm"]["reference"].fn


def test_forcing_a_missing_backend_is_a_clear_error(monkeypatch):
    x = torch.randn(2, 8)
    monkeypatch.setenv("MMGEN_BACKEND", "cuda")  # registered for CUDA tensors at most
    with pytest.raises(BackendError, match="layer_norm.*'cuda' on cpu/float32"):
        ops.layer_norm(x, torch.ones(8), torch.zeros(8), 1e-5)
    monkeypatch.setenv("MMGEN_BACKEND", "fastest")
    with pytest.raises(BackendError, match="MMGEN_BACKEND"):
        ops.layer_norm(x, torch.ones(8), torch.zeros(8), 1e-5)


def test_unsupported_device_or_dtype_is_an_error():
    with pytest.raises(BackendError, match="no implementation"):
        registry.resolve("layer_norm", "cpu", torch.float64, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 16, 17])
@pytest.mark.parametrize("n,k", [(1, 2), (97, 64), (64, 97), (2304, 768)])
@pytest.mark.parametrize("layout", ["row-major", "column-major"])
def test_linear_matches_x_wT_plus_b(dtype, rows, n, k, layout):
    """Both paths of the reference (BLAS, and the per-thread split over K for few rows of a
    column-major weight) compute x W^T + b."""
    x, w, b = linear_operands(rows, n, k, dtype, layout)
    ref = x.double() @ w.double().t() + b.double()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = ops.linear(x.view(rows, 1, k), w, b)  # leading dims are kept
        no_bias = ops.linear(x, w, None)
    finally:
        torch.set_num_threads(threads)
    assert out.shape == (rows, 1, n) and out.dtype == dtype
    scale = k ** 0.5
    torch.testing.assert_close(out.view(rows, n).double(), ref, atol=TOL[dtype] * scale, rtol=TOL[dtype])
    torch.testing.assert_close(no_bias.double(), ref - b.double(), atol=TOL[dtype] * scale, rtol=TOL[dtype])


def test_linear_splits_only_streaming_products(monkeypatch):
    """The per-thread split runs for few rows of a large column-major weight on CPU, and only then."""
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or real_bmm(*a))
    big = torch.randn(2304, 768)
    cases = [(big.t().contiguous().t(), 1, True), (big.t().contiguous().t(), 16, True),
             (big.t().contiguous().t(), 17, False), (big, 1, False),
             (torch.randn(96, 64).t().contiguous().t(), 1, False)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for w, rows, split in cases:
            calls.clear()
            ops.linear(torch.randn(rows, w.shape[1]), w, None)
            assert bool(calls) == split, (tuple(w.shape), w.stride(), rows)
    finally:
        torch.set_num_threads(threads)
