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


# LLaMA-family ops: RMSNorm, rotary embedding, grouped-query attention (K/V heads dividing the query heads)
# and the rotary decode step, against the written-out math and transformers' LLaMA functions.

def seeded(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def rope_tables(b, t, dh, seed=0):
    """cos, sin [B, T, Dh / 2] float32 of arbitrary per-row positions (as the caller gathers them)."""
    pos = torch.randint(0, 4096, (b, t, 1), generator=torch.Generator().manual_seed(seed)).float()
    angles = pos * 10000.0 ** (-torch.arange(0, dh, 2).float() / dh)
    return angles.cos(), angles.sin()


def naive_rotary(x, cos, sin):
    """Each pair (x[i], x[i + Dh/2]) turned by its angle, as a complex product, in float64."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.complex(cos.double(), sin.double())
    return torch.cat((z.real, z.imag), -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 97), (17, 769), (2, 4096)])
def test_rms_norm_matches_math(dtype, shape):
    x = 3 * seeded(*shape, dtype=dtype, seed=1)
    w = seeded(shape[-1], dtype=dtype, seed=2)
    out = ops.rms_norm(x, w, 1e-6)
    ref = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    # an fp32 weight (a checkpoint kept in fp32) gives x's dtype too
    assert ops.rms_norm(x, w.float(), 1e-6).dtype == dtype
    with pytest.raises(ValueError, match=r"rms_norm: weight must have shape"):
        ops.rms_norm(x, w[:-1] if shape[-1] > 1 else torch.ones(2), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_is_llamas(dtype):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    norm = llama.LlamaRMSNorm(97, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(seeded(97, seed=3))
        x = seeded(3, 5, 97, dtype=dtype, seed=4)
        assert torch.equal(ops.rms_norm(x, norm.weight, 1e-5), norm(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,t,dh", [(1, 1, 1, 2), (3, 2, 5, 6), (2, 3, 7, 66), (1, 4, 9, 128)])
def test_rotary_matches_math(dtype, b, h, t, dh):
    x = seeded(b, t, h, dh, dtype=dtype, seed=dh).transpose(1, 2)  # heads of a fused projection: strided
    cos, sin = rope_tables(b, t, dh, seed=t)
    out = ops.rotary(x, cos, sin)
    ref = naive_rotary(x, cos[:, None], sin[:, None])
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert not torch.equal(out, x) or t == 0


def test_rotary_is_llamas_apply_rotary_pos_emb():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    b, hq, hkv, t, dh = 2, 4, 2, 6, 16
    q, k = seeded(b, hq, t, dh, seed=1), seeded(b, hkv, t, dh, seed=2)
    cos, sin = rope_tables(b, t, dh)
    ref_q, ref_k = llama.apply_rotary_pos_emb(q, k, torch.cat((cos, cos), -1), torch.cat((sin, sin), -1))
    torch.testing.assert_close(ops.rotary(q, cos, sin), ref_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ops.rotary(k, cos, sin), ref_k, atol=1e-6, rtol=1e-6)


def test_rotary_rejects_bad_arguments():
    x = seeded(2, 3, 4, 8)
    cos, sin = rope_tables(2, 4, 8)
    with pytest.raises(ValueError, match=r"rotary: x must be \[B, H, T, Dh\] with an even Dh"):
        ops.rotary(x[..., :7], cos, sin)
    with pytest.raises(ValueError, match=r"rotary: cos must have shape \(2, 4, 4\), got \(2, 4, 8\)"):
        ops.rotary(x, torch.cat((cos, cos), -1), sin)
    with pytest.raises(TypeError, match="rotary: sin must be float32, got bfloat16"):
        ops.rotary(x, cos, sin.bfloat16())
    with pytest.raises(ValueError, match="rotary: cos and sin go together"):
        ops.rotary(x, cos, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(4, 1), (6, 2), (4, 4)])
@pytest.mark.parametrize("causal,with_lengths", [(False, False), (True, False), (True, True)])
def test_grouped_query_attention_is_attention_over_repeated_kv_heads(dtype, hq, hkv, causal, with_lengths):
    """Query head h reads K/V head h // (Hq / Hkv): transformers' repeat_kv, then plain attention."""
    b, tq, tk, d = 2, 5, 9, 16
    q, k, v = seeded(b, hq, tq, d, dtype=dtype, seed=1), *(seeded(b, hkv, tk, d, dtype=dtype, seed=s) for s in (2, 3))
    lengths = torch.tensor([9, 7]) if with_lengths else None
    out = ops.attention(q, k, v, 0.25, causal=causal, key_lengths=lengths)
    mask = torch.ones(b, 1, tq, tk, dtype=torch.bool)
    if causal:
        mask &= torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    if with_lengths:
        mask &= (torch.arange(tk)[None, :] < lengths[:, None])[:, None, None, :]
    rep = hq // hkv
    ref = naive_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), 0.25, mask)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_grouped_query_attention_is_llamas_eager_attention():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    b, hq, hkv, t, d = 2, 6, 3, 7, 8
    q, k, v = seeded(b, hq, t, d, seed=1), *(seeded(b, hkv, t, d, seed=s) for s in (2, 3))
    module = torch.nn.Module().eval()
    module.num_key_value_groups = hq // hkv
    causal = torch.full((t, t), float("-inf")).triu(1)[None, None]
    ref, _ = llama.eager_attention_forward(module, q, k, v, causal, scaling=0.3)  # (B, T, Hq, D)
    torch.testing.assert_close(ops.attention(q, k, v, 0.3, causal=True), ref.transpose(1, 2), atol=1e-6, rtol=1e-6)
    assert torch.equal(llama.repeat_kv(k, 2), k.repeat_interleave(2, 1))  # the head order the ops assume


def test_grouped_query_attention_rejects_heads_that_do_not_divide():
    q, k = seeded(1, 6, 3, 8), seeded(1, 4, 3, 8, seed=1)
    with pytest.raises(ValueError, match=r"attention: q must be \[B, Hq, Tq, D\] and k, v \[B, Hkv, Tk, D\] with "
                                         r"Hkv dividing Hq, got q \(1, 6, 3, 8\), k \(1, 4, 3, 8\)"):
        ops.attention(q, k, k, 0.3, causal=True)
    with pytest.raises(ValueError, match=r"decode_attention: q must have shape \(1, 4, 8\)"):
        ops.decode_attention(q[:, :, 0], k, k, torch.tensor([3]), 0.3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(4, 1), (6, 2), (3, 3)])
@pytest.mark.parametrize("group", [1, 2])
def test_grouped_query_decode_attention(dtype, hq, hkv, group):
    """The decode op with fewer K/V heads: the op on K/V heads repeated (repeat_kv), and with the cache
    write, the new key/value land in their K/V head's slot."""
    b, s, d = 3, 37, 16
    q = seeded(b * group, hq, d, dtype=dtype, seed=1)
    k, v = seeded(b, hkv, s, d, dtype=dtype, seed=2), seeded(b, hkv, s, d, dtype=dtype, seed=3)
    lengths = torch.tensor([1, s, 20])
    rep = hq // hkv
    out = ops.decode_attention(q, k, v, lengths, 0.3, group=group)
    mask = (torch.arange(s)[None, :] < lengths[:, None])[:, None, None, :].repeat_interleave(group, 0)
    ref = naive_attention(q[:, :, None], *(t.repeat_interleave(rep, 1).repeat_interleave(group, 0) for t in (k, v)),
                          0.3, mask)[:, :, 0]
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    if group == 1:
        new_k, new_v = seeded(b, hkv, d, dtype=dtype, seed=4), seeded(b, hkv, d, dtype=dtype, seed=5)
        k2, v2 = k.clone(), v.clone()
        out = ops.decode_attention(q, k2, v2, lengths, 0.3, new_k, new_v)
        rows = torch.arange(b)
        k[rows, :, lengths - 1], v[rows, :, lengths - 1] = new_k, new_v
        assert torch.equal(k2, k) and torch.equal(v2, v)
        assert torch.equal(out, ops.decode_attention(q, k, v, lengths, 0.3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3])
def test_rotary_decode_step_is_rotary_then_decode(dtype, group):
    """cos, sin: q (every query row of a cache row) and new_k are rotated as ops.rotary does; the cache
    holds the rotated key."""
    b, hq, hkv, s, d = 2, 4, 2, 11, 10
    q = seeded(b * group, hq, d, dtype=dtype, seed=1)
    k, v = seeded(b, hkv, s, d, dtype=dtype, seed=2), seeded(b, hkv, s, d, dtype=dtype, seed=3)
    new = (seeded(b, hkv, d, dtype=dtype, seed=4), seeded(b, hkv, d, dtype=dtype, seed=5)) if group == 1 else ()
    lengths = torch.tensor([4, 11])
    cos, sin = (t[:, 0] for t in rope_tables(b, 1, d))
    k2, v2 = k.clone(), v.clone()
    out = ops.decode_attention(q, k2, v2, lengths, 0.3, *new, group=group, cos=cos, sin=sin)
    rows = cos.repeat_interleave(group, 0)[:, None], sin.repeat_interleave(group, 0)[:, None]  # (B * group, 1, D/2)
    q_rot = ops.rotary(q[:, :, None], *rows)[:, :, 0]
    if new:
        new = (ops.rotary(new[0][:, :, None], cos[:, None], sin[:, None])[:, :, 0], new[1])
    assert torch.equal(out, ops.decode_attention(q_rot, k, v, lengths, 0.3, *new, group=group))
    assert torch.equal(k2, k) and torch.equal(v2, v)


def test_rotary_gqa_decode_step_continues_causal_prefill():
    """A step of the LLaMA decoder: prefill T-1 tokens (rotated keys cached), then the rotary decode step
    for token T equals the last row of rotated causal GQA attention over all T."""
    b, hq, hkv, t, d = 2, 4, 2, 6, 8
    q, k, v = seeded(b, hq, t, d, seed=1), seeded(b, hkv, t, d, seed=2), seeded(b, hkv, t, d, seed=3)
    cos, sin = rope_tables(b, t, d)
    full = ops.attention(ops.rotary(q, cos, sin), ops.rotary(k, cos, sin), v, 0.3, causal=True)
    cache_k, cache_v = torch.zeros(b, hkv, t + 3, d), torch.zeros(b, hkv, t + 3, d)
    cache_k[:, :, :t - 1] = ops.rotary(k, cos, sin)[:, :, :t - 1]
    cache_v[:, :, :t - 1] = v[:, :, :t - 1]
    step = ops.decode_attention(q[:, :, -1], cache_k, cache_v, torch.tensor([t, t]), 0.3, k[:, :, -1], v[:, :, -1],
                                cos=cos[:, -1], sin=sin[:, -1])
    torch.testing.assert_close(step, full[:, :, -1], atol=1e-6, rtol=1e-6)


def test_rotary_decode_step_rejects_bad_tables():
    q, k = seeded(2, 4, 8), seeded(2, 2, 5, 8, seed=1)
    cos, sin = (t[:, 0] for t in rope_tables(2, 1, 8))
    lengths = torch.tensor([2, 5])
    with pytest.raises(ValueError, match=r"decode_attention: cos must have shape \(2, 4\), got \(2, 1, 4\)"):
        ops.decode_attention(q, k, k, lengths, 0.3, cos=cos[:, None], sin=sin)
    with pytest.raises(ValueError, match="decode_attention: cos and sin go together"):
        ops.decode_attention(q, k, k, lengths, 0.3, cos=cos)
    with pytest.raises(TypeError, match="decode_attention: cos must be float32, got float16"):
        ops.decode_attention(q, k, k, lengths, 0.3, cos=cos.half(), sin=sin)
    with pytest.raises(ValueError, match="rotary .cos, sin. needs an even head dim, got 7"):
        ops.decode_attention(q[..., :7], k[..., :7], k[..., :7], lengths, 0.3, cos=cos[:, :3], sin=sin[:, :3])
