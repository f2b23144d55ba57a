"""Rotary position embedding tables (RoPE) with the frequency kinds of transformers' LLaMA.

``inv_freq [Dh / 2]`` is computed on the CPU in float32 exactly as transformers' rope functions do
(``default``, ``linear``, ``llama3``; see :class:`~mmgen_engine.config.RopeConfig`); a token at
position ``p`` rotates pair ``i`` by the angle ``p * inv_freq[i]`` (a float32 product, as
transformers' ``LlamaRotaryEmbedding``), so ``cos, sin`` hold the same float32 values as theirs.
The rotation itself is :func:`mmgen_engine.ops.rotary` (prefill) or fused into
:func:`mmgen_engine.ops.decode_attention` (decode).
"""
from __future__ import annotations

import math

import torch

from ..config import RopeConfig


def inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """``[head_dim / 2]`` float32 inverse frequencies of ``rope``."""
    base = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    freq = 1.0 / (rope.theta ** base)
    if rope.kind == "linear":
        return freq / rope.factor
    if rope.kind == "llama3":
        low_wavelen = rope.original_max_positions / rope.low_freq_factor
        high_wavelen = rope.original_max_positions / rope.high_freq_factor
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > low_wavelen, freq / rope.factor, freq)
        smooth = (rope.original_max_positions / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return freq


class RotaryTable:
    """The angles of ``rope`` for ``head_dim``-wide heads; :meth:`__call__` gives ``cos, sin`` of
    positions. Not a module: the frequencies are derived from the config, never stored in a
    checkpoint, and kept per device (made on first use, before any CUDA-graph capture)."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        self._freq = {torch.device("cpu"): inv_freq(rope, head_dim)}

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [...]`` int64 -> ``cos, sin [..., Dh / 2]`` float32."""
        freq = self._freq.get(positions.device)
        if freq is None:
            freq = self._freq[positions.device] = self._freq[torch.device("cpu")].to(positions.device)
        angles = positions[..., None].float() * freq
        return angles.cos(), angles.sin()
