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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import CUDA_DEVICES, HALF_DTYPES, TRITON_DEVICES, dispatch, register, register_lazy


@register("attention", "reference")
def attention_reference(q, k, v, scale, causal, key_lengths):
    tq, tk = q.shape[2], k.shape[2]
    if key_lengths is None and (not causal or tq == tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    keep = torch.ones(1, 1, 1, tk, dtype=torch.bool, device=q.device)
    if key_lengths is not None:
        keep = (torch.arange(tk, device=q.device)[None, :] < key_lengths[:, None])[:, None, None, :]  # (B, 1, 1, Tk)
    if causal:
        keep = keep & torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)


register_lazy("attention", "triton", "mmgen_engine.kernels.flash_attention:attention", TRITON_DEVICES)


@register("decode_attention", "reference")
def decode_attention_reference(q, k, v, lengths, scale, new_k=None, new_v=None, group=1):
    b, h, s, d = k.shape
    if new_k is not None:
        if group != 1:
            raise ValueError(f"decode_attention: group={group} with new_k/new_v: a cache write needs one query "
                             "row per cache row (group=1)")
        slots = (lengths - 1).view(-1, 1, 1, 1).expand(-1, h, 1, d)  # (B, H, 1, D)
        k.scatter_(2, slots, new_k[:, :, None])
        v.scatter_(2, slots, new_v[:, :, None])
    # scores and softmax in fp32; k/v may be a view of the first S slots of a larger cache. The
    # group's queries are batched against their cache row (no copy of k/v): (B, H, group, D).
    # (explicit math: torch's CPU SDPA with a mask is ~100x slower for a single query)
    qg = q.float().view(b, group, h, d).transpose(1, 2)  # (B, H, group, D)
    scores = (qg @ k.float().transpose(-1, -2)) * scale  # (B, H, group, S)
    pad = torch.arange(s, device=q.device)[None, :] >= lengths[:, None]  # (B, S)
    probs = scores.masked_fill(pad[:, None, None, :], float("-inf")).softmax(dim=-1)
    out = probs @ v.float()  # (B, H, group, D)
    return out.transpose(1, 2).reshape(b * group, h, d).to(q.dtype)  # (B * group, H, D)


register_lazy("decode_attention", "triton", "mmgen_engine.kernels.decode_attention:decode_attention",
              TRITON_DEVICES)
register_lazy("decode_attention", "cuda", "mmgen_engine.ops.cuda_ops:decode_attention", CUDA_DEVICES, HALF_DTYPES)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
              key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Full attention, ``q [B, H, Tq, D]``, ``k, v [B, H, Tk, D]``, optional ``key_lengths [B]``
    -> ``[B, H, Tq, D]``; causal queries are the last ``Tq`` of ``Tk`` positions."""
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"causal attention needs Tq <= Tk, got {q.shape[2]} and {k.shape[2]}")
    return dispatch("attention", q)(q, k, v, scale, causal, key_lengths)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                     scale: float, new_k: torch.Tensor | None = None,
                     new_v: torch.Tensor | None = None, group: int = 1) -> torch.Tensor:
    """One query per row: ``q [B * group, H, D]``, ``k, v [B, H, S, D]``, ``lengths [B]`` ->
    ``[B * group, H, D]``; query row ``r`` attends to cache row ``r // group``. ``new_k, new_v
    [B, H, D]`` are stored at slot ``lengths - 1`` first (``group == 1`` only). See the module
    docstring."""
    _check_decode_shapes(q, k, v, lengths, new_k, new_v, group)
    return dispatch("decode_attention", q)(q, k, v, lengths, scale, new_k, new_v, group)


def _check_decode_shapes(q, k, v, lengths, new_k, new_v, group) -> None:
    """Shapes only: no device value is read (so it runs inside CUDA-graph capture too)."""
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
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
    for name, t, shape in (("q", q, (b * group, h, d)), ("v", v, (b, h, s, d)), ("lengths", lengths, (b,)),
                           ("new_k", new_k, (b, h, d)), ("new_v", new_v, (b, h, d))):
        if t is not None and t.shape != shape:
            raise ValueError(f"decode_attention: {name} must have shape {shape} (k is {tuple(k.shape)}, "
                             f"group={group}), got {tuple(t.shape)}")
