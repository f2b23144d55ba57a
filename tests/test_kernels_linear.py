"""The Triton linear kernel (kernels/triton/linear.py) against float64 math.

Both launch shapes (split-K for few rows, tiled GEMM for many), shapes that are not block multiples,
both weight layouts. They run on the GPU when there is one, else on CPU in Triton's interpreter
(conftest sets TRITON_INTERPRET=1; slow, hence the small shapes). The ``gpu`` tests run GPT-2
small's decode shapes against plain torch.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_ops import linear_operands, relative_error

from mmgen_engine import BackendError, ops

pytest.importorskip("triton")
from mmgen_engine.kernels import linear as linear_kernel  # noqa: E402  (needs triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# dtype -> (atol, rtol) against float64 math on the same inputs, atol per sqrt(K) (the sum's spread);
# fp16 is dominated by rounding the output
TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-3, 1e-3)}


def operands(m, n, k, dtype, layout, device=DEVICE):
    return linear_operands(m, n, k, dtype, layout, device)


def check(out, ref, dtype, k):
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=atol * k ** 0.5, rtol=rtol)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("m", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("n,k", [(1, 2), (97, 64), (64, 97), (300, 768)])
@pytest.mark.parametrize("layout", ["row-major", "column-major"])
def test_linear_matches_float64(dtype, m, n, k, layout):
    x, w, b = operands(m, n, k, dtype, layout)
    ref = x.double() @ w.double().t()
    # bias and no bias alternate over the shapes (the interpreter is slow)
    bias = b if (m + n) % 2 else None
    if bias is not None:
        ref += b.double()
    check(linear_kernel.linear(x, w, bias), ref, dtype, k)


def test_grouped_tile_order_covers_every_tile():
    """9 row blocks x 3 column blocks: a full group of GROUP_M row blocks and a partial one."""
    x, w, b = operands(520, 257, 16, torch.float32, "row-major")
    check(linear_kernel.linear(x, w, b), x.double() @ w.double().t() + b.double(), torch.float32, 16)


def test_leading_dims_and_strided_input():
    """x ``[..., K]`` keeps its leading dims; a non-contiguous x (a slice of a wider tensor) works."""
    x, w, b = operands(6, 97, 64, torch.float32, "row-major")
    wide = torch.cat([x, x], dim=1)[:, :64].view(2, 3, 64)  # rows strided by 128
    out = linear_kernel.linear(wide, w, b)
    assert out.shape == (2, 3, 97)
    check(out.view(6, 97), x.double() @ w.double().t() + b.double(), torch.float32, 64)


def test_few_rows_split_k_over_many_programs():
    """Decode products split K so that even a 768x768 weight runs on 100+ programs; many rows and
    wide weights do not split."""
    for n, k in [(768, 768), (2304, 768), (768, 3072)]:
        (_, block_n, _, _, _), split_k, k_per_split = linear_kernel.plan(1, n, k)
        assert split_k > 1 and split_k * -(-n // block_n) >= 100 and (split_k - 1) * k_per_split < k
    assert linear_kernel.plan(1, 50257, 768)[1] == 1
    assert linear_kernel.plan(17, 768, 768)[1] == 1


def test_bfloat16_is_refused_on_cpu():
    """Triton's interpreter runs tl.dot on bfloat16 bit patterns: a clear error, not garbage."""
    x, w, b = operands(1, 8, 8, torch.bfloat16, "row-major", device="cpu")
    with pytest.raises(BackendError, match="bfloat16"):
        linear_kernel.linear(x, w, b)


def test_registered_as_the_triton_backend(monkeypatch):
    monkeypatch.setenv("MMGEN_BACKEND", "triton")
    x, w, b = operands(3, 64, 97, torch.float16, "column-major")
    check(ops.linear(x, w, b), x.double() @ w.double().t() + b.double(), torch.float16, 97)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("n,k", [(2304, 768), (768, 768), (3072, 768), (768, 3072), (50257, 768)])
@pytest.mark.parametrize("layout", ["row-major", "column-major"])
def test_gpt2_decode_shapes_no_worse_than_torch(dtype, m, n, k, layout):
    """GPT-2 small's decode products: error against an fp32 reference at most twice F.linear's in the
    same precision."""
    x, w, b = operands(m, n, k, dtype, layout, device="cuda")
    ref = F.linear(x.float(), w.float(), b.float()).double()
    torch_error = relative_error(F.linear(x, w, b), ref)
    out = linear_kernel.linear(x, w, b)
    assert out.dtype == dtype
    assert relative_error(out, ref) <= 2 * torch_error + 1e-4, (relative_error(out, ref), torch_error)
