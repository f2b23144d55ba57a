"""``ops.bias_relu`` (OPT's feed-forward activation): the reference against the formula, the Triton
kernel against the reference (under the interpreter without a GPU; at real sizes in fp16 and bf16
on one), and the dispatch table."""
from __future__ import annotations

import pytest
import torch

from mmgen_engine import ops
from mmgen_engine.ops.activation import bias_relu_reference

triton = pytest.importorskip("triton")
from mmgen_engine.kernels import activation  # noqa: E402

TOL = {torch.float32: (0, 0), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}


def rand(*shape, dtype=torch.float32, device="cpu", seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype=dtype, device=device)


def check(shape, dtype, device, bias_dtype=None):
    x = 3 * rand(*shape, dtype=dtype, device=device, seed=1)
    b = rand(shape[-1], dtype=bias_dtype or dtype, device=device, seed=2)
    out, ref = activation.bias_relu(x, b), bias_relu_reference(x, b)
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    assert bool((out >= 0).all())


def test_reference_is_relu_of_the_sum():
    x = torch.linspace(-3, 3, 35).view(5, 7)
    b = torch.linspace(-1, 1, 7)
    assert torch.equal(ops.bias_relu(x, b), torch.clamp(x + b, min=0))
    with pytest.raises(ValueError, match=r"bias must have shape \(7,\)"):
        ops.bias_relu(x, b[:6])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 97), (2, 5, 1031)])
def test_triton_bias_relu_matches_reference(shape, dtype):
    check(shape, dtype, "cpu")


def test_triton_bias_relu_half_input_fp32_bias():
    check((4, 33), torch.float16, "cpu", bias_dtype=torch.float32)


def test_dispatch_forced_to_triton(monkeypatch):
    monkeypatch.setenv("MMGEN_BACKEND", "triton")
    x, b = rand(3, 16), rand(16, seed=3)
    assert ops.registry.dispatch("bias_relu", x) is activation.bias_relu
    torch.testing.assert_close(ops.bias_relu(x, b), bias_relu_reference(x, b))
    monkeypatch.delenv("MMGEN_BACKEND")
    assert ops.registry.dispatch("bias_relu", x) is bias_relu_reference  # never by default on CPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_bias_relu(dtype):
    for shape in [(16, 10240), (4, 57, 10240), (3, 1031)]:  # OPT-2.7B's ffn_dim
        check(shape, dtype, "cuda")
