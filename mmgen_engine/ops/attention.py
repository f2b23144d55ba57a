"""Attention ops.

``attention`` (prefill / encoder): ``softmax(q k^T * scale + mask) v`` for whole sequences,
q ``[B, H, Tq, D]``, k/v ``[B, H, Tk, D]``. The mask removes key ``s`` from query ``t`` when
``causal and s > t + Tk - Tq`` or when ``s >= key_lengths[b]``: causal queries are the *last* Tq
positions of the key sequence (``Tq <= Tk``; with ``Tq == Tk`` the usual ``s > t``), so a prompt
that follows a prefix whose keys come first attends to the whole prefix and causally to itself.

``decode_attention`` (one new query per row against a cache): ``q [B * group, H, D]``, ``k, v
[B, H, S, D]``, ``lengths [B]``; query row ``r`` attends to cache row ``b = r // group``, and only to
its keys ``0 .. lengths[b]-1``:
``out[r, h] = sum_s softmax_s(q[r, h] . k[b, h, s] * scale) v[b, h, s]``, ``s < lengths[b]``.
The same op serves causal self-attention over the static KV cache (``lengths`` = tokens so far) and
cross-attention over cached encoder K/V (``lengths`` = encoder length of the row). Every cache row
needs ``lengths[b] >= 1``. ``group`` (default 1: one query row per cache row) lets ``group``
consecutive query rows share one cache row, as a request's beams share its cross-attention K/V in
beam search: the result is that of ``group = 1`` on ``k, v, lengths`` repeated ``group`` times
(``repeat_interleave(group, 0)``), without the copy. With ``new_k, new_v [B, H, D]``
(self-attention, ``group == 1`` only: a cache write needs one query row per cache row) the new
token's key/value are first written into cache slot ``lengths[b] - 1`` of ``k, v``, so one call both
extends the cache and attends over it (the kernels do the write themselves, saving two launches per
layer).

Grouped-query attention (both ops): k, v may have fewer heads than q, ``Hkv`` dividing ``Hq``; query
head ``h`` reads K/V head ``h // (Hq / Hkv)`` (transformers' ``repeat_kv``, without the copy on the
fast backends). ``new_k, new_v`` then are ``[B, Hkv, D]``.

Rotary decode step: with ``cos, sin [B, D / 2]`` float32 (the table rows of each cache row's new
position, ``lengths[b] - 1``), q and ``new_k`` are first rotated as :func:`mmgen_engine.ops.rotary`
does (query row ``r`` by row ``r // group`` of the tables), so that the cache holds rotated keys;
the fast backends fuse the rotation into the cache write and the scores. The reference rounds the
rotated q to q's dtype (as an unfused rotary op would); the kernels keep it in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import CUDA_DEVICES, HALF_DTYPES, TRITON_DEVICES, dispatch, register, register_lazy
from .rotary import check_tables, rotate


@register("attention", "reference")
def attention_reference(q, k, v, scale, causal, key_lengths):
    tq, tk = q.shape[2], k.shape[2]
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}  # K/V head h // (Hq / Hkv)
    if key_lengths is None and (not causal or tq == tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **gqa)
    keep = torch.ones(1, 1, 1, tk, dtype=torch.bool, device=q.device)
    if key_lengths is not None:
        keep = (torch.arange(tk, device=q.device)[None, :] < key_lengths[:, None])[:, None, None, :]  # (B, 1, 1, Tk)
    if causal:
        keep = keep & torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, **gqa)


register_lazy("attention", "triton", "mmgen_engine.kernels.flash_attention:attention", TRITON_DEVICES)


@register("decode_attention", "reference")
def decode_attention_reference(q, k, v, lengths, scale, new_k=None, new_v=None, group=1, cos=None, sin=None):
    b, hkv, s, d = k.shape
    rep = q.shape[1] // hkv  # query heads per K/V head
    if cos is not None:
        q = rotate(q, cos.repeat_interleave(group, 0)[:, None], sin.repeat_interleave(group, 0)[:, None])
    if new_k is not None:
        if group != 1:
            raise ValueError(f"decode_attention: group={group} with new_k/new_v: a cache write needs one query "
                             "row per cache row (group=1)")
        if cos is not None:
            new_k = rotate(new_k, cos[:, None], sin[:, None])
        slots = (lengths - 1).view(-1, 1, 1, 1).expand(-1, hkv, 1, d)  # (B, Hkv, 1, D)
        k.scatter_(2, slots, new_k[:, :, None])
        v.scatter_(2, slots, new_v[:, :, None])
    # scores and softmax in fp32; k/v may be a view of the first S slots of a larger cache. The
    # group's queries, and the query heads of one K/V head, are batched against their cache row and
    # K/V head (no copy of k/v): (B, Hkv, group * rep, D).
    # (explicit math: torch's CPU SDPA with a mask is ~100x slower for a single query)
    qg = q.float().view(b, group, hkv, rep, d).transpose(1, 2).reshape(b, hkv, group * rep, d)
    scores = (qg @ k.float().transpose(-1, -2)) * scale  # (B, Hkv, group * rep, S)
    pad = torch.arange(s, device=q.device)[None, :] >= lengths[:, None]  # (B, S)
    probs = scores.masked_fill(pad[:, None, None, :], float("-inf")).softmax(dim=-1)
    out = probs @ v.float()  # (B, Hkv, group * rep, D)
    return out.view(b, hkv, group, rep * d).transpose(1, 2).reshape(b * group, hkv * rep, d).to(q.dtype)


register_lazy("decode_attention", "triton", "mmgen_engine.kernels.decode_attention:decode_attention",
              TRITON_DEVICES)
register_lazy("decode_attention", "cuda", "mmgen_engine.ops.cuda_ops:decode_attention", CUDA_DEVICES, HALF_DTYPES)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
              key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Full attention, ``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]`` (``Hkv`` dividing ``Hq``), optional
    ``key_lengths [B]`` -> ``[B, Hq, Tq, D]``; causal queries are the last ``Tq`` of ``Tk`` positions."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or \
            q.shape[3] != k.shape[3] or not 1 <= k.shape[1] <= q.shape[1] or q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: q must be [B, Hq, Tq, D] and k, v [B, Hkv, Tk, D] with Hkv dividing Hq, "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"causal attention needs Tq <= Tk, got {q.shape[2]} and {k.shape[2]}")
    return dispatch("attention", q)(q, k, v, scale, causal, key_lengths)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                     scale: float, new_k: torch.Tensor | None = None,
                     new_v: torch.Tensor | None = None, group: int = 1, cos: torch.Tensor | None = None,
                     sin: torch.Tensor | None = None) -> torch.Tensor:
    """One query per row: ``q [B * group, Hq, D]``, ``k, v [B, Hkv, S, D]`` (``Hkv`` dividing ``Hq``),
    ``lengths [B]`` -> ``[B * group, Hq, D]``; query row ``r`` attends to cache row ``r // group``.
    ``new_k, new_v [B, Hkv, D]`` are stored at slot ``lengths - 1`` first (``group == 1`` only). With
    ``cos, sin [B, D / 2]`` float32, q and new_k are rotated first (RoPE). See the module docstring."""
    if isinstance(group, torch.Tensor) and torch.jit.is_tracing():
        # a size read while a step is recorded (:mod:`mmgen_engine.runtime.recorded`) is a tensor
        # there; the recording is made for fixed shapes, so its value is a constant
        group = int(group)
    _check_decode_shapes(q, k, v, lengths, new_k, new_v, group, cos, sin)
    return dispatch("decode_attention", q)(q, k, v, lengths, scale, new_k, new_v, group, cos, sin)


def _check_decode_shapes(q, k, v, lengths, new_k, new_v, group, cos=None, sin=None) -> None:
    """Shapes only: no device value is read (so it runs inside CUDA-graph capture too)."""
    # a SymInt: traced by torch.export (the ONNX decode step divides its symbolic token rows by cache rows)
    if isinstance(group, bool) or not isinstance(group, (int, torch.SymInt)) or group < 1:
        raise ValueError(f"decode_attention: group must be an int >= 1, got {group!r}")
    if (new_k is None) != (new_v is None):
        raise ValueError("decode_attention: new_k and new_v go together")
    if new_k is not None and group != 1:
        raise ValueError(f"decode_attention: group={group} with new_k/new_v: a cache write needs one query "
                         "row per cache row (group=1)")
    if q.dim() != 3 or k.dim() != 4:
        raise ValueError(f"decode_attention: q must be [B * group, H, D] and k, v [B, H, S, D], got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    b, h, s, d = k.shape
    hq = q.shape[1] if h and q.shape[1] % h == 0 else h  # query heads: a multiple of the K/V heads
    for name, t, shape in (("q", q, (b * group, hq, d)), ("v", v, (b, h, s, d)), ("lengths", lengths, (b,)),
                           ("new_k", new_k, (b, h, d)), ("new_v", new_v, (b, h, d))):
        if t is not None and t.shape != shape:
            raise ValueError(f"decode_attention: {name} must have shape {shape} (k is {tuple(k.shape)}, "
                             f"group={group}), got {tuple(t.shape)}")
    if cos is not None or sin is not None:
        if d % 2:
            raise ValueError(f"decode_attention: rotary (cos, sin) needs an even head dim, got {d}")
        check_tables("decode_attention", cos, sin, (b, d // 2))
