"""The Triton convolution and GroupNorm kernels (kernels/triton/conv.py) against the references in
mmgen_engine/ops/conv.py.

Every stage of the fused conv alone and together (upsample, GroupNorm with 1, 2 or 4 groups, ReLU /
SiLU, bias, scale, residual), channel counts that are not block multiples, odd and 1-pixel images,
1x1 / 3x3 / 5x5 kernels, inputs, weights and residuals in either memory format or strided. Without a
GPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1; slow, hence tiny shapes);
the ``gpu`` tests run VQGAN and dVAE shapes in fp16 and bf16.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from test_ops import relative_error

from mmgen_engine import BackendError, ops
from mmgen_engine.ops.conv import conv2d_reference, group_norm_reference

pytest.importorskip("triton")
from mmgen_engine.kernels import conv  # noqa: E402  (needs triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# largest |error| allowed, as a fraction of the largest |reference| value; fp16 rounds the
# normalized activations to fp16 before the product (the CPU reference keeps them in fp32)
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
CL = torch.channels_last


def rand(*shape, dtype=torch.float32, device=DEVICE, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype=dtype, device=device)


def check(out, ref, tol=None):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=CL)
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= (tol or TOL[ref.dtype]) * ref.float().abs().max().item(), err


def operands(b, cin, cout, h, w, k, *, upsample=False, groups=None, residual=False, bias=True,
             dtype=torch.float32, device=DEVICE):
    """Seeded ``(x, weight, bias, norm, residual)`` for a ``padding = k // 2`` conv; the weight is
    scaled like a trained one (``1 / sqrt(fan-in)``) so outputs stay O(1)."""
    seed = b * 1000 + cin * 100 + cout * 10 + h + w + k
    ho, wo = (2 * h, 2 * w) if upsample else (h, w)
    return (rand(b, cin, h, w, dtype=dtype, device=device, seed=seed, scale=2.0),
            rand(cout, cin, k, k, dtype=dtype, device=device, seed=seed + 1, scale=(cin * k * k) ** -0.5),
            rand(cout, dtype=dtype, device=device, seed=seed + 2) if bias else None,
            (rand(cin, device=device, seed=seed + 3), rand(cin, device=device, seed=seed + 4), groups, 1e-5)
            if groups else None,
            rand(b, cout, ho, wo, dtype=dtype, device=device, seed=seed + 5) if residual else None)


def run_both(x, weight, bias, padding, upsample=False, norm=None, act=None, residual=None, scale=1.0):
    out = conv.conv2d(x, weight, bias, padding, upsample, norm, act, residual, scale)
    return out, conv2d_reference(x, weight, bias, padding, upsample, norm, act, residual, scale)


@pytest.mark.parametrize("upsample,groups,act,residual",
                         list(itertools.product([False, True], [None, 1, 2, 4], ["relu", "silu", None], [False, True])))
def test_every_combination_of_stages(upsample, groups, act, residual):
    """3x3 conv, 4 -> 6 channels over a 3x5 image: every input stage with and without the residual
    (which comes with a scale: the dVAE's ``id + post_gain * res``), bias or not."""
    x, w, b, norm, res = operands(1, 4, 6, 3, 5, 3, upsample=upsample, groups=groups, residual=residual,
                                  bias=not residual or act != "relu")
    check(*run_both(x, w, b, 1, upsample, norm, act, res, 0.25 if residual else 1.0))


# (B, Cin, Cout, H, W, k, groups): channels around the interpreter's blocks (32 input channels,
# 32 outputs, 64 pixels per step), 1-pixel, odd and non-square images
SHAPES = [(1, 3, 5, 1, 1, 3, 1), (3, 5, 17, 3, 7, 1, 5), (1, 17, 40, 9, 9, 3, 1), (3, 40, 3, 7, 9, 3, 4),
          (2, 32, 33, 1, 9, 3, 2), (1, 40, 40, 9, 7, 1, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,cin,cout,h,w,k,groups", SHAPES)
def test_awkward_shapes(b, cin, cout, h, w, k, groups, dtype):
    """All stages on (GroupNorm + SiLU in, residual out), upsampled on every other shape."""
    upsample = (cin + cout) % 2 == 0
    x, wt, bias, norm, res = operands(b, cin, cout, h, w, k, upsample=upsample, groups=groups, residual=True,
                                      dtype=dtype)
    check(*run_both(x, wt, bias, k // 2, upsample, norm, "silu", res, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,cin,cout,h,w,k", [(1, 17, 40, 9, 9, 3), (3, 40, 17, 7, 9, 1)])
def test_plain_conv(b, cin, cout, h, w, k, dtype):
    """No fused stage: the bare implicit GEMM, bias or not."""
    x, wt, bias, _, _ = operands(b, cin, cout, h, w, k, bias=k == 3, dtype=dtype)
    check(*run_both(x, wt, bias, k // 2))


@pytest.mark.parametrize("k,padding", [(3, 0), (5, 2), (5, 1), (1, 1)])
def test_other_kernels_and_paddings(k, padding):
    """A 'valid' 3x3, a 5x5, paddings that shrink and grow the image, the padding after GroupNorm."""
    x, w, b, norm, _ = operands(2, 6, 7, 7, 6, k, groups=2)
    check(*run_both(x, w, b, padding, False, norm, "relu"))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_memory_formats_of_every_operand(layout):
    """x, weight and residual in NCHW, channels-last or as strided slices of larger tensors: the
    same result, always a channels-last output."""
    x, w, b, norm, res = operands(2, 5, 7, 7, 5, 3, upsample=True, groups=1, residual=True)
    if layout == "channels_last":
        x, w, res = (t.contiguous(memory_format=CL) for t in (x, w, res))
    elif layout == "strided":
        x = torch.cat([x, x], dim=1)[:, 5:]
        w = torch.cat([w, w], dim=1)[:, ::2]
        res = torch.cat([res, res], dim=3)[..., ::2]
        for t in (x, w, res):
            assert not (t.is_contiguous() or t.is_contiguous(memory_format=CL))
    check(*run_both(x, w, b, 1, True, norm, "silu", res, 2.0))


def test_large_mean_groupnorm_statistics_stay_accurate():
    """Activations with |mean| = 1000 std and a ramp over the pixels (so that tiles and chunks have
    different means): the statistics merge deviations (Chan et al.), so no E[x^2] - E[x]^2
    cancellation in fp32 (that would be off by several percent here). What is left is the
    ``x scale + shift`` form of the norm (torch's CUDA GroupNorm's too): |mean| / std * 2^-24."""
    x = rand(2, 32, 9, 9, seed=1) + 1000.0 + torch.linspace(0, 4, 81, device=DEVICE).view(9, 9)
    _, w, b, norm, _ = operands(2, 32, 4, 9, 9, 3, groups=2)
    check(*run_both(x, w, b, 1, False, norm, "silu"), tol=3e-4)
    check(conv.group_norm(x, norm[0], norm[1], 2, 1e-5), group_norm_reference(x, norm[0], norm[1], 2, 1e-5),
          tol=3e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "b,c,h,w,groups,act",
    [
        (1, 3, 1, 1, 1, None),
        (3, 6, 7, 9, 2, "silu"),
        (2, 40, 9, 9, 4, "relu"),
        (1, 32, 3, 5, 32, "silu"),
        (2, 512, 2, 3, 32, None),
    ],
)
def test_group_norm(b, c, h, w, groups, act, dtype):
    x = rand(b, c, h, w, dtype=dtype, seed=2, scale=3.0)
    if c % 2 == 0:  # the others stay NCHW
        x = x.contiguous(memory_format=CL)
    gamma, beta = rand(c, seed=3), rand(c, seed=4)
    check(conv.group_norm(x, gamma, beta, groups, 1e-5, act), group_norm_reference(x, gamma, beta, groups, 1e-5, act))


def test_invalid_inputs_are_refused():
    x, w, b, norm, res = operands(1, 4, 6, 3, 3, 3, groups=2, residual=True)
    with pytest.raises(ValueError, match="weight"):
        conv.conv2d(x, w[:, :3], b, 1)
    with pytest.raises(ValueError, match="weight"):
        conv.conv2d(x, w.half(), b, 1)
    with pytest.raises(ValueError, match="bias"):
        conv.conv2d(x, w, b[:5], 1)
    with pytest.raises(ValueError, match="residual"):
        conv.conv2d(x, w, b, 0, residual=res)  # a 1x1 output
    with pytest.raises(ValueError, match="does not fit"):
        conv.conv2d(x[:, :, :2, :2], w, b, 0)
    with pytest.raises(ValueError, match="act"):
        conv.conv2d(x, w, b, 1, act="gelu")
    with pytest.raises(ValueError, match="groups"):
        conv.conv2d(x, w, b, 1, norm=(norm[0], norm[1], 3, 1e-5))
    with pytest.raises(ValueError, match="weight"):
        conv.group_norm(x, norm[0][:3], norm[1], 2, 1e-5)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        conv.group_norm(x.double(), *norm)
    with pytest.raises(BackendError, match="bfloat16"):  # no tl.dot on bfloat16 in the interpreter
        conv.conv2d(x.cpu().bfloat16(), w.cpu().bfloat16(), None, 1)


def test_registered_as_the_triton_backend(monkeypatch):
    monkeypatch.setenv("MMGEN_BACKEND", "triton")
    x, w, b, norm, res = operands(1, 4, 6, 3, 3, 3, groups=2, residual=True, dtype=torch.float16)
    assert ops.registry.dispatch("conv2d", x) is conv.conv2d
    assert ops.registry.dispatch("group_norm", x) is conv.group_norm
    check(ops.conv2d(x, w, b, 1, norm=norm, act="silu", residual=res),
          conv2d_reference(x, w, b, 1, norm=norm, act="silu", residual=res))


def test_gpu_tiles_fill_the_machine():
    """On a GPU the largest tile that still gives two programs per SM; small inputs get small
    tiles, the reduction block never exceeds what Cin needs."""
    assert conv.plan(8, 256 * 256, 128, 128, torch.float16, True) == (128, 128, 64, 8, 3)
    assert conv.plan(1, 128 * 128, 256, 256, torch.float16, True)[:2] == (128, 64)
    assert conv.plan(1, 16 * 16, 512, 512, torch.float16, True)[:2] == (64, 64)
    assert conv.plan(1, 256 * 256, 3, 128, torch.float32, True)[2] == 16
    assert conv.plan(1, 256 * 256, 128, 128, torch.float32, True)[2:] == (32, 8, 2)


# ---- GPU: VQGAN and dVAE shapes -----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,cin,cout,h,k,upsample,groups,act,residual", [
    (1, 512, 512, 16, 3, False, 32, "silu", True),  # VQGAN mid block
    (8, 256, 256, 32, 3, True, None, None, False),  # VQGAN upsample conv
    (1, 128, 128, 256, 3, False, 32, "silu", False),  # VQGAN top level
    (2, 512, 1536, 16, 1, False, 32, None, False),  # VQGAN attention's fused q/k/v
    (2, 2048, 512, 32, 1, False, None, "relu", False),  # dVAE bottleneck in
    (2, 512, 2048, 32, 1, False, None, "relu", True),  # dVAE bottleneck out, id + post_gain * res
    (1, 2048, 512, 32, 3, False, None, "relu", False),
])
def test_gpu_model_shapes_no_worse_than_torch(b, cin, cout, h, k, upsample, groups, act, residual, dtype):
    """Error against an fp64 reference at most twice that of torch (cuDNN) in the same precision."""
    x, w, bias, norm, res = operands(b, cin, cout, h, h, k, upsample=upsample, groups=groups, residual=residual,
                                     dtype=dtype, device="cuda")
    args = (k // 2, upsample, norm, act, res, 0.5 if residual else 1.0)
    norm64 = norm and (norm[0].double(), norm[1].double(), *norm[2:])
    exact = conv2d_reference(x.double(), w.double(), bias.double(), args[0], upsample, norm64, act,
                             None if res is None else res.double(), args[-1])
    out = conv.conv2d(x, w, bias, *args)
    check(out, exact.to(dtype))
    torch_error = relative_error(conv2d_reference(x, w, bias, *args), exact)
    assert relative_error(out, exact) <= 2 * torch_error + 1e-4, (relative_error(out, exact), torch_error)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,c,h", [(1, 128, 256), (8, 512, 16)])
def test_gpu_group_norm(b, c, h, dtype):
    x = rand(b, c, h, h, dtype=dtype, device="cuda", seed=5).contiguous(memory_format=CL)
    gamma, beta = rand(c, device="cuda", seed=6), rand(c, device="cuda", seed=7)
    check(conv.group_norm(x, gamma, beta, 32, 1e-6, "silu"), group_norm_reference(x, gamma, beta, 32, 1e-6, "silu"))
