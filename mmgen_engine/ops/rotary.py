"""Rotary position embedding (RoPE, Su et al.), in the rotate-half convention of transformers' LLaMA.

``rotary(x, cos, sin)``: for ``x [B, H, T, Dh]`` and ``cos, sin [B, T, Dh / 2]`` (the caller gathers
the table rows of each token's position), with ``x1 = x[..., :Dh/2]``, ``x2 = x[..., Dh/2:]``:
``out = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)``, math in float32, output in x's dtype (a new
tensor). This is ``x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)`` of transformers'
``apply_rotary_pos_emb`` with the half-width tables.

The decode step applies the same rotation to the new token's query and key inside
:func:`mmgen_engine.ops.decode_attention` (``cos=``, ``sin=``), fused with the cache write on the
fast backends.
"""
from __future__ import annotations

import torch

from .registry import TRITON_DEVICES, dispatch, register, register_lazy


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [..., Dh]`` rotated by ``cos, sin`` broadcastable to ``[..., Dh / 2]``: the math of the op."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.float(), sin.float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


@register("rotary", "reference")
def rotary_reference(x, cos, sin):
    return rotate(x, cos[:, None], sin[:, None])  # tables (B, 1, T, Dh/2) over the heads


register_lazy("rotary", "triton", "mmgen_engine.kernels.rotary:rotary", TRITON_DEVICES)




def check_tables(op: str, cos: torch.Tensor, sin: torch.Tensor, shape: tuple) -> None:
    """``cos`` and ``sin`` float32 of ``shape`` (shapes and dtypes only: no device value is read)."""
    for name, t in (("cos", cos), ("sin", sin)):
        if t is None:
            raise ValueError(f"{op}: cos and sin go together")
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise TypeError(f"{op}: {name} must be float32, got {str(t.dtype).removeprefix('torch.')}")


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x [B, H, T, Dh]`` with ``cos, sin [B, T, Dh / 2]`` float32 -> ``[B, H, T, Dh]`` in x's
    dtype. See the module docstring."""
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rotary: x must be [B, H, T, Dh] with an even Dh, got {tuple(x.shape)}")
    b, _, t, dh = x.shape
    check_tables("rotary", cos, sin, (b, t, dh // 2))
    return dispatch("rotary", x)(x, cos, sin)
