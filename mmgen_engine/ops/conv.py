"""Convolution with fused input and output stages, and GroupNorm: the image decoders' ops.

``conv2d(x, weight, bias, padding, upsample=False, norm=None, act=None, residual=None, scale=1.0)``::

    u   = nearest_upsample_2x(x) if upsample else x              # [B, Cin, H', W']
    n   = group_norm(u, *norm) if norm else u                    # norm = (weight, bias, groups, eps)
    a   = relu(n) | silu(n) | n                                  # act = "relu" | "silu" | None
    y   = conv2d(a, weight, stride 1, zero padding) + bias       # [B, Cout, H'', W'']
    out = residual + scale * y   (scale * y without a residual)

``x [B, Cin, H, W]`` in any memory format (the fast kernels want channels-last and return it);
``weight [Cout, Cin, k, k]``, ``bias [Cout]`` or None. The GroupNorm statistics of ``u`` equal those
of ``x`` (a nearest upsample repeats every pixel four times), so a kernel may compute them on ``x``.
These are the stages of a VQGAN ResNet block (GroupNorm + SiLU -> conv, + shortcut), of the OpenAI
dVAE's blocks (ReLU -> conv, ``id_path + post_gain * res_path``) and of their upsampling convs.

``group_norm(x, weight, bias, groups, eps, act=None)``: GroupNorm over ``[B, C, ...]`` followed by
the optional activation (the VQGAN attention block's and output's norm).

Statistics and, on CPU, the convolution itself run in fp32 (CPU half-precision convolution is
slow and not what a GPU computes); the result has ``x``'s dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import TRITON_DEVICES, dispatch, register, register_lazy

ACTIVATIONS = (None, "relu", "silu")


def _act(x, act):
    if act == "relu":
        return F.relu(x)
    if act == "silu":
        return F.silu(x)
    return x


@register("group_norm", "reference")
def group_norm_reference(x, weight, bias, groups, eps, act=None):
    return _act(F.group_norm(x.float(), groups, weight.float(), bias.float(), eps), act).to(x.dtype)


@register("conv2d", "reference")
def conv2d_reference(x, weight, bias, padding, upsample=False, norm=None, act=None, residual=None, scale=1.0):
    compute = torch.float32 if x.device.type == "cpu" else x.dtype
    u = F.interpolate(x, scale_factor=2.0, mode="nearest") if upsample else x
    if norm is not None:
        u = F.group_norm(u.float(), norm[2], norm[0].float(), norm[1].float(), norm[3])
    a = _act(u.to(compute), act)
    y = F.conv2d(a, weight.to(compute), None if bias is None else bias.to(compute), padding=padding)
    if scale != 1.0:
        y = y * scale
    if residual is not None:
        y = residual.to(compute) + y
    return y.to(x.dtype)


register_lazy("conv2d", "triton", "mmgen_engine.kernels.conv:conv2d", TRITON_DEVICES)
register_lazy("group_norm", "triton", "mmgen_engine.kernels.conv:group_norm", TRITON_DEVICES)


def _check(x: torch.Tensor, act) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if x.dim() != 4:
        raise ValueError(f"expected a [B, C, H, W] input, got shape {tuple(x.shape)}")


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, *,
           upsample: bool = False, norm: tuple | None = None, act: str | None = None,
           residual: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """``residual + scale * (conv(act(norm(up(x)))) + bias)``, see the module docstring."""
    _check(x, act)
    if weight.shape[1] != x.shape[1] or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit input channels {x.shape[1]}")
    return dispatch("conv2d", x)(x, weight, bias, padding, upsample, norm, act, residual, scale)


def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
               act: str | None = None) -> torch.Tensor:
    """``act(GroupNorm(groups)(x))`` for ``x [B, C, H, W]``, ``weight, bias [C]``."""
    _check(x, act)
    if x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels are not divisible into {groups} groups")
    return dispatch("group_norm", x)(x, weight, bias, groups, eps, act)
