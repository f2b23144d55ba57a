"""Triton kernels against the plain-torch references: norms (LayerNorm, RMSNorm), bias + GELU, rotary
embedding, embedding (+ LayerNorm), decode attention (self with the fused cache write, cross with
per-row key lengths, query rows grouped over a shared cache row as in beam search, fewer K/V heads
than query heads with the rotary step fused).

Without a GPU these run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest) at small,
awkward shapes; the ``gpu`` tests run the same comparisons at real sizes in fp16 and bf16.
"""
from __future__ import annotations

import math

import pytest
import torch
from test_ops import relative_error

from mmgen_engine import ops
from mmgen_engine.ops.attention import decode_attention_reference
from mmgen_engine.ops.embedding import embedding_reference, token_gather_reference
from mmgen_engine.ops.rotary import rotary_reference

triton = pytest.importorskip("triton")
from mmgen_engine.kernels import activation, decode_attention, embedding, norm, rotary  # noqa: E402

# (atol, rtol) of a kernel against the reference run on the same inputs
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
CPU_DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.float16, torch.bfloat16]
gpu = pytest.mark.gpu


def rand(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


def close(out, ref):
    atol, rtol = TOL[ref.dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def check_norms(rows, dim, dtype, device, kernels=norm, weight_dtype=torch.float32):
    """``kernels``: a module with ``layer_norm`` and ``add_layer_norm`` (the Triton ones, or the CUDA
    wrappers of test_kernels_cuda)."""
    x, res = rand(*rows, dim, dtype=dtype, device=device, seed=1), rand(*rows, dim, dtype=dtype, device=device, seed=2)
    w, b = rand(dim, dtype=weight_dtype, device=device, seed=3), rand(dim, dtype=weight_dtype, device=device, seed=4)
    close(kernels.layer_norm(x, w, b, 1e-5), ops.norm.layer_norm_reference(x, w, b, 1e-5))
    out, h = kernels.add_layer_norm(x, res, w, b, 1e-5)
    ref_out, ref_h = ops.norm.add_layer_norm_reference(x, res, w, b, 1e-5)
    assert torch.equal(h, ref_h)
    close(out, ref_out)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("rows,dim", [((1,), 1), ((3,), 7), ((2, 5), 97), ((17,), 768)])
def test_layer_norms(rows, dim, dtype):
    check_norms(rows, dim, dtype, "cpu")


def check_rms_norm(rows, dim, dtype, device, weight_dtype=None, fn=norm.rms_norm):
    x = 3 * rand(*rows, dim, dtype=dtype, device=device, seed=1)
    w = rand(dim, dtype=weight_dtype or dtype, device=device, seed=3)
    close(fn(x, w, 1e-6), ops.norm.rms_norm_reference(x, w, 1e-6))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("rows,dim", [((1,), 1), ((3,), 7), ((2, 5), 97), ((17,), 768)])
def test_rms_norm(rows, dim, dtype):
    check_rms_norm(rows, dim, dtype, "cpu")
    check_rms_norm(rows, dim, dtype, "cpu", weight_dtype=torch.float32)


def rope_tables(b, t, dh, device, seed=0):
    """cos, sin [B, T, Dh / 2] float32 of random positions (as the LLaMA layers gather them)."""
    pos = torch.randint(0, 4096, (b, t, 1), generator=torch.Generator().manual_seed(seed)).float()
    angles = pos * 10000.0 ** (-torch.arange(0, dh, 2).float() / dh)
    return angles.cos().to(device), angles.sin().to(device)


def check_rotary(b, h, t, dh, dtype, device):
    x = rand(b, t, 3, h, dh, dtype=dtype, device=device, seed=dh)[:, :, 1].transpose(1, 2)  # a fused projection
    cos, sin = rope_tables(b, t, dh, device)
    close(rotary.rotary(x, cos, sin), rotary_reference(x, cos, sin))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("b,h,t,dh", [(1, 1, 1, 2), (3, 2, 5, 6), (2, 3, 7, 66), (1, 33, 2, 128)])
def test_rotary(b, h, t, dh, dtype):
    check_rotary(b, h, t, dh, dtype, "cpu")


def check_bias_gelu(shape, approximate, dtype, device):
    x = 3 * rand(*shape, dtype=dtype, device=device, seed=5)
    b = rand(shape[-1], dtype=dtype, device=device, seed=6)
    close(activation.bias_gelu(x, b, approximate), ops.activation.bias_gelu_reference(x, b, approximate))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh", "sigmoid"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 97), (2, 5, 1031)])
def test_bias_gelu(shape, approximate, dtype):
    check_bias_gelu(shape, approximate, dtype, "cpu")


def check_gelu_mul(shape, dtype, device):
    x = 3 * rand(*shape, dtype=dtype, device=device, seed=8)
    close(activation.gelu_mul(x), ops.activation.gelu_mul_reference(x))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (3, 194), (2, 5, 2062)])
def test_gelu_mul(shape, dtype):
    check_gelu_mul(shape, dtype, "cpu")


def test_gelu_mul_reference_is_gated_gelu():
    x = rand(4, 10)
    torch.testing.assert_close(ops.gelu_mul(x), torch.nn.functional.gelu(x[:, :5]) * x[:, 5:])
    with pytest.raises(ValueError, match="even"):
        ops.gelu_mul(rand(2, 3))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_bias_gelu_tails_are_exact():
    x = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4]])
    for approximate in ("none", "tanh", "sigmoid"):
        out = activation.bias_gelu(x, torch.zeros(7), approximate)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ops.activation.bias_gelu_reference(x, torch.zeros(7), approximate))


def check_embedding(shape, vocab, dim, with_ln, dtype, device):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab, shape, generator=g).to(device)
    positions = torch.randint(0, 13, shape, generator=g).to(device)
    wte, wpe = rand(vocab, dim, dtype=dtype, device=device, seed=8), rand(13, dim, dtype=dtype, device=device, seed=9)
    ln = (rand(dim, device=device, seed=10), rand(dim, device=device, seed=11)) if with_ln else (None, None)
    close(embedding.embedding(tokens, positions, wte, wpe, *ln, 1e-5),
          embedding_reference(tokens, positions, wte, wpe, *ln, 1e-5))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("with_ln", [False, True])
@pytest.mark.parametrize("shape,vocab,dim", [((1,), 1, 1), ((3,), 97, 24), ((2, 7), 1001, 64)])
def test_embedding(shape, vocab, dim, with_ln, dtype):
    check_embedding(shape, vocab, dim, with_ln, dtype, "cpu")


def check_token_gather(shape, vocab, dim, with_bias, dtype, device, fn=embedding.token_gather):
    tokens = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(vocab)).to(device)
    table = rand(vocab, dim, dtype=dtype, device=device, seed=1)
    bias = rand(dim, dtype=dtype, device=device, seed=2) if with_bias else None
    assert torch.equal(
        fn(tokens, table, bias), token_gather_reference(tokens, table, bias)
    )  # a copy (+ one rounded add)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape,vocab,dim", [((1,), 1, 1), ((3,), 97, 24), ((2, 7), 1001, 64), ((2, 3, 5), 50, 12)])
def test_token_gather(shape, vocab, dim, with_bias, dtype):
    check_token_gather(shape, vocab, dim, with_bias, dtype, "cpu")


def check_decode_attention(b, h, s, d, dtype, device, lengths=None, fused_write=False,
                           fn=decode_attention.decode_attention):
    g = torch.Generator().manual_seed(b * 1000 + s)
    q = rand(b, h, d, dtype=dtype, device=device, seed=12)
    k, v = rand(b, h, s, d, dtype=dtype, device=device, seed=13), rand(b, h, s, d, dtype=dtype, device=device, seed=14)
    if lengths is None:
        lengths = torch.randint(1, s + 1, (b,), generator=g)
    lengths = lengths.to(device)
    scale = 1 / math.sqrt(d)
    new = (rand(b, h, d, dtype=dtype, device=device, seed=15), rand(b, h, d, dtype=dtype, device=device, seed=16)) \
        if fused_write else (None, None)
    k2, v2 = k.clone(), v.clone()
    out = fn(q, k2, v2, lengths, scale, *new)
    ref = decode_attention_reference(q, k, v, lengths, scale, *new)  # writes into k, v too
    close(out, ref)
    if fused_write:
        assert torch.equal(k2, k) and torch.equal(v2, v)
    return out, ref, (q, k, v, lengths, scale)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("fused_write", [False, True])
@pytest.mark.parametrize("b,h,s,d", [(1, 1, 1, 8), (3, 5, 7, 24), (2, 3, 97, 64), (1, 2, 300, 16)])
def test_decode_attention(b, h, s, d, fused_write, dtype):
    check_decode_attention(b, h, s, d, dtype, "cpu", fused_write=fused_write)


def test_decode_attention_lengths_at_the_edges_and_strided_views():
    # lengths 1 and the full cache, in a row each; k/v are views of a larger cache (the span)
    check_decode_attention(2, 3, 130, 32, torch.float32, "cpu", lengths=torch.tensor([1, 130]))
    q = rand(2, 3, 32, seed=1)
    cache_k, cache_v = rand(2, 3, 200, 32, seed=2), rand(2, 3, 200, 32, seed=3)
    lengths = torch.tensor([5, 97])
    out = decode_attention.decode_attention(q, cache_k[:, :, :100], cache_v[:, :, :100], lengths, 0.2)
    close(out, decode_attention_reference(q, cache_k[:, :, :100], cache_v[:, :, :100], lengths, 0.2))


def check_grouped_decode_attention(b, group, h, s, d, dtype, device, lengths=None,
                                   fn=decode_attention.decode_attention):
    """``group`` query rows per cache row: ``fn`` against the reference, and bit for bit against itself
    given an explicit copy of the cache row for each query row (group=1), which is what grouping means."""
    g = torch.Generator().manual_seed(b * 1000 + s + group)
    q = rand(b * group, h, d, dtype=dtype, device=device, seed=22)
    k, v = rand(b, h, s, d, dtype=dtype, device=device, seed=23), rand(b, h, s, d, dtype=dtype, device=device, seed=24)
    if lengths is None:
        lengths = torch.randint(1, s + 1, (b,), generator=g)
    lengths = lengths.to(device)
    scale = 1 / math.sqrt(d)
    k0, v0 = k.clone(), v.clone()
    out = fn(q, k, v, lengths, scale, group=group)
    assert torch.equal(k, k0) and torch.equal(v, v0)  # nothing is written without new_k/new_v
    ref = decode_attention_reference(q, k, v, lengths, scale, group=group)
    close(out, ref)
    repeated = (k.repeat_interleave(group, 0), v.repeat_interleave(group, 0), lengths.repeat_interleave(group))
    assert torch.equal(out, fn(q, *repeated, scale))
    return out, ref, (q, k, v, lengths, scale)


ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GROUPS = [1, 2, 3, 5]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("group", GROUPS)
def test_grouped_decode_attention_reference_is_attention_over_repeated_rows(group, dtype):
    """The definition: group query rows per cache row = the ungrouped op on k, v, lengths repeated
    ``group`` times (repeat_interleave), without the copy; the public op (the reference on CPU) agrees."""
    b, h, s, d = 3, 2, 70, 24
    q = rand(b * group, h, d, dtype=dtype, seed=1)
    k, v = rand(b, h, s, d, dtype=dtype, seed=2), rand(b, h, s, d, dtype=dtype, seed=3)
    lengths = torch.tensor([1, s, 33])
    out = decode_attention_reference(q, k, v, lengths, 0.3, group=group)
    assert out.shape == (b * group, h, d) and out.dtype == dtype
    close(out, decode_attention_reference(q, k.repeat_interleave(group, 0), v.repeat_interleave(group, 0),
                                          lengths.repeat_interleave(group), 0.3))
    assert torch.equal(ops.decode_attention(q, k, v, lengths, 0.3, group=group), out)
    # a strided q (a slice of a fused projection), a view of a longer cache
    wide = rand(b * group, h, 3 * d, dtype=dtype, seed=4)[:, :, d:2 * d]
    cache_k, cache_v = rand(b, h, 2 * s, d, dtype=dtype, seed=5), rand(b, h, 2 * s, d, dtype=dtype, seed=6)
    close(ops.decode_attention(wide, cache_k[:, :, :s], cache_v[:, :, :s], lengths, 0.3, group=group),
          decode_attention_reference(wide.contiguous(), cache_k[:, :, :s].repeat_interleave(group, 0),
                                     cache_v[:, :, :s].repeat_interleave(group, 0), lengths.repeat_interleave(group),
                                     0.3))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("b,h,s,d", [(1, 1, 1, 8), (3, 5, 7, 24), (2, 3, 97, 64)])
def test_grouped_decode_attention(b, h, s, d, group, dtype):
    # s = 97: two chunks of the interpreter's 64 keys, the second partial
    check_grouped_decode_attention(b, group, h, s, d, dtype, "cpu")


@pytest.mark.parametrize("group", [2, 3])
def test_grouped_decode_attention_lengths_at_the_edges_and_strided_views(group):
    # lengths 1 and the full cache over three chunks (130 keys, the last chunk 2)
    check_grouped_decode_attention(2, group, 3, 130, 32, torch.float16, "cpu", lengths=torch.tensor([1, 130]))
    q = rand(2 * group, 3, 96, seed=1)[:, :, 32:64]  # rows of a fused projection
    cache_k, cache_v = rand(2, 3, 200, 32, seed=2), rand(2, 3, 200, 32, seed=3)
    lengths = torch.tensor([100, 5])
    out = decode_attention.decode_attention(q, cache_k[:, :, :100], cache_v[:, :, :100], lengths, 0.2, group=group)
    close(out, decode_attention_reference(q, cache_k[:, :, :100], cache_v[:, :, :100], lengths, 0.2, group=group))


def test_grouped_decode_attention_rejects_bad_arguments(monkeypatch):
    q, k, v = rand(4, 3, 16), rand(2, 3, 10, 16, seed=1), rand(2, 3, 10, 16, seed=2)
    new, lengths = rand(2, 3, 16, seed=3), torch.tensor([3, 10])
    k0 = k.clone()
    for fn in (ops.decode_attention, decode_attention.decode_attention, decode_attention_reference):
        with pytest.raises(ValueError, match="group=2 with new_k/new_v: a cache write needs one query row per cache"):
            fn(q, k, v, lengths, 0.25, new, new, group=2)
    assert torch.equal(k, k0)  # the cache write never ran
    for fn in (ops.decode_attention, decode_attention.decode_attention):
        for bad in (0, -1, 2.0, True):
            with pytest.raises(ValueError, match=f"group must be an int >= 1, got {bad!r}"):
                fn(q, k, v, lengths, 0.25, group=bad)
    with pytest.raises(ValueError, match=r"q must have shape \(6, 3, 16\) \(k is \(2, 3, 10, 16\), group=3\)"):
        ops.decode_attention(q, k, v, lengths, 0.25, group=3)
    with pytest.raises(ValueError, match=r"q must have shape \(2, 3, 16\)"):
        ops.decode_attention(q, k, v, lengths, 0.25)  # group=1: one query row per cache row
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        ops.decode_attention(q, k, v, lengths.repeat_interleave(2), 0.25, group=2)  # lengths are per cache row
    with pytest.raises(ValueError, match=r"v must have shape \(2, 3, 10, 16\)"):
        ops.decode_attention(q, k, v[:, :, :9], lengths, 0.25, group=2)
    with pytest.raises(ValueError, match="new_k and new_v go together"):
        ops.decode_attention(q[:2], k, v, lengths, 0.25, new, None)
    with pytest.raises(ValueError, match=r"q must be \[B \* group, Hq, D\] \(Hq a multiple of Hkv\)"):
        decode_attention.decode_attention(q, k, v, lengths, 0.25, group=3)
    monkeypatch.setenv("MMGEN_BACKEND", "decode_attention=triton")
    with pytest.raises(ValueError, match=r"q must have shape \(6, 3, 16\)"):  # checked before dispatch
        ops.decode_attention(q, k, v, lengths, 0.25, group=3)
    close(ops.decode_attention(q, k, v, lengths, 0.25, group=2),
          decode_attention_reference(q, k, v, lengths, 0.25, group=2))


def check_gqa_decode_attention(b, group, hq, hkv, s, d, dtype, device, fused_write, rope, lengths=None,
                               fn=decode_attention.decode_attention):
    """Fewer K/V heads than query heads (each K/V head read once for its query heads), optionally with
    the rotary step (q and new_k rotated, the rotated key written to the cache): ``fn`` against the
    reference, which does the same with ops.rotary and repeat_kv's head order."""
    q = rand(b * group, hq, d, dtype=dtype, device=device, seed=31)
    k, v = (rand(b, hkv, s, d, dtype=dtype, device=device, seed=seed) for seed in (32, 33))
    if lengths is None:
        lengths = torch.randint(1, s + 1, (b,), generator=torch.Generator().manual_seed(s + hq))
    lengths = lengths.to(device)
    new = (rand(b, hkv, d, dtype=dtype, device=device, seed=34), rand(b, hkv, d, dtype=dtype, device=device, seed=35)) \
        if fused_write else ()
    cos, sin = (t[:, 0] for t in rope_tables(b, 1, d, device, seed=s)) if rope else (None, None)
    scale = 1 / math.sqrt(d)
    k2, v2 = k.clone(), v.clone()
    out = fn(q, k2, v2, lengths, scale, *new, group=group, cos=cos, sin=sin)
    ref = decode_attention_reference(q, k, v, lengths, scale, *new, group=group, cos=cos, sin=sin)
    close(out, ref)
    assert torch.equal(v2, v)
    if rope:  # rotated in fp32 on both sides, rounded to the cache dtype (a GPU's FMA may move the last bit)
        close(k2, k)
    else:
        assert torch.equal(k2, k)
    return out, ref


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("fused_write,rope", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("b,hq,hkv,s,d", [(1, 4, 1, 1, 8), (3, 6, 2, 97, 24), (2, 3, 3, 130, 32)])
def test_gqa_decode_attention(b, hq, hkv, s, d, dtype, fused_write, rope):
    # s = 97, 130: two and three chunks of the interpreter's 64 keys
    check_gqa_decode_attention(b, 1, hq, hkv, s, d, dtype, "cpu", fused_write, rope)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("b,group,hq,hkv,s,d", [(2, 2, 8, 2, 70, 16), (1, 3, 6, 3, 5, 10)])
def test_gqa_decode_attention_grouped_rows(b, group, hq, hkv, s, d, rope):
    """Beams (query rows sharing a cache row) over a GQA cache: no cache write with group > 1."""
    check_gqa_decode_attention(b, group, hq, hkv, s, d, torch.float16, "cpu", False, rope)


def test_gqa_decode_attention_lengths_at_the_edges():
    for lengths in (torch.tensor([1, 130]), torch.tensor([130, 64])):
        check_gqa_decode_attention(2, 1, 8, 2, 130, 16, torch.float32, "cpu", True, True, lengths=lengths)


def test_ops_dispatch_to_the_triton_kernels_when_forced(monkeypatch):
    monkeypatch.setenv("MMGEN_BACKEND", "triton")
    x = rand(3, 16)
    assert ops.registry.dispatch("layer_norm", x) is norm.layer_norm
    assert ops.registry.dispatch("rms_norm", x) is norm.rms_norm
    assert ops.registry.dispatch("rotary", x) is rotary.rotary
    assert ops.registry.dispatch("decode_attention", x) is decode_attention.decode_attention
    close(ops.bias_gelu(x, rand(16), "tanh"), ops.activation.bias_gelu_reference(x, rand(16), "tanh"))
    monkeypatch.delenv("MMGEN_BACKEND")
    assert ops.registry.dispatch("layer_norm", x) is ops.norm.layer_norm_reference  # never by default on CPU


# ---- GPU: the same comparisons at real sizes --------------------------------------------------

@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_elementwise_kernels(dtype):
    for rows, dim in [((1,), 768), ((16,), 768), ((4, 197), 768), ((3,), 1031)]:
        check_norms(rows, dim, dtype, "cuda")
    for approximate in ("none", "tanh", "sigmoid"):
        check_bias_gelu((16, 3072), approximate, dtype, "cuda")
        check_bias_gelu((4, 197, 3072), approximate, dtype, "cuda")
    check_gelu_mul((32, 2 * 2730), dtype, "cuda")
    check_embedding((16,), 50257, 768, False, dtype, "cuda")
    check_embedding((4, 35), 30524, 768, True, dtype, "cuda")
    check_token_gather((4, 32, 32), 8192, 128, True, dtype, "cuda")  # dVAE codes
    check_token_gather((4, 16, 16), 16384, 256, False, dtype, "cuda")  # VQGAN codes


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("b,h,s,d", [(1, 12, 1024, 64), (16, 12, 197, 64), (16, 12, 4096, 64), (3, 5, 97, 24)])
def test_gpu_decode_attention_error_at_most_twice_torch(b, h, s, d, dtype):
    _, _, (q, k, v, lengths, scale) = check_decode_attention(b, h, s, d, dtype, "cuda", fused_write=True)
    ours = decode_attention.decode_attention(q, k, v, lengths, scale)
    mask = (torch.arange(s, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]
    exact = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None].double(), k.double(), v.double(), attn_mask=mask, scale=scale)[:, :, 0]
    naive = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale)[:, :, 0]
    assert relative_error(ours, exact) <= 2 * relative_error(naive, exact) + 1e-6


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_grouped_decode_attention(dtype):
    """Beams sharing their request's cross-attention K/V at real sizes (ViT's 197 encoder states,
    a long cache over many splits), and an error within twice torch's."""
    for b, group, h, s, d in [(4, 5, 12, 197, 64), (1, 4, 12, 4096, 64), (3, 3, 5, 97, 24), (16, 2, 16, 256, 128)]:
        check_grouped_decode_attention(b, group, h, s, d, dtype, "cuda")
    _, _, (q, k, v, lengths, scale) = check_grouped_decode_attention(2, 3, 12, 1024, 64, dtype, "cuda",
                                                                     lengths=torch.tensor([1, 1024]))
    ours = decode_attention.decode_attention(q, k, v, lengths, scale, group=3)
    k, v, lengths = k.repeat_interleave(3, 0), v.repeat_interleave(3, 0), lengths.repeat_interleave(3)
    mask = (torch.arange(1024, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]
    exact = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None].double(), k.double(), v.double(), attn_mask=mask, scale=scale)[:, :, 0]
    naive = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale)[:, :, 0]
    assert relative_error(ours, exact) <= 2 * relative_error(naive, exact) + 1e-6


@gpu
def test_gpu_grouped_decode_attention_replays_in_a_cuda_graph():
    """The Triton launcher reads no device value: captured once, replayed with new lengths."""
    q = rand(4 * 3, 12, 64, dtype=torch.float16, device="cuda", seed=1)
    k, v = (rand(4, 12, 512, 64, dtype=torch.float16, device="cuda", seed=i) for i in (2, 3))
    lengths = torch.tensor([1, 100, 300, 512], device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_attention.decode_attention(q, k, v, lengths, 0.125, group=3)  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention.decode_attention(q, k, v, lengths, 0.125, group=3)
    for step in range(3):
        lengths.copy_(torch.tensor([1 + step, 100 - step, 300, 512 - step]))
        graph.replay()
        close(out, decode_attention_reference(q, k, v, lengths, 0.125, group=3))


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("hkv", [1, 8, 32])
def test_gpu_gqa_decode_attention_at_llama_sizes(dtype, hkv):
    """LLaMA-7B-like heads (32 query heads of 128) over 1, 8 and 32 K/V heads: a long cache over many
    splits with the rotary cache write, and beams over an image prefix."""
    check_gqa_decode_attention(4, 1, 32, hkv, 4096, 128, dtype, "cuda", True, True)
    check_gqa_decode_attention(4, 1, 32, hkv, 1000, 128, dtype, "cuda", False, False)
    check_gqa_decode_attention(2, 3, 32, hkv, 577, 128, dtype, "cuda", False, True)


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_rotary_gqa_decode_step_replays_in_a_cuda_graph(backend):
    """The LLaMA decode step (8 K/V heads of 32, rotary cache write), captured once and replayed with new
    lengths and new table rows, as the engine's captured step does."""
    fn = decode_attention.decode_attention
    if backend == "cuda":
        if not ops.registry.CUDA_DEVICES:
            pytest.skip("the native library was built without CUDA")
        from mmgen_engine.ops import cuda_ops
        fn = cuda_ops.decode_attention
    q = rand(4, 32, 128, dtype=torch.bfloat16, device="cuda", seed=1)
    k, v = (rand(4, 8, 512, 128, dtype=torch.bfloat16, device="cuda", seed=i) for i in (2, 3))
    new_k, new_v = (rand(4, 8, 128, dtype=torch.bfloat16, device="cuda", seed=i) for i in (4, 5))
    lengths = torch.tensor([1, 100, 300, 512], device="cuda")
    cos, sin = (t[:, 0].contiguous() for t in rope_tables(4, 1, 128, "cuda"))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(q, k.clone(), v.clone(), lengths, 0.088, new_k, new_v, 1, cos, sin)  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(q, k, v, lengths, 0.088, new_k, new_v, 1, cos, sin)
    for step in range(3):
        k0, v0 = k.clone(), v.clone()
        lengths.copy_(torch.tensor([2 + step, 100 - step, 300, 511 - step]))
        tables = rope_tables(4, 1, 128, "cuda", seed=step)
        cos.copy_(tables[0][:, 0])
        sin.copy_(tables[1][:, 0])
        graph.replay()
        close(out, decode_attention_reference(q, k0, v0, lengths, 0.088, new_k, new_v, 1, cos, sin))
        close(k, k0)  # the reference wrote the same rotated keys into k0
