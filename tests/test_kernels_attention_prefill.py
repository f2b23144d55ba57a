"""The Triton prefill / encoder attention kernel (kernels/triton/flash_attention.py) against float64 math.

Small awkward shapes: odd head counts, sequence lengths that are not block multiples, head dims that
are not powers of two. They run on the GPU when there is one, else on CPU in Triton's interpreter
(conftest sets TRITON_INTERPRET=1; slow, hence the small shapes). The ``gpu`` tests run real sizes
against plain torch.
"""
from __future__ import annotations

import math

import pytest
import torch
from test_ops import relative_error

from mmgen_engine import BackendError, ops

pytest.importorskip("triton")
from mmgen_engine.kernels import flash_attention  # noqa: E402  (needs triton)
from mmgen_engine.ops.attention import attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# dtype -> (atol, rtol) against float64 math on the same inputs (fp16: p is rounded to fp16 for p @ v)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (3e-3, 3e-3)}


def qkv(b, h, tq, tk, d, dtype, seed=0, device=DEVICE):
    """q, k, v as the layers make them: head views of fused projections ``[B, T, 3, H, D]``."""
    g = torch.Generator().manual_seed(seed)
    fused_q = torch.randn(b, tq, 3, h, d, generator=g).to(device, dtype)
    fused_kv = fused_q if tq == tk else torch.randn(b, tk, 3, h, d, generator=g).to(device, dtype)
    return (fused_q[:, :, 0].transpose(1, 2), fused_kv[:, :, 1].transpose(1, 2),
            fused_kv[:, :, 2].transpose(1, 2))


def lengths_for(b, tk):
    """Every row length kind: all keys, one key, somewhere in between."""
    return torch.tensor([tk, 1, max(1, tk // 2)][:b], device=DEVICE)


def reference(q, k, v, scale, causal, key_lengths):
    return attention_reference(q.double(), k.double(), v.double(), scale, causal, key_lengths)


def check(out, ref, dtype):
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("b,h,t,d", [(1, 1, 1, 16), (2, 3, 7, 24), (3, 3, 97, 64)])
def test_self_attention_matches_float64(dtype, causal, with_lengths, b, h, t, d):
    q, k, v = qkv(b, h, t, t, d, dtype, seed=t * d)
    lengths = lengths_for(b, t) if with_lengths else None
    scale = 1 / math.sqrt(d)
    out = flash_attention.attention(q, k, v, scale, causal, lengths)
    assert out.shape == (b, h, t, d)
    check(out, reference(q, k, v, scale, causal, lengths), dtype)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("tq,tk,d", [(1, 97, 64), (7, 97, 24), (97, 7, 16)])
def test_cross_attention_with_key_lengths(dtype, tq, tk, d):
    """Tq != Tk (decoder tokens over encoder states), each row its own number of keys."""
    q, k, v = qkv(3, 3, tq, tk, d, dtype, seed=tq + tk)
    lengths = lengths_for(3, tk)
    check(flash_attention.attention(q, k, v, 0.3, False, lengths), reference(q, k, v, 0.3, False, lengths), dtype)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("tq,tk,d", [(1, 97, 64), (7, 24, 24), (40, 130, 16)])
def test_causal_after_a_prefix(dtype, with_lengths, tq, tk, d):
    """Causal with Tq < Tk: the queries are the last Tq positions (GIT's text after its image tokens)."""
    q, k, v = qkv(3, 2, tq, tk, d, dtype, seed=tq * tk)
    lengths = torch.tensor([tk, tk - 1, tk - 2], device=DEVICE) if with_lengths else None
    check(flash_attention.attention(q, k, v, 0.3, True, lengths), reference(q, k, v, 0.3, True, lengths), dtype)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("causal,with_lengths", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("hq,hkv", [(4, 1), (6, 2), (3, 3)])
def test_grouped_query_attention(dtype, causal, with_lengths, hq, hkv):
    """Fewer K/V heads than query heads (LLaMA's GQA): the reference over K/V heads repeated (repeat_kv)."""
    q = qkv(2, hq, 7, 70, 24, dtype, seed=hq)[0]
    _, k, v = qkv(2, hkv, 7, 70, 24, dtype, seed=hkv + 10)
    lengths = lengths_for(2, 70) if with_lengths else None
    out = flash_attention.attention(q, k, v, 0.3, causal, lengths)
    assert out.shape == q.shape
    rep = hq // hkv
    check(out, reference(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), 0.3, causal, lengths), dtype)
    _, k2, v2 = qkv(2, 2, 7, 70, 24, dtype)
    with pytest.raises(ValueError, match="do not match"):  # 2 K/V heads for 3 query heads
        flash_attention.attention(q[:, :3], k2, v2, 0.3, causal, lengths)


def test_row_without_keys_is_finite_and_others_are_unaffected():
    """key_lengths[b] == 0 is invalid input with an undefined output: it must not poison the
    other rows or produce NaN (the reference gives NaN there)."""
    q, k, v = qkv(2, 3, 7, 7, 16, torch.float32)
    lengths = torch.tensor([7, 0], device=DEVICE)
    out = flash_attention.attention(q, k, v, 0.25, True, lengths)
    assert torch.isfinite(out).all()
    check(out[0], reference(q, k, v, 0.25, True, lengths)[0], torch.float32)


def test_registered_as_the_triton_backend(monkeypatch):
    monkeypatch.setenv("MMGEN_BACKEND", "triton")
    q, k, v = qkv(2, 3, 7, 7, 24, torch.float16)
    lengths = torch.tensor([7, 3], device=DEVICE)
    check(ops.attention(q, k, v, 0.2, causal=True, key_lengths=lengths),
          reference(q, k, v, 0.2, True, lengths), torch.float16)


def test_bfloat16_is_refused_on_cpu():
    """Triton's interpreter runs tl.dot on bfloat16 bit patterns: a clear error, not garbage."""
    q, k, v = qkv(1, 1, 3, 3, 16, torch.bfloat16, device="cpu")
    with pytest.raises(BackendError, match="bfloat16"):
        flash_attention.attention(q, k, v, 0.1, False, None)


@pytest.mark.parametrize("d", [160, 256, 512])
def test_wide_heads(d):
    """The VQGAN's single 512-wide attention head (and the block sizes between)."""
    q, k, v = qkv(2, 1, 37, 37, d, torch.float16, seed=d)
    check(flash_attention.attention(q, k, v, d ** -0.5, False, None), reference(q, k, v, d ** -0.5, False, None),
          torch.float16)


def test_head_dim_above_512_is_rejected():
    q, k, v = qkv(1, 1, 3, 3, 520, torch.float32)
    with pytest.raises(ValueError, match="head dims up to 512"):
        flash_attention.attention(q, k, v, 0.1, False, None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,h,t,causal,with_lengths", [(4, 12, 197, False, False), (4, 12, 197, False, True),
                                                        (2, 12, 1024, True, False)])
def test_real_sizes_no_worse_than_torch(dtype, b, h, t, causal, with_lengths):
    """ViT-B encoder (T=197, with and without per-row lengths) and a long causal prefill: the
    kernel's error against an fp32 reference is at most twice plain torch's in the same precision."""
    q, k, v = qkv(b, h, t, t, 64, dtype, device="cuda")
    lengths = torch.tensor([t, 1, 100, 150][:b], device="cuda") if with_lengths else None
    scale = 1 / math.sqrt(64)
    ref = attention_reference(q.float(), k.float(), v.float(), scale, causal, lengths).double()
    torch_error = relative_error(attention_reference(q, k, v, scale, causal, lengths), ref)
    out = flash_attention.attention(q, k, v, scale, causal, lengths)
    assert out.dtype == dtype
    assert relative_error(out, ref) <= 2 * torch_error + 1e-4, (relative_error(out, ref), torch_error)
