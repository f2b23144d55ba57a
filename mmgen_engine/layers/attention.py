"""Multi-head attention blocks: bidirectional (encoders), causal with a KV cache, cross-attention,
and grouped-query attention with rotary positions (LLaMA).

Weights use the torch ``Linear`` layout ``[out, in]``; q/k/v projections are fused into one
``qkv`` matrix ``[3 * D, D]`` (rows q, then k, then v) and cross-attention's k/v into ``kv``.
The caches are handed in by the runtime: ``k_cache, v_cache [B, H, S, Dh]`` views of one layer;
these blocks only write the new keys/values into them and read them back.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .linear import Linear


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, num_heads, d // num_heads).transpose(1, 2)  # (B, H, T, Dh)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)  # (B, T, D)


class SelfAttention(nn.Module):
    """``out(attn(x))`` with fused qkv; ``prefill`` and ``decode`` also fill a KV cache."""

    def __init__(self, dim: int, num_heads: int, scale: float, qkv_bias: bool = True, out_bias: bool = True,
                 device=None):
        super().__init__()
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias, device=device)
        self.out = Linear(dim, dim, bias=out_bias, device=device)
        self.num_heads = num_heads
        self.scale = scale
        self.requires_grad_(False)

    def _qkv(self, x):
        q, k, v = self.qkv(x).split(self.out.in_features, dim=-1)
        return split_heads(q, self.num_heads), split_heads(k, self.num_heads), split_heads(v, self.num_heads)

    def forward(self, x: torch.Tensor, key_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Bidirectional attention over ``x [B, T, D]`` (no cache); row ``b`` attends to its first
        ``key_lengths[b]`` tokens (all when None)."""
        q, k, v = self._qkv(x)
        return self.out(merge_heads(ops.attention(q, k, v, self.scale, causal=False, key_lengths=key_lengths)))

    def prefill(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix: int = 0) -> torch.Tensor:
        """Causal attention over the prompt ``x [B, T, D]``; its K/V go to cache slots ``0..T-1``.
        The first ``prefix`` positions attend to each other bidirectionally (and not to the rest),
        the others to the whole prefix and causally among themselves (GIT's image tokens + text)."""
        q, k, v = self._qkv(x)
        t = x.shape[1]
        k_cache[:, :, :t] = k
        v_cache[:, :, :t] = v
        if not prefix:
            return self.out(merge_heads(ops.attention(q, k, v, self.scale, causal=True)))
        head = ops.attention(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], self.scale, causal=False)
        tail = ops.attention(q[:, :, prefix:], k, v, self.scale, causal=True)  # the last t - prefix queries
        return self.out(merge_heads(torch.cat([head, tail], dim=2)))

    def decode(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
               span: int) -> torch.Tensor:
        """One token per row, ``x [B, D]``: its K/V go into cache slot ``lengths[b] - 1``, then it
        attends to slots ``0 .. lengths[b]-1``. Only the first ``span`` slots are read
        (``span >= max(lengths)``)."""
        b = x.shape[0]
        q, k, v = (t.view(b, self.num_heads, -1) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, Dh)
        o = ops.decode_attention(q, k_cache[:, :, :span], v_cache[:, :, :span], lengths, self.scale, k, v)
        return self.out(o.reshape(b, -1))


class CrossAttention(nn.Module):
    """Attention from decoder tokens to encoder states (``kv_dim`` wide, default ``dim``) whose K/V
    are computed once per request."""

    def __init__(self, dim: int, num_heads: int, scale: float, bias: bool = True, kv_dim: int | None = None,
                 device=None):
        super().__init__()
        self.q = Linear(dim, dim, bias=bias, device=device)
        self.kv = Linear(kv_dim or dim, 2 * dim, bias=bias, device=device)
        self.out = Linear(dim, dim, bias=bias, device=device)
        self.num_heads = num_heads
        self.scale = scale
        self.requires_grad_(False)

    def fill_cache(self, encoder_states: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """Project ``encoder_states [B, S, D]`` to K/V once and store them ``[B, H, S, Dh]``."""
        k, v = self.kv(encoder_states).chunk(2, dim=-1)
        k_cache.copy_(split_heads(k, self.num_heads))
        v_cache.copy_(split_heads(v, self.num_heads))

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        """``x [B, D]`` (one token per row) or ``[B, T, D]``; row ``b`` sees encoder slots
        ``0..lengths[b]-1``. One token per row may also come for ``G`` rows per cache row (``x [B * G,
        D]``: the beams of a request, sharing its cross-attention K/V), row ``r`` reading cache row
        ``r // G``."""
        if x.dim() == 2:
            q = self.q(x).view(x.shape[0], self.num_heads, -1)  # (B, H, Dh)
            o = ops.decode_attention(q, k_cache, v_cache, lengths, self.scale, group=x.shape[0] // k_cache.shape[0])
            return self.out(o.reshape(x.shape[0], -1))
        q = split_heads(self.q(x), self.num_heads)
        return self.out(merge_heads(ops.attention(q, k_cache, v_cache, self.scale, causal=False,
                                                  key_lengths=lengths)))


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with ``num_kv_heads`` K/V heads, each shared by ``num_heads /
    num_kv_heads`` query heads (grouped-query attention; multi-query with one K/V head, plain
    multi-head with as many as query heads), and rotary positions on q and k (LLaMA).

    One fused ``qkv`` matrix ``[(Hq + 2 Hkv) Dh, D]`` (rows q, then k, then v), the output
    projection ``out [D, Hq Dh]``. The cache holds ``Hkv`` heads: ``k_cache, v_cache [B, Hkv, S, Dh]``,
    rotated keys. ``cos, sin`` are the float32 rotary tables of the tokens' positions.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool = False,
                 device=None):
        super().__init__()
        self.qkv = Linear(dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias, device=device)
        self.out = Linear(num_heads * head_dim, dim, bias=bias, device=device)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.requires_grad_(False)

    def _split(self, x):
        kv = self.num_kv_heads * self.head_dim
        return self.qkv(x).split([self.num_heads * self.head_dim, kv, kv], dim=-1)

    def prefill(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """Causal attention over ``x [B, T, D]`` at positions ``0..T-1`` (``cos, sin [B, T, Dh / 2]``);
        the rotated keys and the values go to cache slots ``0..T-1``."""
        q, k, v = self._split(x)
        q = ops.rotary(split_heads(q, self.num_heads), cos, sin)  # (B, Hq, T, Dh)
        k = ops.rotary(split_heads(k, self.num_kv_heads), cos, sin)  # (B, Hkv, T, Dh)
        v = split_heads(v, self.num_kv_heads)
        t = x.shape[1]
        k_cache[:, :, :t] = k
        v_cache[:, :, :t] = v
        return self.out(merge_heads(ops.attention(q, k, v, self.scale, causal=True)))

    def decode(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
               span: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One token per row, ``x [B, D]`` at position ``lengths[b] - 1`` (``cos, sin [B, Dh / 2]``): its
        query and key are rotated and its K/V written into that cache slot inside
        :func:`~mmgen_engine.ops.decode_attention`, then it attends to slots ``0 .. lengths[b]-1``
        (only the first ``span`` slots are read)."""
        b = x.shape[0]
        q, k, v = self._split(x)
        q = q.view(b, self.num_heads, self.head_dim)
        k, v = k.view(b, self.num_kv_heads, self.head_dim), v.view(b, self.num_kv_heads, self.head_dim)
        o = ops.decode_attention(q, k_cache[:, :, :span], v_cache[:, :, :span], lengths, self.scale, k, v,
                                 cos=cos, sin=sin)
        return self.out(o.reshape(b, -1))
