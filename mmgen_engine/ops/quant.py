"""Weight-only int8: the stored form of a quantized linear weight, and how it is made and undone.

A weight ``W [N, K]`` (torch's ``[out, in]``) is stored as int8 values ``q [N, K]`` and float32
scales, symmetric (no zero point) and rounded to nearest:

- per output channel: ``scale [N] = max_k |W[n, k]| / 127``, ``q = round(W / scale[:, None])``;
- grouped along the input (``group_size`` G, 128 by default in :func:`quantize_int8`):
  ``scale [N, ceil(K / G)]``, group ``g`` covering columns ``g G .. min((g + 1) G, K) - 1`` (the
  last group is short when ``K`` is not a multiple of ``G``).

``W ~= q * scale`` with ``|W - q * scale| <= scale / 2`` per element. A row (or group) of zeros
gets scale 0 and q 0. Activations are not quantized: :func:`mmgen_engine.ops.linear` multiplies
them, in their own dtype, by the dequantized weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError

QMAX = 127  # symmetric: -127..127, -128 unused
DEFAULT_GROUP_SIZE = 128


@dataclass(frozen=True)
class Int8Weight:
    """``qweight [N, K]`` int8 (row-major contiguous), ``scale`` float32 ``[N]`` (per channel,
    ``group_size`` None) or ``[N, ceil(K / group_size)]`` (grouped along K)."""

    qweight: torch.Tensor
    scale: torch.Tensor
    group_size: int | None = None

    def __post_init__(self):
        q, s, g = self.qweight, self.scale, self.group_size
        if q.dtype != torch.int8 or q.dim() != 2:
            raise InputError(f"Int8Weight: qweight must be a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
        n, k = q.shape
        want = (n,) if g is None else (n, -(-k // g)) if g > 0 else None
        if want is None or s.dtype != torch.float32 or tuple(s.shape) != want:
            raise InputError(f"Int8Weight: scale must be float32 {want} for qweight {tuple(q.shape)} and "
                             f"group_size {g}, got {s.dtype} {tuple(s.shape)}")

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def nbytes(self) -> int:
        """Bytes a product streams: the int8 values and the scales."""
        return self.qweight.numel() + self.scale.numel() * 4

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``q * scale`` as a ``[N, K]`` tensor of ``dtype`` (computed in float32, then cast)."""
        return dequantize_int8(self, dtype)


def _grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """``t [N, K]`` zero-padded along K to whole groups and viewed ``[N, groups, G]``."""
    n, k = t.shape
    groups = -(-k // group_size)
    return torch.nn.functional.pad(t, (0, groups * group_size - k)).view(n, groups, group_size)


def quantize_int8(weight: torch.Tensor, group_size: int | None = DEFAULT_GROUP_SIZE) -> Int8Weight:
    """Quantize ``weight [N, K]`` symmetrically to int8, per output channel (``group_size`` None) or
    per group of ``group_size`` input columns. Scales are computed in float32."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise InputError(f"quantize_int8: expected a 2-D floating weight, got {weight.dtype} {tuple(weight.shape)}")
    if group_size is not None and group_size < 1:
        raise InputError(f"quantize_int8: group_size must be positive or None, got {group_size}")
    w = weight.detach().float()
    k = w.shape[1]
    blocks = w[:, None, :] if group_size is None else _grouped(w, group_size)  # (N, groups, G)
    scale = blocks.abs().amax(dim=-1) / QMAX  # (N, groups)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(blocks / safe[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    q = q.reshape(w.shape[0], -1)[:, :k].contiguous()
    return Int8Weight(q, scale[:, 0].contiguous() if group_size is None else scale.contiguous(), group_size)


def dequantize_int8(weight: Int8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` -> ``[N, K]`` of ``dtype`` (float32 math, one rounding to ``dtype``)."""
    q, s, g = weight.qweight, weight.scale, weight.group_size
    if g is None:
        w = q.float() * s[:, None]
    else:
        w = (_grouped(q.float(), g) * s[..., None]).flatten(1)[:, : q.shape[1]]
    return w.to(dtype)
